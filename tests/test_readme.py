"""The README's quickstart runs, and prints what its comments say it prints."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


def test_readme_quickstart_prints_what_it_says():
    (code,) = python_blocks(ROOT / "README.md")
    # Each `print(...)  # expected: why` line must print `expected` (the comment up to ": ").
    expected = [
        line.split("#", 1)[1].strip().split(": ")[0]
        for line in code.splitlines()
        if line.startswith("print(") and "#" in line
    ]
    printed: list[str] = []
    exec(
        compile(code, "README.md", "exec"),
        {"print": lambda *args: printed.append(" ".join(map(str, args)))},
    )
    assert printed == expected
    assert len(expected) >= 4
