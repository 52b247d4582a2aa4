"""The code the docs show fits the docs' content column.

The site's content column holds about 88 characters of code; a wider line hides its end (often
the comment that explains it) behind a scroll bar. So every line of every fenced code block under
docs/ (the block's own indentation, inside an admonition or a list, not counted) and every line of
tutorials/*.py (rendered as pages) is at most `LIMIT` characters. The formatter wraps code to the
same width (`[tool.ruff] line-length` in pyproject.toml), which keeps the quoted source lines of
tests/test_docs_code.py inside the column too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = ROOT / "tutorials"
LIMIT = 88
# A fence of any language: indentation, then ``` or ~~~ (three or more), then the info string.
OPEN_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def code_lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, line without the block's indentation) for every fenced code line."""
    lines = text.splitlines()
    found = []
    i = 0
    while i < len(lines):
        opening = OPEN_FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        close = re.compile(
            rf"^{re.escape(indent)}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$"
        )
        end = i + 1
        while end < len(lines) and not close.match(lines[end]):
            line = lines[end]
            found.append(
                (end + 1, line[len(indent) :] if line.startswith(indent) else line)
            )
            end += 1
        i = end + 1
    return found


def too_wide(lines: list[tuple[int, str]]) -> list[str]:
    return [
        f"line {n} ({len(line)} chars): {line}"
        for n, line in lines
        if len(line) > LIMIT
    ]


PAGES = sorted(DOCS.rglob("*.md"))


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_docs_code_blocks_fit_the_column(page: Path):
    wide = too_wide(code_lines(page.read_text()))
    message = f"docs/{page.relative_to(DOCS)}: code wider than {LIMIT}:\n"
    assert not wide, message + "\n".join(wide)


@pytest.mark.parametrize("path", sorted(TUTORIALS.glob("*.py")), ids=lambda p: p.name)
def test_tutorial_lines_fit_the_column(path: Path):
    lines = list(enumerate(path.read_text().splitlines(), start=1))
    wide = too_wide(lines)
    message = f"tutorials/{path.name}: lines wider than {LIMIT}:\n"
    assert not wide, message + "\n".join(wide)


def test_the_checker_sees_every_block_and_only_code():
    """Guard against passing vacuously: the docs have code blocks, and the parser finds them."""
    assert sum(len(code_lines(page.read_text())) for page in PAGES) > 500
    page = (
        "prose " + "x" * 100 + "\n\n"  # prose: not code, any width
        "```bash\n" + "echo " + "y" * 84 + "\n```\n\n"  # 89 characters: too wide
        '!!! note "In an admonition"\n'
        "    ```python\n"
        "    " + "z" * 88 + "\n"  # 88 once the block's indentation is removed: fits
        "    ```\n\n"
        "~~~~text\n```\n"
        + "w" * 89
        + "\n~~~~\n"  # a ``` line does not close a ~~~~ fence
    )
    lines = code_lines(page)
    assert [n for n, _ in lines] == [4, 9, 13, 14]
    assert [n for n, line in lines if len(line) > LIMIT] == [4, 14]


def test_the_formatter_wraps_code_to_the_column():
    # the [tool.ruff] table, up to the next table (tomllib is Python 3.11+; this runs on 3.10)
    table = re.search(
        r"^\[tool\.ruff\]\n(.*?)^\[", (ROOT / "pyproject.toml").read_text(), re.M | re.S
    )
    assert table, "pyproject.toml has no [tool.ruff] table"
    assert re.search(rf"^line-length = {LIMIT}\b", table[1], re.M), table[1]


RUFF = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))


@pytest.mark.skipif(
    not Path(RUFF).is_file(), reason="ruff is not installed (pip install -e '.[dev]')"
)
@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=" ".join)
def test_ruff_passes(command: list[str]):
    result = subprocess.run(
        [RUFF, *command, "."], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
