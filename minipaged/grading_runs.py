"""Where the grader runs pytest: copies of the reference, one per worker, with a recorder.

Each tree holds the reference's package and tests (and the hidden tests, if any); a run writes the
spliced or stubbed files over the package, runs pytest on the tests that mention the tasks'
markers, and reads back what a small plugin recorded: each test's outcome, its failure line and
its markers. Separate trees let two runs go at once, one per core.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from minipaged.course import Task

# a pytest plugin written into the grading tree: records each test's outcome and failure line
_RECORDER = """
import json, os

OUTCOMES = {}

def _record(nodeid, report):
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash else str(report.longrepr).strip().splitlines()[-1:]
        OUTCOMES[nodeid] = {"outcome": "failed", "message": str(message)[:500]}
    elif nodeid not in OUTCOMES or report.when == "call":
        OUTCOMES[nodeid] = {"outcome": report.outcome, "message": ""}

def pytest_runtest_logreport(report):
    if OUTCOMES.get(report.nodeid, {}).get("outcome") != "failed":
        _record(report.nodeid, report)

def pytest_collectreport(report):
    if report.failed:
        _record("collecting " + report.nodeid, report)

MARKERS = {}

def pytest_collection_modifyitems(items):
    for item in items:
        MARKERS[item.nodeid] = sorted({m.name for m in item.iter_markers()})

def pytest_sessionfinish(session):
    for nodeid, outcome in OUTCOMES.items():
        outcome["markers"] = MARKERS.get(nodeid, [])
    with open(os.environ["MINIPAGED_GRADE_RECORD"], "w") as f:
        json.dump(OUTCOMES, f)
"""
_PLUGIN = "_minipaged_grade_recorder"
_LINKED = (
    "docs",
    "scripts",
    "tutorials",
    "benchmarks",
)  # read by some tests, never changed


class TestTrees:
    """`jobs` copies of the reference to run the tests in, handed out one run at a time."""

    __test__ = False  # not a pytest test class, despite its name

    def __init__(
        self, reference: Path, extra_tests: str | Path | None, jobs: int, timeout: float
    ) -> None:
        if not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
        if extra_tests is not None and not Path(extra_tests).is_dir():
            raise ValueError(
                f"extra_tests must be a folder of tests, got {extra_tests}"
            )
        self.timeout = timeout
        self._work = Path(tempfile.mkdtemp(prefix="minipaged-grade-"))
        self._free: queue.Queue[Path] = queue.Queue()
        for i in range(jobs):
            self._free.put(_build_tree(self._work / f"tree{i}", reference, extra_tests))

    def close(self) -> None:
        shutil.rmtree(self._work, ignore_errors=True)

    def run(
        self, sources: dict[str, str], changed: dict[str, str], tasks: list[Task]
    ) -> dict[str, dict]:
        """Run the tests of `tasks` (which share a `deselect`) with the `changed` files written
        over `sources` (relative path -> text); nodeid -> {outcome, message, markers}."""
        tree = self._free.get()
        try:
            for path, text in sources.items():
                (tree / path).write_text(changed.get(path, text))
            return self._pytest(tree, tasks)
        finally:
            self._free.put(tree)

    def _pytest(self, tree: Path, tasks: list[Task]) -> dict[str, dict]:
        record = tree / "record.json"
        record.unlink(missing_ok=True)
        markers = " or ".join(t.marker for t in tasks)
        files = sorted(
            path.relative_to(tree).as_posix()
            for path in (tree / "tests").rglob("test_*.py")
            if any(t.marker in path.read_text() for t in tasks)
        )
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        command += ["--continue-on-collection-errors", "-p", _PLUGIN, "-m", markers]
        command += files
        if tasks[0].deselect:
            command += ["-k", tasks[0].deselect]
        env = {
            **os.environ,
            "PYTHONPATH": str(tree),
            "PYTHONDONTWRITEBYTECODE": "1",  # a stale .pyc of another run must not load
            "MINIPAGED_GRADE_RECORD": str(record),
        }
        try:
            subprocess.run(
                command, cwd=tree, env=env, capture_output=True, timeout=self.timeout
            )
        except subprocess.TimeoutExpired:
            message = f"the tests of {markers} ran past {self.timeout:.0f} s"
            return {"collecting": {"outcome": "failed", "message": message}}
        return json.loads(record.read_text()) if record.exists() else {}


def _build_tree(tree: Path, reference: Path, extra_tests: str | Path | None) -> Path:
    """A copy of the reference's package, tests and settings to splice into."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    tree.mkdir()
    for name in ("minipaged", "tests"):
        shutil.copytree(reference / name, tree / name, ignore=ignore)
    shutil.copy2(reference / "pyproject.toml", tree)
    for name in _LINKED:
        if (reference / name).exists():
            (tree / name).symlink_to(reference / name)
    (tree / f"{_PLUGIN}.py").write_text(_RECORDER)
    if extra_tests is not None:
        hidden = tree / "tests" / "hidden"
        shutil.copytree(extra_tests, hidden, ignore=ignore)
        (hidden / "__init__.py").touch()
    return tree
