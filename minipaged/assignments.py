"""Make the student version of minipaged: every fenced solution body replaced by a stub.

The reference code marks what a student writes with `# BEGIN SOLUTION` / `# END SOLUTION`; the tests
of task M.N carry `@pytest.mark.taskM_N`, so `pytest -m task1_2` grades task 1.2. This module strips
the fences' contents, keeping the fences themselves so the student sees where to write:

    def allocate(self) -> int:
        \"\"\"Take a free block and give it reference count 1.\"\"\"
        # BEGIN SOLUTION
        raise NotImplementedError("write this body: see the docstring")
        # END SOLUTION

Run it as `minipaged assignment DEST` (or `python -m minipaged assignment DEST`): DEST receives a copy
of the package with the solutions stripped, the tests, the tutorials, the docs and the project files.
The docs quote the reference code (```python title="minipaged/..." blocks); a quote that shows a
fenced solution is replaced in the student copy by a line saying so.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
STUB = 'raise NotImplementedError("write this body: see the docstring")'
_FENCE = re.compile(
    rf"^(?P<indent>[ \t]*){re.escape(BEGIN)}\n.*?^(?P=indent){re.escape(END)}\n",
    re.M | re.S,
)
REMOVED_QUOTE = (
    "# Removed from the student copy: this excerpt is a task's solution, in {path}."
)
_QUOTE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,})[ \t]*python[^\n]*?\btitle=\"(?P<path>[^\"]+)\"[^\n]*\n"
    r"(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
    re.M | re.S,
)
COPIED = (
    "minipaged",
    "tests",
    "tutorials",
    "benchmarks",
    "scripts",  # the figure and training scripts: tests replay them
    "docs",
    "pyproject.toml",
    "Makefile",
    "mkdocs.yml",
    "README.md",
)


def strip_solutions(source: str) -> str:
    """Replace the body of every solution fence in `source` with a NotImplementedError stub.

    Raises:
        ValueError: if a fence is opened and never closed at the same indentation.
    """
    stripped, num_fences = _FENCE.subn(
        lambda m: f"{m['indent']}{BEGIN}\n{m['indent']}{STUB}\n{m['indent']}{END}\n",
        source,
    )
    num_begin, num_end = (
        len(re.findall(rf"^[ \t]*{re.escape(mark)}[ \t]*$", source, re.M))
        for mark in (BEGIN, END)
    )
    if not num_begin == num_end == num_fences:
        raise ValueError(
            "unbalanced solution fences: each '# BEGIN SOLUTION' needs an '# END SOLUTION' below it"
        )
    return stripped


def solution_lines(source: str) -> set[str]:
    """The stripped, non-blank lines that occur only inside solution fences of `source`."""
    inside, outside, fenced = set(), set(), False
    for line in source.splitlines():
        text = line.strip()
        if text in (BEGIN, END):
            fenced = text == BEGIN
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
        note = REMOVED_QUOTE.format(path=match["path"])
        return (
            f"{indent}{match['fence']}python\n{indent}{note}\n{indent}{match['fence']}"
        )

    return _QUOTE.sub(replace, markdown)


def make_student_copy(repo: str | Path, dest: str | Path) -> list[Path]:
    """Copy the project at `repo` to `dest` with every solution in `minipaged/` stripped.

    The docs' quotes of solution code (see `strip_doc_quotes`) are removed too.

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
    for page in sorted((dest / "docs").rglob("*.md")):
        # quotes checked against the solutions
        page.write_text(strip_doc_quotes(page.read_text(), repo))
    stripped = []
    for path in sorted((dest / "minipaged").rglob("*.py")):
        text = path.read_text()
        if BEGIN in text:
            path.write_text(strip_solutions(text))
            stripped.append(path)
    return stripped
