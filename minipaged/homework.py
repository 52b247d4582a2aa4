"""Homework generators: predict what the memory manager and the scheduler do, then check.

OS idea: OSTEP's homework simulators (`paging-policy.py -s 3`, `scheduler.py -s 2 -c`) print a
small random problem from a seed; the student works it out by hand, then runs the same command
with `-c` to see the answers. Doing the bookkeeping by hand is how the policy sinks in. KV
counterpart: the paged KV cache of the vLLM paper (section 4.2-4.5): block tables, reference
counts, copy-on-write and swapping (homework_memory.py), and iteration-level scheduling with
preemption (homework_scheduler.py).

Every answer comes from the real BlockManager and Scheduler, driven one operation or one step at
a time: this module prints them, it never computes them. A problem is plain data (`Problem`), so
the tests can replay its operations on fresh managers and compare; `render` turns it into the
text that `minipaged homework KIND --seed N [--solve]` prints. The same seed always gives the
same problem: one seed per student gives each their own.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("memory", "scheduler")
BLANK = "____"


@dataclass(frozen=True)
class Question:
    """One question: what happened, what to work out, and the real answers.

    Attributes:
        text: the operation or the step the question is about, e.g. "3. fork A0 -> A1".
        asks: the labels of what to write, e.g. ("tables", "device ref counts").
        answers: the answer to each label, as printed with --solve (same length as `asks`).
        data: the same answers as data, for tests (block ids, ref counts, mappings, names).
    """

    text: str
    asks: tuple[str, ...]
    answers: tuple[str, ...]
    data: dict


@dataclass(frozen=True)
class Problem:
    """A homework problem: its setup, the operations to replay, and one question each.

    Attributes:
        kind: "memory" or "scheduler".
        seed: the seed it was drawn from.
        config: the settings to rebuild the managers with (pool sizes, preemption mode, ...).
        operations: what to replay: the memory operations, or the scheduler's requests.
        header: the lines that state the problem.
        questions: the questions, one an operation (memory) or one a step (scheduler).
    """

    kind: str
    seed: int
    config: dict
    operations: tuple[tuple, ...]
    header: tuple[str, ...]
    questions: tuple[Question, ...]


def check_seed(seed: int) -> None:
    """Refuse a seed that is not a non-negative int.

    Raises:
        ValueError: naming `seed` and what was expected.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def memory_problem(seed: int) -> Problem:
    """Operations on a small paged KV cache; after each, its block tables and ref counts.

    Raises:
        ValueError: if `seed` is not a non-negative int.
    """
    from minipaged.homework_memory import generate

    check_seed(seed)
    return generate(seed)


def scheduler_problem(seed: int) -> Problem:
    """A few requests on a small pool; at each step, who runs, who is preempted, who finishes.

    Raises:
        ValueError: if `seed` is not a non-negative int.
    """
    from minipaged.homework_scheduler import generate

    check_seed(seed)
    return generate(seed)


def make_problem(kind: str, seed: int) -> Problem:
    """The problem of `kind` ("memory" or "scheduler") for `seed`.

    Raises:
        ValueError: for an unknown kind or a bad seed.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return memory_problem(seed) if kind == "memory" else scheduler_problem(seed)


def render(problem: Problem, solve: bool = False) -> str:
    """The problem as text: the setup, then each question with its answers or blanks.

    Args:
        problem: from memory_problem or scheduler_problem.
        solve: print the answers (the simulators' `-c`); False leaves "____" in their place.
    """
    lines = [f"minipaged homework {problem.kind} --seed {problem.seed}", ""]
    lines += problem.header
    for question in problem.questions:
        lines += ["", question.text]
        width = max(len(ask) for ask in question.asks)
        for ask, answer in zip(question.asks, question.answers, strict=True):
            lines.append(f"   {ask + ':':<{width + 1}} {answer if solve else BLANK}")
    return "\n".join(lines) + "\n"
