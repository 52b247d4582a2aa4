"""The numbers on the experiments' docs pages, generated from their JSON so the two cannot drift apart.

OS idea: a value that exists in two places must have one source and a derived copy (the kernel
generates /proc from its own counters instead of keeping a second, hand-written table; make rebuilds
a derived file when its source changes). KV counterpart: every figure on docs/experiments/NAME.md that
comes from a measurement (the tables of the vLLM paper's figures measured here, and the numbers the
prose quotes) is derived from docs/experiments/img/NAME.json, the run's own output.

A page marks each generated part with an HTML comment pair, invisible once rendered:

    <!-- gen:results -->            a block (a table, a code block): blank lines around it

    | block size | ... |

    <!-- /gen -->
    ... the fastest step, <!-- gen:fastest -->1.71 ms<!-- /gen -->, ...    (inline, in a sentence)

`render(name, data)` gives the text of every part of one page from its JSON (renderers in
page_tables.py, page_tables_sharing.py and page_tables_timed.py); `sync_page` rewrites the parts,
`stale_parts` lists the parts that differ. scripts/make_experiment_figures.py rewrites the pages
after each run (`--pages-only`: from the JSON alone, running nothing); tests/test_experiment_docs.py
fails when a page and its JSON disagree.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from minipaged.experiments import (
    page_tables,
    page_tables_chunked,
    page_tables_decoding,
    page_tables_serving,
    page_tables_sharing,
    page_tables_timed,
)

RENDERERS = {  # page -> its renderer: JSON of a run -> {part: text}
    "memory-waste": page_tables.memory_waste,
    "serving": page_tables_serving.serving,
    "serving-measured": page_tables_serving.serving_measured,
    "decoding": page_tables_decoding.decoding,
    "batch-size": page_tables.batch_size,
    "sharing": page_tables_sharing.sharing,
    "shared-prefix": page_tables_sharing.shared_prefix,
    "block-size": page_tables_timed.block_size,
    "swap-vs-recompute": page_tables_timed.swap_vs_recompute,
    "chunked-prefill": page_tables_chunked.chunked_prefill,
    "index": page_tables_timed.json_example,
}

DOCS = Path(__file__).resolve().parents[2] / "docs" / "experiments"
# Which JSON feeds which page: each experiment its own page, and the index shows one row of swap's.
PAGES = {
    "memory-waste": ("memory-waste.md", "memory-waste"),
    "serving": ("serving.md", "serving"),
    # serving --measured --json
    "serving-measured": ("serving-measured.md", "serving-measured"),
    "decoding": ("decoding.md", "decoding"),
    "batch-size": ("batch-size.md", "batch-size"),
    "sharing": ("sharing.md", "sharing"),
    "shared-prefix": ("shared-prefix.md", "shared-prefix"),
    "block-size": ("block-size.md", "block-size"),
    "swap-vs-recompute": ("swap-vs-recompute.md", "swap-vs-recompute"),
    "chunked-prefill": ("chunked-prefill.md", "chunked-prefill"),
    "index": ("index.md", "swap-vs-recompute"),
}
PART = re.compile(r"<!-- gen:(?P<key>[\w.-]+) -->(?P<body>.*?)<!-- /gen -->", re.DOTALL)


def render(page: str, data: dict) -> dict[str, str]:
    """Every generated part of `page` (a key of PAGES), rendered from its experiment's JSON `data`."""
    return RENDERERS[page](data)


def _body(text: str) -> str:
    """What sits between the markers: a block (several lines, or a table or a fence) stands apart."""
    return f"\n\n{text}\n\n" if "\n" in text or text.startswith(("|", "```")) else text


def stale_parts(page_text: str, parts: dict[str, str]) -> list[str]:
    """The problems of a page against its parts: a part that differs, is missing or is unknown, or an
    inline part whose comment starts a line (Markdown would end the paragraph there: move a word of
    the line before onto its line)."""
    found = {m["key"]: m["body"] for m in PART.finditer(page_text)}
    problems = [
        f"{m['key']}: an inline part starts a line"
        for m in PART.finditer(page_text)
        if "\n" not in m["body"]
        and page_text[: m.start()].split("\n")[-1].strip() == ""
    ]
    problems += [f"{key}: not on the page" for key in parts if key not in found]
    problems += [
        f"{key}: no such part (known: {', '.join(parts)})"
        for key in found
        if key not in parts
    ]
    problems += [
        f"{key}: the page says {found[key].strip()!r}, the JSON gives {text!r}"
        for key, text in parts.items()
        if key in found and found[key] != _body(text)
    ]
    return problems


def sync_page(page_text: str, parts: dict[str, str]) -> str:
    """The page with each marked part replaced by its rendering (unknown keys are left alone)."""

    def replace(match: re.Match) -> str:
        key = match["key"]
        body = _body(parts[key]) if key in parts else match["body"]
        return f"<!-- gen:{key} -->{body}<!-- /gen -->"

    return PART.sub(replace, page_text)


def page_parts(page: str, docs: Path = DOCS) -> dict[str, str]:
    """The parts of `page` rendered from the JSON under docs/img/."""
    _, experiment = PAGES[page]
    return render(page, json.loads((docs / "img" / f"{experiment}.json").read_text()))


def sync_pages(names: list[str] | None = None, docs: Path = DOCS) -> list[Path]:
    """Rewrite the generated parts of the pages fed by experiments `names` (all if None); returns
    the pages that changed."""
    changed = []
    for page, (filename, experiment) in PAGES.items():
        if names is not None and experiment not in names:
            continue
        path = docs / filename
        text = path.read_text()
        new = sync_page(text, page_parts(page, docs))
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


__all__ = [
    "DOCS",
    "PAGES",
    "RENDERERS",
    "page_parts",
    "render",
    "stale_parts",
    "sync_page",
    "sync_pages",
]
