"""Grade a student's copy one task at a time, the way a unit test isolates one function.

For task M.N, the grader takes the reference code, replaces only that task's fenced bodies with the
student's (assignments.splice), and runs the task's tests (`pytest -m taskM_N`) from the reference,
never the student's own tests. Every other fence keeps the reference body, so a task is graded
alone: a missing task 1.2 costs task 1.2's points and nothing else.

Only the tests that count earn points: those that fail with the task's bodies stubbed and pass on
the reference. A test that passes on the stub (a check of argument errors made before the fence,
say) tells nothing about the student's work. A task's score is its points times the share of its
counting tests that pass. The result is written in Gradescope's autograder format.

Runs are cached by the exact code they test, so the stub and reference calibrations run once per
Grader, however many copies it grades.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from minipaged.assignments import BEGIN, STUB_PREFIX, fences, splice, strip_solutions
from minipaged.course import TASKS, Task
from minipaged.grading_runs import TestTrees


@dataclass
class TaskResult:
    """One task's grade: its score, and the counting tests that passed and failed."""

    task: Task
    score: float = 0.0
    passed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # nodeid -> failure line
    error: str | None = None  # why nothing could be run

    @property
    def num_counted(self) -> int:
        return len(self.passed) + len(self.failed)

    def output(self) -> str:
        """What the student reads on Gradescope: the tally, then each failing test and why."""
        if self.error:
            return self.error
        lines = [f"{len(self.passed)} of {self.num_counted} tests pass."]
        lines += [f"FAILED {node}: {message}" for node, message in self.failed.items()]
        return "\n".join(lines)


def default_reference() -> Path:
    """The checkout this minipaged was imported from: the reference solution and its tests."""
    return Path(__file__).resolve().parents[1]


class Grader:
    """Grades copies against one reference checkout (and optional hidden tests).

    Args:
        reference: a minipaged checkout with the solutions (not a student copy): its code, tests
            and pyproject.toml are used.
        extra_tests: a folder of additional test files, marked with the task markers like the
            suite's own; the student copy does not contain them (hidden tests).
        timeout: seconds one task's tests may run.
        tasks: the tasks it will grade: the reference's outcomes for all of them come from one
            run (one per `deselect`), not one run each.
        jobs: how many pytest runs at once, each in its own copy of the reference.

    Raises:
        ValueError: if `reference` is not a checkout with solutions, or `extra_tests` is not a
            folder.
    """

    def __init__(
        self,
        reference: str | Path | None = None,
        extra_tests: str | Path | None = None,
        timeout: float = 900,
        tasks: Iterable[Task] = TASKS,
        jobs: int = 2,
    ) -> None:
        self.reference = Path(reference or default_reference()).resolve()
        self.timeout = timeout
        self.tasks = tuple(tasks)
        self._reference_runs: dict[str, dict[str, dict]] = {}
        self.sources = _fenced_sources(self.reference)
        self.jobs = jobs
        self._trees = TestTrees(self.reference, extra_tests, jobs, timeout)
        self._cache: dict[str, dict[str, dict]] = {}

    def close(self) -> None:
        """Delete the grading trees."""
        self._trees.close()

    def prepare(self, tasks: Iterable[Task] | None = None) -> None:
        """Run the calibration of `tasks` (default: all it grades), `jobs` runs at a time: the
        reference's outcomes, and each task's tests on its stub."""
        tasks = list(self.tasks if tasks is None else tasks)
        with ThreadPoolExecutor(self.jobs) as pool:
            list(pool.map(self._on_reference, {t.deselect: t for t in tasks}.values()))
            list(pool.map(self.counting_tests, tasks))

    def run_many(
        self, runs: list[tuple[dict[str, str], Task]]
    ) -> list[dict[str, dict]]:
        """`run_tests` for each (changed, task), `jobs` at a time, in order."""
        with ThreadPoolExecutor(self.jobs) as pool:
            return list(pool.map(lambda run: self.run_tests(*run), runs))

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def grade(
        self,
        student: str | Path,
        tasks: Iterable[Task],
        progress: Callable[[TaskResult], object] | None = None,
    ) -> list[TaskResult]:
        """Grade each task of the copy at `student` alone; `progress` is called after each."""
        student, tasks = Path(student), list(tasks)
        self.prepare(tasks)
        results = []
        for task in tasks:
            results.append(self.grade_task(student, task))
            if progress is not None:
                progress(results[-1])
        return results

    def grade_task(self, student: Path, task: Task) -> TaskResult:
        """Splice the copy's bodies of `task` into the reference and run the counting tests."""
        result = TaskResult(task)
        counting = self.counting_tests(task)
        if not counting:
            result.error = (
                f"no test of task {task.id} fails on its stub: nothing to grade"
            )
            return result
        try:
            spliced = {
                path: splice(text, (student / path).read_text(), task.id)
                for path, text in self._task_files(task).items()
            }
        except (OSError, ValueError) as error:
            result.error = f"could not read the copy's task {task.id}: {error}"
            return result
        outcomes = self.run_tests(spliced, task)
        for node in counting:
            outcome = outcomes.get(
                node, {"outcome": "failed", "message": "did not run"}
            )
            if outcome["outcome"] == "passed":
                result.passed.append(node)
            else:
                result.failed[node] = outcome["message"] or outcome["outcome"]
        # a test file the copy's code breaks at import (not one the reference breaks too)
        broken_anyway = self.run_tests(self._task_files(task), task)
        errors = {
            node: outcome["message"]
            for node, outcome in outcomes.items()
            if node.startswith("collecting") and node not in broken_anyway
        }
        result.failed.update(errors)
        share = len(result.passed) / (len(counting) + len(errors))
        result.score = round(task.points * share, 2)
        return result

    def counting_tests(self, task: Task) -> list[str]:
        """The tests of `task` that fail with its bodies stubbed and pass on the reference."""
        files = self._task_files(task)
        stubbed = {
            path: strip_solutions(text, {task.id}) for path, text in files.items()
        }
        on_stub, on_reference = (
            self.run_tests(stubbed, task),
            self.run_tests(files, task),
        )
        return sorted(
            node
            for node, outcome in on_reference.items()
            if outcome["outcome"] == "passed"
            and on_stub.get(node, {}).get("outcome") == "failed"
        )

    # ---- running the tests
    # ------------------------------------------------------------------

    def _task_files(self, task: Task) -> dict[str, str]:
        """The reference's files with fences of `task` (relative path -> text)."""
        files = {
            path: text
            for path, text in self.sources.items()
            if any(f.task == task.id for f in fences(text))
        }
        if not files:
            raise ValueError(f"the reference has no fences of task {task.id}")
        return files

    def run_tests(self, changed: dict[str, str], task: Task) -> dict[str, dict]:
        """Outcomes of `task`'s tests (nodeid -> {outcome, message, markers}) with `changed`
        files (relative path -> text) written over the reference, cached by that code."""
        if all(text == self.sources[path] for path, text in changed.items()):
            return self._on_reference(task)
        key = hashlib.sha256(
            json.dumps(sorted(changed.items())).encode() + task.id.encode()
        ).hexdigest()
        if key not in self._cache:  # two threads may both run it: the same result
            self._cache[key] = self._trees.run(self.sources, changed, [task])
        return self._cache[key]

    def _on_reference(self, task: Task) -> dict[str, dict]:
        """Outcomes of `task`'s tests on the reference, from one run for all tasks like it."""
        if task.deselect not in self._reference_runs:
            alike = [t for t in self.tasks if t.deselect == task.deselect]
            self._reference_runs[task.deselect] = self._trees.run(
                self.sources, {}, alike or [task]
            )
        return {
            node: outcome
            for node, outcome in self._reference_runs[task.deselect].items()
            if node.startswith("collecting") or task.marker in outcome["markers"]
        }


def _fenced_sources(reference: Path) -> dict[str, str]:
    """The reference's package files that hold solution fences, checked to hold solutions."""
    if (
        not (reference / "tests").is_dir()
        or not (reference / "pyproject.toml").is_file()
    ):
        raise ValueError(
            f"reference must be a minipaged checkout with tests/ and pyproject.toml, "
            f"got {reference}"
        )
    sources = {}
    for path in sorted((reference / "minipaged").rglob("*.py")):
        text = path.read_text()
        # assignments.py's docstring shows a stubbed fence: an example, not a task
        if path.name != "assignments.py" and BEGIN in text and fences(text):
            if any(STUB_PREFIX in f.body for f in fences(text)):
                raise ValueError(
                    f"reference must hold the solutions, but {path} has stubs: "
                    "grade from the instructor's checkout, not a student copy"
                )
            sources[path.relative_to(reference).as_posix()] = text
    return sources


def gradescope_results(results: list[TaskResult]) -> dict:
    """The results in Gradescope's autograder format (results.json)."""
    return {
        "score": round(sum(r.score for r in results), 2),
        "output": "Each task is graded alone, spliced into the reference code. Only tests "
        "that fail on the task's stub and pass on the reference count.",
        "tests": [
            {
                "name": f"Task {r.task.id}: {r.task.title}",
                "number": r.task.id,
                "score": r.score,
                "max_score": r.task.points,
                "output": r.output(),
                "visibility": "visible",
            }
            for r in results
        ],
    }
