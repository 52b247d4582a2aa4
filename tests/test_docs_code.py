"""The code the docs quote is the code in the repository.

A docs page that quotes library code marks the block with the file it comes from:

    ```python title="minipaged/reference/attention.py"

For every such block under docs/, each non-blank line of the block (stripped of leading and trailing
whitespace) must appear in that file, in the same order: the quote may leave lines out, but may not
change, add or reorder any. So when the code changes, the page that explains it fails here until it
is updated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# A fence that opens a python block: indentation (blocks inside admonitions are indented), the fence
# itself (``` or ~~~, three or more), the language, then attributes such as title="...".
OPEN_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?:python|py)\b(?P<attrs>.*)$"
)
TITLE = re.compile(r"""\btitle=(?P<q>["'])(?P<title>.+?)(?P=q)""")
# Titles that claim to be a file of this repository: such a file must exist.
REPO_DIRS = ("minipaged/", "tests/", "tutorials/", "docs/")


@dataclass
class Quote:
    page: Path  # the markdown file
    line: int  # 1-based line of the opening fence
    title: str  # the file the block quotes, relative to the repo root
    lines: list[str]  # the block's lines, fence lines excluded

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(DOCS)}:{self.line}"


def titled_python_blocks(page: Path) -> list[Quote]:
    """Every fenced python block of `page` whose fence line carries a title="..." attribute."""
    quotes = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = OPEN_FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, indent = opening["fence"], opening["indent"]
        close = re.compile(
            rf"^{re.escape(indent)}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$"
        )
        end = i + 1
        while end < len(lines) and not close.match(lines[end]):
            end += 1
        title = TITLE.search(opening["attrs"])
        if title:
            quotes.append(Quote(page, i + 1, title["title"], lines[i + 1 : end]))
        i = end + 1
    return quotes


def first_missing_line(quoted: list[str], source: list[str]) -> str | None:
    """The first non-blank quoted line that is not in `source` after the previous one; None if all are.

    Lines are compared stripped, so indentation may differ. Matching each quoted line to its earliest
    occurrence after the previous match finds a subsequence whenever one exists.
    """
    stripped = [line.strip() for line in source]
    position = 0
    for line in (q.strip() for q in quoted):
        if not line:
            continue
        try:
            position = stripped.index(line, position) + 1
        except ValueError:
            return line
    return None


def all_quotes() -> list[Quote]:
    return [
        quote
        for page in sorted(DOCS.rglob("*.md"))
        for quote in titled_python_blocks(page)
    ]


def quoted_files(quotes: list[Quote]) -> list[Quote]:
    """The quotes whose title names a file of the repository (or claims to, by its folder)."""
    return [
        q for q in quotes if (ROOT / q.title).is_file() or q.title.startswith(REPO_DIRS)
    ]


QUOTES = quoted_files(all_quotes())


@pytest.mark.parametrize("quote", QUOTES, ids=[q.id for q in QUOTES])
def test_quoted_code_is_in_its_file(quote: Quote):
    page = quote.page.relative_to(ROOT)
    path = ROOT / quote.title
    assert path.is_file(), (
        f"{page} line {quote.line} quotes {quote.title}, which is not a file of the repo"
    )
    assert any(line.strip() for line in quote.lines), (
        f"{page} line {quote.line}: empty quote of {quote.title}"
    )
    missing = first_missing_line(quote.lines, path.read_text().splitlines())
    assert missing is None, (
        f"{page} quotes {quote.title} (block at line {quote.line}), but this line is not in the file "
        f"(or not in this order): {missing!r}"
    )


@pytest.mark.parametrize(
    "page",
    ["concepts/writing-through-the-table.md", "concepts/reading-through-the-table.md"],
)
def test_the_kernel_pages_quote_code(page):
    """Guard against passing vacuously: these pages explain the reference code by quoting it."""
    titles = {q.title for q in QUOTES if q.page == DOCS / page}
    if not titles and "Removed from the student copy" in (DOCS / page).read_text():
        # a student copy (minipaged/assignments.py): its solution quotes were removed
        return
    assert titles, (
        f'docs/{page} has no ```python title="..." block quoting a file of the repo'
    )
    assert all((ROOT / title).is_file() for title in titles)


def test_the_checker_catches_a_changed_line_and_a_reordering():
    source = ["def f(x):", '    """Doc."""', "    y = x + 1", "    return y"]
    # lines left out: fine
    assert first_missing_line(["def f(x):", "", "  return y"], source) is None
    assert first_missing_line(["def f(x):", "    y = x + 2"], source) == "y = x + 2"
    assert first_missing_line(["return y", "y = x + 1"], source) == "y = x + 1"


def test_the_parser_reads_titles_inside_admonitions(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n"
        '```python title="minipaged/backend.py"\n'
        "import torch\n"
        "```\n\n"
        "```python\n"
        "untitled = 1\n"
        "```\n\n"
        '??? note "Answer"\n'
        '    ```py title="minipaged/testing.py"\n'
        "    import math\n"
        "    ```\n"
    )
    quotes = titled_python_blocks(page)
    assert [(q.line, q.title, q.lines) for q in quotes] == [
        (3, "minipaged/backend.py", ["import torch"]),
        (12, "minipaged/testing.py", ["    import math"]),
    ]
