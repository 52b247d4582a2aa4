"""The kernel pages' figures are drawn from the code: the launcher's plan and the table walk.

scripts/draw_kernel_figures.py draws the decode grid from `plan_attention` and one program's walk
through the block table. These tests parse the SVG back and hold it to the reference: every drawn
program's chunk is the kernel's `start .. end`, every drawn table entry's slot is what
`BlockTable.slot` translates, and the committed files are what the script draws now.
"""

from __future__ import annotations

import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from minipaged.reference.block_table import BlockTable

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "draw_kernel_figures", ROOT / "scripts" / "draw_kernel_figures.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


figures = _load_script()
SVG = "{http://www.w3.org/2000/svg}"


def groups(svg: str, key: str) -> list[dict[str, int]]:
    """The data attributes of every <g> that has `data-<key>`, as ints."""
    root = ET.fromstring(svg)
    found = []
    for g in root.iter(f"{SVG}g"):
        attrs = {k[5:]: int(v) for k, v in g.attrib.items() if k.startswith("data-")}
        if key in attrs:
            found.append(attrs)
    return found


def test_the_grid_is_the_launchers_plan():
    programs = groups(figures.launch_grid_svg(), "split")
    seq_lens = figures.SEQ_LENS
    num_splits = max(p["split"] for p in programs) + 1
    # one cell a program
    assert len(programs) == len(seq_lens) * figures.NUM_KV_HEADS * num_splits
    tokens_per_split = programs[1]["start"]
    assert tokens_per_split % figures.DECODE_BLOCK_N == 0  # chunks are whole tiles
    for p in programs:
        start = p["split"] * tokens_per_split
        assert (p["start"], p["end"]) == (
            start,
            min(start + tokens_per_split, seq_lens[p["decode"]]),
        )
    # together the non-empty chunks of a decode cover its tokens exactly once, for each head
    for decode, seq_len in enumerate(seq_lens):
        for head in range(figures.NUM_KV_HEADS):
            mine = [
                p for p in programs if p["decode"] == decode and p["kv-head"] == head
            ]
            covered = [t for p in mine for t in range(p["start"], p["end"])]
            assert covered == list(range(seq_len))


def test_every_walked_entry_translates_as_the_reference_table_does():
    table = BlockTable(figures.BLOCK_SIZE)
    table.append_tokens(figures.SEQ_LENS[0], iter(figures.BLOCK_TABLE).__next__)
    entries = groups(figures.tile_walk_svg(), "tile")
    first = figures.grid_programs()[0]
    walked = set()
    for e in entries:
        assert e["physical"] == table.block_ids[e["logical"]]
        assert e["first-slot"] == table.slot(e["logical"] * figures.BLOCK_SIZE)
        walked.add(e["logical"])
        tile_positions = range(
            first["start"] + e["tile"] * figures.DECODE_BLOCK_N,
            min(
                first["start"] + (e["tile"] + 1) * figures.DECODE_BLOCK_N, first["end"]
            ),
        )
        assert e["logical"] in {pos // figures.BLOCK_SIZE for pos in tile_positions}
    assert walked == {
        pos // figures.BLOCK_SIZE for pos in range(first["start"], first["end"])
    }


def test_the_prefill_grid_is_the_launchers_plan_and_each_tile_reaches_what_its_rows_see():
    programs = groups(figures.prefill_grid_svg(), "tile-m")
    block_m = figures.PREFILL_BLOCK_M
    prefilled = [s for s, q in enumerate(figures.PREFILL_Q_LENS) if q > 1]
    assert (
        sorted({p["seq"] for p in programs}) == prefilled
    )  # decodes take the other kernel
    max_q = max(figures.PREFILL_Q_LENS[s] for s in prefilled)
    assert len(programs) == figures.PREFILL_NUM_HEADS * -(-max_q // block_m) * len(
        prefilled
    )
    for p in programs:
        seq_len, q_len = (
            figures.PREFILL_SEQ_LENS[p["seq"]],
            figures.PREFILL_Q_LENS[p["seq"]],
        )
        rows = range(p["first-row"], p["rows-end"])
        assert p["first-row"] == p["tile-m"] * block_m
        assert list(rows) == [
            r for r in range(p["first-row"], p["first-row"] + block_m) if r < q_len
        ]
        if (
            rows
        ):  # every row sees positions 0 .. its own; the reach covers them and no more
            positions = [seq_len - q_len + r for r in rows]
            assert p["last"] == max(positions) + 1
    for seq in prefilled:  # each real row of each head is in exactly one tile
        for head in range(figures.PREFILL_NUM_HEADS):
            tiles = [p for p in programs if p["seq"] == seq and p["head"] == head]
            rows = [r for p in tiles for r in range(p["first-row"], p["rows-end"])]
            assert rows == list(range(figures.PREFILL_Q_LENS[seq]))


def test_the_committed_figures_are_up_to_date_and_embedded():
    for name, svg in figures.build_figures().items():
        path = ROOT / "docs" / "img" / "kernels" / name
        assert path.read_text() == svg, (
            "stale: run `PYTHONPATH=. python scripts/draw_kernel_figures.py`"
        )
        assert not re.search(r"(href|src)=\"https?://", svg)
        kernel = "triton-prefill" if name.startswith("prefill") else "triton-decode"
        page = (ROOT / "docs" / "kernels" / f"{kernel}.md").read_text()
        assert f"](../img/kernels/{name})" in page
