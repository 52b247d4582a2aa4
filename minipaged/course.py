"""The course: its assignments and their tasks, the one list that the student copy, the grader,
the handouts and the pytest markers all read.

A task is a set of solution fences in the reference code, `# BEGIN SOLUTION 1.3` ...
`# END SOLUTION`, and the tests marked `@pytest.mark.task1_3`. The student copy replaces the
fenced bodies with stubs (assignments.py); the grader splices one task's bodies from a student's
copy into the reference and runs that task's tests (grading.py). Points are per task and add up to
100 per assignment; the handout of each assignment states them, and a test holds the handouts to
this list.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Assignment:
    """One assignment: a number, a title, its handout page (relative to docs/), and the
    assignments whose code its tests run in a student's copy (`builds_on`)."""

    number: int
    title: str
    handout: str
    builds_on: tuple[int, ...] = ()


@dataclass(frozen=True)
class Task:
    """One task of an assignment.

    Attributes:
        id: "M.N", the number of the assignment, a dot and the task's number in it.
        title: what the student writes, in a few words.
        points: what the task is worth when all its counting tests pass.
        reading: the docs page to read first (relative to docs/); the stub names it.
        deselect: a pytest `-k` expression that leaves out tests the task's marker also selects
            but that test other code (the Triton parametrizations of the kernel contract).
    """

    id: str
    title: str
    points: int
    reading: str
    deselect: str = "not triton"

    @property
    def assignment(self) -> int:
        return int(self.id.split(".")[0])

    @property
    def index(self) -> int:
        """The task's number within its assignment: "1.3" -> 3."""
        return int(self.id.split(".")[1])

    @property
    def marker(self) -> str:
        """The pytest marker of the task's tests: "1.3" -> "task1_3"."""
        return "task" + self.id.replace(".", "_")


ASSIGNMENTS = (
    Assignment(1, "The paged memory manager", "assignments/memory-manager.md"),
    Assignment(2, "The kernels, in PyTorch", "assignments/reference-kernels.md"),
    # the scheduler's tests drive the block manager; the engine's run the kernels too
    Assignment(3, "Scheduling and preemption", "assignments/scheduler.md", (1, 2)),
    Assignment(4, "A paged decode kernel in Triton", "assignments/triton-decode.md"),
)

TASKS = (
    Task("1.1", "the block table (page table)", 10, "concepts/page-table.md"),
    Task(
        "1.2",
        "the block allocator (frame allocator)",
        15,
        "concepts/frame-allocator.md",
    ),
    Task("1.3", "demand paging", 20, "concepts/demand-paging.md"),
    Task("1.4", "fork (shared blocks)", 10, "concepts/fork.md"),
    Task("1.5", "copy-on-write", 10, "concepts/copy-on-write.md"),
    Task("1.6", "prefix caching (the page cache)", 20, "concepts/prefix-caching.md"),
    Task("1.7", "swapping (swap_out / swap_in)", 15, "concepts/swapping.md"),
    Task("2.1", "write_kv", 20, "concepts/writing-through-the-table.md"),
    Task(
        "2.2",
        "gather-based paged attention",
        30,
        "concepts/reading-through-the-table.md",
    ),
    Task(
        "2.3",
        "blockwise attention, online softmax",
        30,
        "concepts/reading-through-the-table.md",
    ),
    Task("2.4", "copy_blocks and swap_blocks", 20, "concepts/copy-on-write.md"),
    Task("3.1", "admission", 30, "concepts/thrashing-and-admission.md"),
    Task("3.2", "preemption", 40, "concepts/replacement-and-recomputation.md"),
    Task("3.3", "swap-in order", 30, "concepts/swapping.md"),
    Task("4.1", "the paged decode kernel", 70, "kernels/triton-decode.md", deselect=""),
    Task(
        "4.2",
        "the paged prefill kernel (causal)",
        30,
        "kernels/triton-prefill.md",
        deselect="",
    ),
)


def task(task_id: str) -> Task:
    """The task with this id ("1.3").

    Raises:
        ValueError: if no task has that id.
    """
    for t in TASKS:
        if t.id == task_id:
            return t
    known = ", ".join(t.id for t in TASKS)
    raise ValueError(f"task must be one of {known}, got {task_id!r}")


def tasks_of(assignment: int) -> tuple[Task, ...]:
    """The tasks of one assignment, in order."""
    return tuple(t for t in TASKS if t.assignment == assignment)


def needed_by(task: Task) -> tuple[Task, ...]:
    """The tasks whose code `task`'s tests may run in a student's copy: the tasks before it in
    its assignment, and those of the assignments it builds on. Every other task may still be a
    stub without failing them (tests/test_grading.py checks)."""
    (assignment,) = (a for a in ASSIGNMENTS if a.number == task.assignment)
    return tuple(
        t
        for t in TASKS
        if t.assignment in assignment.builds_on
        or (t.assignment == task.assignment and t.index < task.index)
    )
