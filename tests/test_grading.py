"""The grader: every task is graded alone, and only tests that catch a missing solution count.

One Grader serves the whole module: its runs are cached by the code they test, so the calibration
(each task's tests on its stub and on the reference) runs once, and grading the stub copy, the
reference and each task solved alone costs no further run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minipaged import course
from minipaged.assignments import BEGIN, make_student_copy, strip_solutions
from minipaged.cli import main
from minipaged.grading import Grader, gradescope_results

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grader():
    with Grader(ROOT) as grader:
        yield grader


@pytest.fixture(scope="module")
def student_copy(tmp_path_factory) -> Path:
    student = tmp_path_factory.mktemp("copy") / "student"
    make_student_copy(ROOT, student)
    return student


def _copy_solving(dest: Path, solved: set[str]) -> Path:
    """A copy of the package whose fences of `solved` tasks keep the solution, the rest stubs."""
    others = {t.id for t in course.TASKS} - solved
    for path in (ROOT / "minipaged").rglob("*.py"):
        target = dest / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = path.read_text()
        if BEGIN in text and path.name != "assignments.py":
            text = strip_solutions(text, others)
        target.write_text(text)
    return dest


def test_every_task_has_tests_that_fail_on_its_stub_and_all_pass_on_the_reference(
    grader,
):
    grader.prepare()  # every calibration run, two at a time
    for task in course.TASKS:
        counting = grader.counting_tests(task)
        assert len(counting) >= 3, f"task {task.id}: {counting}"
        on_reference = grader.run_tests(grader._task_files(task), task)
        failed = [n for n, o in on_reference.items() if o["outcome"] == "failed"]
        assert not failed, f"task {task.id} fails on the reference: {failed[:3]}"


def test_the_stub_copy_scores_zero_and_the_reference_full_marks(grader, student_copy):
    stub = grader.grade(student_copy, course.TASKS)
    assert [r.score for r in stub] == [0] * len(course.TASKS)
    assert all(r.failed and not r.passed for r in stub)
    solved = grader.grade(ROOT, course.TASKS)
    assert [r.score for r in solved] == [t.points for t in course.TASKS]
    for number in (a.number for a in course.ASSIGNMENTS):
        assert sum(t.points for t in course.tasks_of(number)) == 100


def test_each_task_solved_alone_scores_exactly_its_own_points(grader, tmp_path):
    for task in course.TASKS:
        copy = _copy_solving(tmp_path / task.marker, {task.id})
        scores = {r.task.id: r.score for r in grader.grade(copy, course.TASKS)}
        expected = {t.id: (t.points if t is task else 0) for t in course.TASKS}
        assert scores == expected, f"task {task.id} solved alone"


def test_a_partly_wrong_task_earns_part_of_its_points(grader, tmp_path):
    """Task 1.2 with `free` forgetting the prefix cache's hook: the free list still works, so
    most tests pass, but not those of a block's release."""
    copy = _copy_solving(tmp_path / "copy", {"1.2"})
    allocator = copy / "minipaged/reference/block_allocator.py"
    text = allocator.read_text()
    assert text.count("self._release(block)") == 1
    allocator.write_text(
        text.replace("self._release(block)", "self._free_list.append(block)")
    )
    (result,) = grader.grade(copy, [course.task("1.2")])
    assert 0 < result.score < result.task.points
    assert result.failed and result.passed
    assert "FAILED tests/" in result.output()


def test_a_deleted_fence_or_a_syntax_error_scores_zero_with_the_reason(
    grader, tmp_path
):
    copy = _copy_solving(tmp_path / "copy", {"1.2", "1.4"})
    manager = copy / "minipaged/reference/block_manager.py"
    manager.write_text(manager.read_text().replace("# BEGIN SOLUTION 1.4\n", "", 1))
    allocator = copy / "minipaged/reference/block_allocator.py"
    text = allocator.read_text()
    allocator.write_text(text.replace("return block\n", "return block)\n", 1))
    fork, allocate = grader.grade(copy, [course.task("1.4"), course.task("1.2")])
    assert fork.score == 0 and "unbalanced solution fences" in fork.output()
    assert allocate.score == 0 and "SyntaxError" in allocate.output(), allocate.output()


def test_gradescope_results_format(grader, student_copy):
    tasks = course.tasks_of(1)
    results = json.loads(json.dumps(gradescope_results(grader.grade(ROOT, tasks))))
    assert results["score"] == 100
    assert [t["number"] for t in results["tests"]] == [t.id for t in tasks]
    for entry, task in zip(results["tests"], tasks, strict=True):
        assert set(entry) >= {"name", "score", "max_score", "output"}
        assert entry["score"] == entry["max_score"] == task.points
        assert task.title in entry["name"]


HIDDEN_TEST = """
import random

import pytest

from minipaged.reference.block_manager import BlockManager
from minipaged.sequence import Sequence, SequenceGroup


@pytest.mark.task1_4
def test_a_fork_of_a_random_prompt_shares_its_blocks():
    prompt = random.sample(range(1000), random.randint(3, 20))
    manager = BlockManager(4, 16, num_cpu_blocks=0)
    parent = Sequence(prompt_token_ids=prompt)
    manager.allocate(SequenceGroup("r", [parent]))
    child = parent.fork()
    manager.fork(parent, child)
    table = manager.get_block_table(parent).block_ids
    assert manager.get_block_table(child).block_ids == table
    assert [manager.device.ref_count(b) for b in table] == [2] * len(table)
"""


def test_hidden_tests_count_like_the_suites_own(tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "test_secret.py").write_text(HIDDEN_TEST)
    # a hidden file named like one of the suite's must not clash with it
    (hidden / "test_block_manager.py").write_text(HIDDEN_TEST)
    with Grader(ROOT, extra_tests=hidden, tasks=[course.task("1.4")]) as grader:
        counting = grader.counting_tests(course.task("1.4"))
    assert {
        "tests/hidden/test_secret.py::test_a_fork_of_a_random_prompt_shares_its_blocks",
        "tests/hidden/test_block_manager.py::test_a_fork_of_a_random_prompt_shares_its_blocks",
    } <= set(counting)
    assert any(node.startswith("tests/test_block_manager.py::") for node in counting)


def test_the_grade_command_writes_gradescope_json(tmp_path, student_copy, capsys):
    out = tmp_path / "results.json"
    assert main(["grade", str(student_copy), "--task", "1.4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "task 1.4" in printed and "total 0.00 / 10" in printed
    results = json.loads(out.read_text())
    assert results["score"] == 0 and results["tests"][0]["max_score"] == 10


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "9.9"], "task must be one of"),
        (["--assignment", "7"], "--assignment must be one of 1, 2, 3, 4, got 7"),
        (["--reference", "COPY"], "reference must hold the solutions"),
        (["--reference", "/nonexistent"], "reference must be a minipaged checkout"),
        (["--extra-tests", "/nonexistent"], "extra_tests must be a folder"),
        (["--jobs", "0"], "jobs must be an int >= 1, got 0"),
    ],
)
def test_the_grade_command_refuses_bad_arguments(args, message, student_copy, capsys):
    args = [str(student_copy) if a == "COPY" else a for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["grade", str(student_copy), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_grade_command_refuses_a_path_that_is_no_copy(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["grade", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "PATH must be a student copy" in capsys.readouterr().err


def test_a_tasks_tests_need_only_the_tasks_before_it(grader):
    """Defect 2 of issue 15: with every task its tests do not need still a stub (later tasks of
    its assignment, other assignments but those it builds on), all of them pass."""
    runs = []
    for task in course.TASKS:
        needed = {t.id for t in course.needed_by(task)} | {task.id}
        stubbed = {t.id for t in course.TASKS} - needed
        changed = {
            path: strip_solutions(text, stubbed)
            for path, text in grader.sources.items()
        }
        runs.append((changed, task))
    for task, outcomes in zip(course.TASKS, grader.run_many(runs), strict=True):
        failed = {
            n: o["message"] for n, o in outcomes.items() if o["outcome"] == "failed"
        }
        assert outcomes and not failed, f"task {task.id} needs a later task: {failed}"


def test_a_hand_in_without_a_tasks_file_scores_zero_for_that_task(grader, tmp_path):
    copy = _copy_solving(tmp_path / "copy", {"1.1", "1.2"})
    (copy / "minipaged/reference/block_table.py").unlink()
    table, allocator = grader.grade(copy, [course.task("1.1"), course.task("1.2")])
    assert table.score == 0 and "block_table.py" in table.output()
    assert allocator.score == allocator.task.points
