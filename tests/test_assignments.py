"""The student version: fences are stripped correctly, and every task's tests catch a missing solution.

The last test is the one that keeps the assignments honest: in a copy of the project with every
solution stripped, each registered task marker (task1_1, ...) must select tests and at least one of
them must fail. A task whose tests all pass without its solution would grade nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from minipaged.assignments import (
    REMOVED_QUOTE,
    STUB,
    make_student_copy,
    solution_lines,
    strip_doc_quotes,
    strip_solutions,
)

ROOT = Path(__file__).resolve().parents[1]

RECORDER = """
import json, os

MARKERS, FAILED = {}, set()

def pytest_collection_modifyitems(items):
    for item in items:
        MARKERS[item.nodeid] = sorted({m.name for m in item.iter_markers()})

def pytest_runtest_logreport(report):
    if report.failed:
        FAILED.add(report.nodeid)

def pytest_sessionfinish(session):
    with open(os.environ["RECORD_TO"], "w") as f:
        json.dump({"markers": MARKERS, "failed": sorted(FAILED)}, f)
"""


def test_strip_solutions_keeps_the_fences_and_stubs_the_body():
    source = textwrap.dedent(
        """\
        def f(x):
            \"\"\"Doc.\"\"\"
            # BEGIN SOLUTION
            y = x + 1
            return y
            # END SOLUTION
        """
    )
    stripped = strip_solutions(source)
    assert "y = x + 1" not in stripped
    assert stripped.splitlines()[2:] == [
        "    # BEGIN SOLUTION",
        f"    {STUB}",
        "    # END SOLUTION",
    ]
    namespace: dict = {}
    exec(stripped, namespace)
    with pytest.raises(NotImplementedError, match="write this body"):
        namespace["f"](1)


def test_unclosed_fence_is_an_error():
    with pytest.raises(ValueError, match="unbalanced solution fences"):
        strip_solutions("def f():\n    # BEGIN SOLUTION\n    return 1\n")


def test_student_copy_refuses_to_overwrite(tmp_path):
    with pytest.raises(FileExistsError, match="dest must not exist"):
        make_student_copy(ROOT, tmp_path)


def test_doc_quotes_of_solutions_are_removed_and_others_kept(tmp_path):
    (tmp_path / "m.py").write_text(
        "def f(x):\n    y = x * 2\n    # BEGIN SOLUTION\n    z = y + 1\n    return z\n    # END SOLUTION\n"
    )
    page = (
        '```python title="m.py"\ny = x * 2\n```\n\n'  # given code: kept
        # shows a solution line: removed
        '```python title="m.py"\ny = x * 2\nz = y + 1\n```\n\n'
        "```python\nz = y + 1\n```\n"  # untitled: not a quote of the file, kept
    )
    assert solution_lines((tmp_path / "m.py").read_text()) == {"z = y + 1", "return z"}
    stripped = strip_doc_quotes(page, tmp_path)
    assert stripped.count("```python") == 3
    assert '```python title="m.py"\ny = x * 2\n```' in stripped
    assert REMOVED_QUOTE.format(path="m.py") in stripped
    assert stripped.count("z = y + 1") == 1  # only the untitled block keeps it


def test_student_docs_show_no_solution(tmp_path):
    student = tmp_path / "student"
    make_student_copy(ROOT, student)
    secrets = set()
    for path in (ROOT / "minipaged").rglob("*.py"):
        secrets |= {line for line in solution_lines(path.read_text()) if len(line) > 30}
    # assignments.py's docstring shows a fence with the stub in it
    secrets.discard(STUB)
    assert secrets
    for page in (student / "docs").rglob("*.md"):
        # code blocks only
        code = "\n".join(
            re.findall(r"```[^\n]*\n(.*?)```", page.read_text(), flags=re.S)
        )
        leaked = [line for line in secrets if line in code]
        assert not leaked, (
            f"{page.relative_to(student)} shows solution lines: {leaked[:3]}"
        )
    assert (
        "Removed from the student copy"
        in (student / "docs/concepts/writing-through-the-table.md").read_text()
    )


def test_every_task_has_a_test_that_fails_without_its_solution(tmp_path):
    student = tmp_path / "student"
    stripped = make_student_copy(ROOT, student)
    assert student / "minipaged" / "reference" / "block_allocator.py" in stripped
    (student / "record_outcomes.py").write_text(RECORDER)
    tasks = re.findall(r'"(task\d+_\d+):', (ROOT / "pyproject.toml").read_text())
    assert tasks, "no task markers registered in pyproject.toml"
    record = tmp_path / "record.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(student),
        "RECORD_TO": str(record),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    # The tasks are the reference's bodies; the Triton backend's parametrizations test other code.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "record_outcomes",
            "-m",
            " or ".join(tasks),
            "-k",
            "not triton",
        ],
        cwd=student,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    outcome = json.loads(record.read_text())
    for task in tasks:
        selected = [node for node, marks in outcome["markers"].items() if task in marks]
        assert selected, f"no test is marked {task}"
        failing = [node for node in selected if node in outcome["failed"]]
        assert failing, (
            f"every {task} test passes with the solutions stripped: they test nothing of the task"
        )


def test_the_student_copys_tests_import_the_student_copy(tmp_path):
    """Issue 15, defect 1: with minipaged installed from another checkout (this one, editable),
    `pytest` run inside the student copy must import the copy's package, never the solution."""
    student = tmp_path / "student"
    make_student_copy(ROOT, student)
    (student / "tests" / "test_where_from.py").write_text(
        "from pathlib import Path\n\nimport minipaged\n\n\n"
        "def test_imported_from_this_copy():\n"
        "    here = Path(__file__).resolve().parents[1]\n"
        "    assert Path(minipaged.__file__).resolve().is_relative_to(here), minipaged.__file__\n"
    )
    pytest_script = Path(sys.executable).with_name(
        "pytest"
    )  # the script: it does not add the cwd
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [
            str(pytest_script),
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_where_from.py",
        ],
        cwd=student,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:]
