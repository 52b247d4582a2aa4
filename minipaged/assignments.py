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
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
STUB = 'raise NotImplementedError("write this body: see the docstring")'
_FENCE = re.compile(rf"^(?P<indent>[ \t]*){re.escape(BEGIN)}\n.*?^(?P=indent){re.escape(END)}\n", re.M | re.S)
COPIED = ("minipaged", "tests", "tutorials", "docs", "pyproject.toml", "Makefile", "mkdocs.yml", "README.md")


def strip_solutions(source: str) -> str:
    """Replace the body of every solution fence in `source` with a NotImplementedError stub.

    Raises:
        ValueError: if a fence is opened and never closed at the same indentation.
    """
    stripped, num_fences = _FENCE.subn(
        lambda m: f"{m['indent']}{BEGIN}\n{m['indent']}{STUB}\n{m['indent']}{END}\n", source
    )
    num_begin, num_end = (
        len(re.findall(rf"^[ \t]*{re.escape(mark)}[ \t]*$", source, re.M)) for mark in (BEGIN, END)
    )
    if not num_begin == num_end == num_fences:
        raise ValueError(
            "unbalanced solution fences: each '# BEGIN SOLUTION' needs an '# END SOLUTION' below it"
        )
    return stripped


def make_student_copy(repo: str | Path, dest: str | Path) -> list[Path]:
    """Copy the project at `repo` to `dest` with every solution in `minipaged/` stripped.

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
    stripped = []
    for path in sorted((dest / "minipaged").rglob("*.py")):
        text = path.read_text()
        if BEGIN in text:
            path.write_text(strip_solutions(text))
            stripped.append(path)
    return stripped
