"""The student version: fences are stripped and spliced correctly, and the copy is consistent.

The copy must hold no solution, pass its own lint, import itself in its tests, leave its tutorials
unexecuted, and report a test of no task that runs into a stub as waiting for that task. Whether
each task's tests catch a missing solution is the grader's business: tests/test_grading.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from minipaged import course
from minipaged.assignments import (
    BEGIN,
    REMOVED_QUOTE,
    fences,
    make_student_copy,
    solution_lines,
    splice,
    strip_doc_quotes,
    strip_solutions,
    stub,
)

ROOT = Path(__file__).resolve().parents[1]


def test_strip_solutions_keeps_the_fences_and_stubs_the_body():
    source = textwrap.dedent(
        """\
        def f(x):
            \"\"\"Doc.\"\"\"
            # BEGIN SOLUTION 1.2
            y = x + 1
            return y
            # END SOLUTION
        """
    )
    stripped = strip_solutions(source)
    assert "y = x + 1" not in stripped
    assert stripped.splitlines()[2:] == [
        "    # BEGIN SOLUTION 1.2",
        *stub("1.2", "    ").splitlines(),
        "    # END SOLUTION",
    ]
    namespace: dict = {}
    exec(stripped, namespace)
    message = r"task 1\.2: write this body \(read docs/concepts/frame-allocator\.md\)"
    with pytest.raises(NotImplementedError, match=message):
        namespace["f"](1)


def test_unclosed_fence_is_an_error():
    with pytest.raises(ValueError, match="unbalanced solution fences"):
        strip_solutions("def f():\n    # BEGIN SOLUTION 1.1\n    return 1\n")
    with pytest.raises(ValueError, match=r"M\.N"):  # a fence must name its task
        strip_solutions(
            "def f():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION\n"
        )
    with pytest.raises(ValueError, match="task must be one of"):
        strip_solutions(
            "def f():\n    # BEGIN SOLUTION 9.9\n    return 1\n    # END SOLUTION\n"
        )


def test_student_copy_refuses_to_overwrite(tmp_path):
    with pytest.raises(FileExistsError, match="dest must not exist"):
        make_student_copy(ROOT, tmp_path)


def test_doc_quotes_of_solutions_are_removed_and_others_kept(tmp_path):
    (tmp_path / "m.py").write_text(
        "def f(x):\n    y = x * 2\n    # BEGIN SOLUTION 1.1\n"
        "    z = y + 1\n    return z\n    # END SOLUTION\n"
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
        if path.name != "assignments.py":  # its docstring shows a stub, as an example
            secrets |= {
                line for line in solution_lines(path.read_text()) if len(line) > 30
            }
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


def test_splice_takes_only_that_tasks_bodies_and_moves_them_to_the_right_indent():
    reference = (
        "def f():\n    # BEGIN SOLUTION 1.1\n    return 1\n    # END SOLUTION\n\n"
        "def g():\n    # BEGIN SOLUTION 1.2\n    return 2\n    # END SOLUTION\n"
    )
    # the student wrote task 1.1 at another indentation and left 1.2 a stub
    student = strip_solutions(reference).replace(
        stub("1.1", "    "), "      x = 10\n\n      return x\n"
    )
    spliced = splice(reference, student, "1.1")
    namespace: dict = {}
    exec(spliced, namespace)
    assert namespace["f"]() == 10
    assert namespace["g"]() == 2  # the reference's 1.2, not the student's stub
    assert [f.task for f in fences(spliced)] == ["1.1", "1.2"]
    with pytest.raises(ValueError, match=r"keep the '# BEGIN SOLUTION 1\.2'"):
        splice(reference, student[: student.index("def g")], "1.2")


@pytest.fixture(scope="module")
def student_copy(tmp_path_factory) -> Path:
    student = tmp_path_factory.mktemp("copy") / "student"
    make_student_copy(ROOT, student)
    return student


def test_the_copy_holds_no_solved_body(student_copy):
    """Every fence of the copy holds exactly its stub, and no line that only a solution has (in
    the whole reference package and tests) is anywhere in the copy's package or tests."""
    inside, outside, num_fences = set(), set(), 0
    for path in [*ROOT.glob("minipaged/**/*.py"), *ROOT.glob("tests/*.py")]:
        text = path.read_text()
        # assignments.py's docstring and the tests' strings show fences as examples
        example = path.name == "assignments.py" or path.parent.name == "tests"
        if example or BEGIN not in text:
            outside |= {line.strip() for line in text.splitlines()}
            continue
        fenced = solution_lines(text)
        inside |= fenced
        outside |= {line.strip() for line in text.splitlines()} - fenced
        copied = (student_copy / path.relative_to(ROOT)).read_text()
        assert [f.task for f in fences(copied)] == [f.task for f in fences(text)]
        for fence in fences(copied):
            assert fence.body == stub(fence.task, fence.indent), path
            num_fences += 1
    secrets = {s for s in inside - outside if len(s) > 20 and not s.startswith("#")}
    assert num_fences >= 20 and len(secrets) > 50
    copied = [*student_copy.glob("minipaged/**/*.py"), *student_copy.glob("tests/*.py")]
    for path in copied:
        leaked = [line for line in secrets if line in path.read_text()]
        assert not leaked, (
            f"{path.relative_to(student_copy)} holds solution lines {leaked[:3]}"
        )


def test_the_copy_passes_its_own_lint_and_format_keeps_its_imports(
    student_copy, tmp_path
):
    ruff = str(Path(sys.executable).with_name("ruff"))
    for command in ([ruff, "check", "."], [ruff, "format", "--check", "."]):
        result = subprocess.run(
            command, cwd=student_copy, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout[-3000:]
    # `make format` runs `ruff check --fix`: it must not delete an import only a solution uses
    prefix_cache = student_copy / "minipaged/reference/prefix_cache.py"
    before = prefix_cache.read_text()
    assert (
        "import hashlib" in (ROOT / "minipaged/reference/prefix_cache.py").read_text()
    )
    subprocess.run([ruff, "check", "--fix", str(prefix_cache)], cwd=student_copy)
    assert prefix_cache.read_text() == before


def test_the_copys_docs_build_does_not_execute_the_tutorials(student_copy):
    assert "execute: true" in (ROOT / "mkdocs.yml").read_text()
    text = (student_copy / "mkdocs.yml").read_text()
    assert "execute: true" not in text and "execute: false" in text


def test_a_test_of_no_task_that_hits_a_stub_waits_for_the_task(student_copy):
    """In the copy, a task's test fails on its stub; a test of no task that runs into a stub is
    reported skipped, naming the task it waits for, and a `needs_every_task` test is skipped up
    front (tests/conftest.py). In the reference neither happens: no stub is left."""
    (student_copy / "tests" / "test_stub_hits.py").write_text(
        "import pytest\n\n"
        "from minipaged.reference.block_allocator import BlockAllocator\n\n\n"
        "def test_of_no_task():\n"
        "    BlockAllocator(4).allocate()\n\n\n"
        "@pytest.mark.task1_2\n"
        "def test_of_task_1_2():\n"
        "    BlockAllocator(4).allocate()\n\n\n"
        "def test_of_no_task_that_fails_otherwise():\n"
        "    assert BlockAllocator(4).num_free == 3\n\n\n"
        "@pytest.mark.needs_every_task\n"
        "def test_of_the_whole_engine():\n"
        "    assert False, 'must not run while stubs are left'\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-rfs",
            "-p",
            "no:cacheprovider",
            "tests/test_stub_hits.py",
        ],
        cwd=student_copy,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout
    assert "2 failed, 2 skipped" in out, out[-3000:]
    assert "needs every task; still stubs: task 1.1, 1.2, 1.3" in out
    assert "waits for task 1.2 (still a stub)" in out
    assert "FAILED tests/test_stub_hits.py::test_of_task_1_2" in out
    assert "FAILED tests/test_stub_hits.py::test_of_no_task_that_fails_otherwise" in out


SECTIONS = (
    "## Goal",
    "## Reading",
    "## Tasks",
    "## Running and grading",
    "## Written questions",
    "## Rubric for the written part",
)


@pytest.mark.parametrize("assignment", course.ASSIGNMENTS, ids=lambda a: str(a.number))
def test_each_handout_states_its_tasks_points_and_has_every_section(assignment):
    """The handout's task table (first cell the task, second its points) is course.py's list."""
    text = (ROOT / "docs" / assignment.handout).read_text()
    assert text.startswith(f"# Assignment {assignment.number}")
    for section in SECTIONS:
        assert f"\n{section}" in text, f"{assignment.handout} has no '{section}'"
    rows = re.findall(r"^\| (\d+\.\d+) \| (\d+) \|", text, re.M)
    expected = [(t.id, str(t.points)) for t in course.tasks_of(assignment.number)]
    assert rows == expected
    for task in course.tasks_of(assignment.number):
        assert f"### Task {task.id}" in text
        assert (ROOT / "docs" / task.reading).is_file(), task.reading
    template = ROOT / "answers" / f"assignment{assignment.number}.md"
    assert template.is_file() and "Prediction:" in template.read_text()


def test_the_markers_registered_are_the_courses_tasks():
    registered = re.findall(r'"(task\d+_\d+):', (ROOT / "pyproject.toml").read_text())
    assert registered == [t.marker for t in course.TASKS]


def test_the_reference_has_no_stub_so_nothing_waits_for_a_task():
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from conftest import stubbed_tasks
    finally:
        sys.path.remove(str(ROOT / "tests"))
    assert stubbed_tasks() == []


def test_in_the_reference_a_failure_that_quotes_a_stub_is_still_a_failure(tmp_path):
    """The hook that turns a stub's error into a skip acts only where stubs are left: in the
    reference a test that fails with a stub's message (a grading test quoting a student's
    output, say) fails."""
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "tests")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "tests" / "test_quotes_a_stub.py").write_text(
        "def test_quotes_a_stub():\n"
        "    raise NotImplementedError('task 1.2: write this body (read docs/x.md)')\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "1 failed" in result.stdout, result.stdout[-2000:]
