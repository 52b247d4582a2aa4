"""Make the student version of minipaged: every fenced solution body replaced by a stub.

The reference code marks what a student writes with `# BEGIN SOLUTION M.N` / `# END SOLUTION`,
where M.N is the task (course.py lists them); the tests of task M.N carry `@pytest.mark.taskM_N`,
so `pytest -m task1_2` runs task 1.2's tests. This module strips the fences' contents, keeping the
fences themselves so the student sees where to write, and a stub that names the task and the page
to read:

    def allocate(self) -> int:
        \"\"\"Take a free block and give it reference count 1.\"\"\"
        # BEGIN SOLUTION 1.2
        raise NotImplementedError(
            "task 1.2: write this body (read docs/concepts/frame-allocator.md)"
        )
        # END SOLUTION

Run it as `minipaged assignment DEST` (or `python -m minipaged assignment DEST`): DEST receives a copy
of the package with the solutions stripped, the tests, the tutorials, the docs and the project files.
The docs quote the reference code (```python title="minipaged/..." blocks); a quote that shows a
fenced solution is replaced in the student copy by a line saying so. The grader (grading.py) uses
`splice` to put one task's bodies from a student's copy back into the reference.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from minipaged.course import task as course_task

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
# the stub's message starts so; tests/conftest.py recognizes it
STUB_PREFIX = "write this body"
_FENCE = re.compile(
    rf"^(?P<indent>[ \t]*){re.escape(BEGIN)} (?P<task>\d+\.\d+)[ \t]*\n"
    rf"(?P<body>.*?)^(?P=indent){re.escape(END)}[ \t]*\n",
    re.M | re.S,
)
# two lines: a long path must not push a docs code block past 88 columns (test_code_width.py)
REMOVED_QUOTE = (
    "# Removed from the student copy:\n# this excerpt is a task's solution, in {path}."
)
_QUOTE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,})[ \t]*python[^\n]*?\btitle=\"(?P<path>[^\"]+)\"[^\n]*\n"
    r"(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
    re.M | re.S,
)
# the instructor's tests of the course itself: they need the solutions
INSTRUCTOR_ONLY = (
    "tests/test_assignments.py",
    "tests/test_grading.py",
    # the old policy, whole (every task's solution), and the test that holds the new one to it
    "tests/policy_before_issue18.py",
    "tests/test_same_decisions.py",
)
COPIED = (
    "minipaged",
    "tests",
    "tutorials",
    "benchmarks",
    "scripts",  # the figure and training scripts: tests replay them
    "answers",  # the templates for the written questions
    "docs",
    "pyproject.toml",
    "Makefile",
    "mkdocs.yml",
    "README.md",
)
# what a stub leaves unused (imports, locals) or undefined (names only its body set)
STUB_LINT_IGNORES = '["F401", "F811", "F841", "F821"]'
LINE_LENGTH = (
    88  # the formatter's width (pyproject.toml): a stub must already be formatted
)


@dataclass(frozen=True)
class Fence:
    """One solution fence: its task, its indentation, its body and where it sits in the source."""

    task: str
    indent: str
    body: str
    start: int  # of the BEGIN line
    end: int  # after the END line


def stub(task_id: str, indent: str = "") -> str:
    """The body a stripped fence gets: a NotImplementedError naming the task and its reading.

    Formatted as `ruff format` would format it, so the student copy passes `make lint`.

    Raises:
        ValueError: if `task_id` is not a task of the course.
    """
    task = course_task(task_id)
    message = f"task {task.id}: {STUB_PREFIX} (read docs/{task.reading})"
    line = f'{indent}raise NotImplementedError("{message}")\n'
    if len(line) - 1 <= LINE_LENGTH:
        return line
    return f'{indent}raise NotImplementedError(\n{indent}    "{message}"\n{indent})\n'


def fences(source: str) -> list[Fence]:
    """Every solution fence of `source`, in order.

    Raises:
        ValueError: if a fence is opened and never closed at the same indentation, or a
            `# BEGIN SOLUTION` line names no task (M.N).
    """
    found = [
        Fence(m["task"], m["indent"], m["body"], m.start(), m.end())
        for m in _FENCE.finditer(source)
    ]
    num_begin, num_end = (
        len(re.findall(rf"^[ \t]*{re.escape(mark)}\b.*$", source, re.M))
        for mark in (BEGIN, END)
    )
    if not num_begin == num_end == len(found):
        raise ValueError(
            "unbalanced solution fences: each '# BEGIN SOLUTION M.N' (M.N: the task) needs an "
            "'# END SOLUTION' below it at the same indentation"
        )
    return found


def _replace_bodies(source: str, bodies: dict[int, str]) -> str:
    """`source` with the body of fence i replaced by bodies[i] (fences numbered as `fences`)."""
    parts, pos = [], 0
    for i, fence in enumerate(fences(source)):
        if i not in bodies:
            continue
        begin_line = f"{fence.indent}{BEGIN} {fence.task}\n"
        parts += [source[pos : fence.start], begin_line, bodies[i]]
        parts.append(f"{fence.indent}{END}\n")
        pos = fence.end
    return "".join(parts) + source[pos:]


def strip_solutions(source: str, tasks: set[str] | None = None) -> str:
    """Replace the body of every solution fence in `source` (of `tasks` only, if given) with a stub.

    Raises:
        ValueError: if the fences are unbalanced or name an unknown task.
    """
    return _replace_bodies(
        source,
        {
            i: stub(f.task, f.indent)
            for i, f in enumerate(fences(source))
            if tasks is None or f.task in tasks
        },
    )


def splice(reference: str, student: str, task_id: str) -> str:
    """The reference source with task `task_id`'s fence bodies taken from the student's source.

    The fences of that task are matched in order; a student body written at another indentation
    is moved to the reference's. Everything outside them, and every other task's fences, stay
    the reference's: this is how the grader tests one task alone.

    Raises:
        ValueError: if the student's source has a different number of that task's fences
            (a fence line was deleted or edited).
    """
    ours = {i: f for i, f in enumerate(fences(reference)) if f.task == task_id}
    theirs = [f for f in fences(student) if f.task == task_id]
    if len(theirs) != len(ours):
        raise ValueError(
            f"task {task_id} has {len(ours)} solution fences here, the student's file has "
            f"{len(theirs)}: keep the '# BEGIN SOLUTION {task_id}' and '# END SOLUTION' lines"
        )
    bodies = {
        i: _reindent(f.body, f.indent, ref.indent)
        for (i, ref), f in zip(ours.items(), theirs, strict=True)
    }
    return _replace_bodies(reference, bodies)


def _reindent(body: str, old: str, new: str) -> str:
    """Move every line of `body` from indentation `old` to `new` (blank lines stay blank)."""
    lines = body.splitlines(keepends=True)
    return "".join(
        new + line[len(old) :] if line.startswith(old) and line.strip() else line
        for line in lines
    )


def solution_lines(source: str) -> set[str]:
    """The stripped, non-blank lines that occur only inside solution fences of `source`."""
    inside, outside, fenced = set(), set(), False
    for line in source.splitlines():
        text = line.strip()
        if text.startswith((BEGIN, END)):
            fenced = text.startswith(BEGIN)
        elif text:
            (inside if fenced else outside).add(text)
    return inside - outside


def strip_doc_quotes(markdown: str, repo: str | Path) -> str:
    """Replace every titled python quote in `markdown` that shows solution lines of the file it names."""

    def replace(match: re.Match) -> str:
        path = Path(repo) / match["path"]
        if not path.is_file():
            return match[0]
        secret = solution_lines(path.read_text())
        if not any(line.strip() in secret for line in match["body"].splitlines()):
            return match[0]
        indent = match["indent"]
        note = REMOVED_QUOTE.format(path=match["path"]).replace("\n", f"\n{indent}")
        return (
            f"{indent}{match['fence']}python\n{indent}{note}\n{indent}{match['fence']}"
        )

    return _QUOTE.sub(replace, markdown)


def make_student_copy(repo: str | Path, dest: str | Path) -> list[Path]:
    """Copy the project at `repo` to `dest` with every solution in `minipaged/` stripped.

    The docs' quotes of solution code (see `strip_doc_quotes`) are removed too, and so are the
    tests of the course itself (INSTRUCTOR_ONLY), which need the solutions. The copy's ruff
    settings let the stubs lint, and its docs build does not execute the tutorials.

    Returns:
        The files of `dest` whose solutions were stripped.

    Raises:
        FileExistsError: if `dest` exists (nothing is overwritten).
    """
    repo, dest = Path(repo), Path(dest)
    if dest.exists():
        raise FileExistsError(f"dest must not exist yet, got {dest}")
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPIED:
        src = repo / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore, symlinks=True)
        elif src.exists():
            shutil.copy2(src, dest / name)
    for path in INSTRUCTOR_ONLY:
        (dest / path).unlink(missing_ok=True)
    for page in sorted((dest / "docs").rglob("*.md")):
        # quotes checked against the solutions
        page.write_text(strip_doc_quotes(page.read_text(), repo))
    stripped = []
    for path in sorted((dest / "minipaged").rglob("*.py")):
        text = path.read_text()
        # this file's docstring shows a stubbed fence: an example, nothing to strip
        if BEGIN in text and path.name != "assignments.py":
            path.write_text(strip_solutions(text))
            stripped.append(path)
    _let_stubs_lint(dest / "pyproject.toml", [p.relative_to(dest) for p in stripped])
    _do_not_execute_tutorials(dest / "mkdocs.yml")
    return stripped


def _let_stubs_lint(pyproject: Path, stripped: list[Path]) -> None:
    """Tell ruff that a stubbed file may import or compute what only its solutions use.

    Without this `make lint` fails on the stubs (an import only a solution uses is F401), and
    `make format` (ruff check --fix) would delete imports the student needs.
    """
    text = pyproject.read_text()
    lines = [
        f'"{path.as_posix()}" = {STUB_LINT_IGNORES}  # the stubs leave these unused'
        for path in stripped
        if f'"{path.as_posix()}" = ' not in text  # a copy of a copy has them
    ]
    header = "[tool.ruff.lint.per-file-ignores]\n"
    if header not in text:
        raise ValueError(f"{pyproject} has no {header.strip()} table to extend")
    pyproject.write_text(text.replace(header, header + "\n".join(lines) + "\n", 1))


def _do_not_execute_tutorials(mkdocs_yml: Path) -> None:
    """The tutorials call the tasks' functions: the student copy's docs show them unexecuted."""
    text = mkdocs_yml.read_text()
    executed = re.compile(r"^(\s*)execute: true\b.*$", re.M)
    if re.search(r"^\s*execute: false\b", text, re.M):
        return  # a copy of a student copy
    if not executed.search(text):
        raise ValueError(f"{mkdocs_yml} does not execute the tutorials as expected")
    note = "  # the student copy: the tutorials call the tasks' stubs"
    mkdocs_yml.write_text(executed.sub(rf"\1execute: false{note}", text, count=1))
