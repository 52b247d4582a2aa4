"""The decode kernel's launch grid and one tile's walk through the block table, as SVG.

Run from the repository root (`--check` exits 1 if a committed figure is stale):

    PYTHONPATH=. python scripts/draw_kernel_figures.py

Both figures are drawn from the real code, not by hand: the grid from `plan_attention`, the launcher's
own plan (how many chunks, how many tokens each), and the walk from the kernel's translation
`slot = block_table[pos // block_size] * block_size + pos % block_size`, which the tests hold to
`BlockTable.slot`, the reference's. Every drawn program carries `data-decode`, `data-kv-head`,
`data-split`, `data-start` and `data-end`; every drawn table entry of the walk carries `data-tile`,
`data-logical`, `data-physical` and `data-first-slot`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from minipaged.drawing import PALETTE, arrow, document, rect, text
from minipaged.fast.attention import plan_attention
from minipaged.fast.decode import DECODE_BLOCK_N
from minipaged.fast.prefill import PREFILL_BLOCK_M

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img" / "kernels"

# The example step: three decodes of 200, 90 and 150 tokens, 2 KV heads, 2 chunks asked for.
SEQ_LENS = (200, 90, 150)
NUM_KV_HEADS = 2
NUM_SPLITS = 2
# The walk: the first program's chunk, blocks of 16, a table as a busy pool leaves it (scattered).
BLOCK_SIZE = 16
BLOCK_TABLE = (7, 2, 9, 4, 11, 0, 5, 13, 3, 8, 1, 12, 6)  # 13 blocks hold 200 tokens
NUM_POOL_BLOCKS = 16


def grid_programs() -> list[dict]:
    """The decode grid of the example step, one dict a program, from the launcher's own plan."""
    seq_lens = torch.tensor(SEQ_LENS, dtype=torch.int32)
    # every q_len is 1: decodes
    query_start_loc = torch.arange(len(SEQ_LENS) + 1, dtype=torch.int32)
    plan = plan_attention(
        seq_lens, query_start_loc, NUM_KV_HEADS, num_splits=NUM_SPLITS
    )
    programs = []
    for decode, seq in enumerate(plan.decode_seqs.tolist()):
        for kv_head in range(NUM_KV_HEADS):
            for split in range(plan.num_splits):
                start = split * plan.tokens_per_split  # as the kernel computes them
                end = min(start + plan.tokens_per_split, SEQ_LENS[seq])
                programs.append(
                    {
                        "decode": decode,
                        "kv_head": kv_head,
                        "split": split,
                        "start": start,
                        "end": end,
                    }
                )
    return programs


# The prefill example: a mixed step. Sequence 0 computes 70 new tokens after a cached prefix
# of 16, sequence 1 a fresh 40-token prompt, sequence 2 decodes (the decode kernel takes it).
PREFILL_SEQ_LENS = (86, 40, 120)
PREFILL_Q_LENS = (70, 40, 1)
PREFILL_NUM_HEADS = 2


def prefill_programs() -> list[dict]:
    """The prefill grid (num_heads, cdiv(max_q_len, BLOCK_M), num_prefills), from the plan.

    Each program's rows are `tile_m * BLOCK_M ..` of its sequence's q_len new tokens; `last`
    is one past the last position any of them may see (the kernel's reach); a tile starting
    past q_len is empty and returns at once.
    """
    seq_lens = torch.tensor(PREFILL_SEQ_LENS, dtype=torch.int32)
    starts = [0]
    for q_len in PREFILL_Q_LENS:
        starts.append(starts[-1] + q_len)
    query_start_loc = torch.tensor(starts, dtype=torch.int32)
    plan = plan_attention(seq_lens, query_start_loc, PREFILL_NUM_HEADS)
    num_tiles = -(-plan.max_prefill_q_len // PREFILL_BLOCK_M)
    programs = []
    for prefill, seq in enumerate(plan.prefill_seqs.tolist()):
        seq_len, q_len = PREFILL_SEQ_LENS[seq], PREFILL_Q_LENS[seq]
        for head in range(PREFILL_NUM_HEADS):
            for tile_m in range(num_tiles):
                first_row = tile_m * PREFILL_BLOCK_M
                rows_end = max(first_row, min(first_row + PREFILL_BLOCK_M, q_len))
                last = min(seq_len, seq_len - q_len + (tile_m + 1) * PREFILL_BLOCK_M)
                programs.append(
                    {
                        "head": head,
                        "tile_m": tile_m,
                        "prefill": prefill,
                        "seq": seq,
                        "first_row": first_row,
                        "rows_end": rows_end,
                        "last": last if first_row < q_len else 0,
                    }
                )
    return programs


def prefill_grid_svg() -> str:
    """The prefill grid of the mixed example step: a cell per program, its rows, its reach."""
    programs = prefill_programs()
    num_tiles = max(p["tile_m"] for p in programs) + 1
    num_prefills = max(p["prefill"] for p in programs) + 1
    cell_w, cell_h, left, top = 122, 40, 110, 56
    head_w = num_tiles * (cell_w + 10)
    cached = PREFILL_SEQ_LENS[0] - PREFILL_Q_LENS[0]
    parts = [
        text(
            12, 20, "The prefill grid: a program per (head, tile of rows, prefill)", "t"
        ),
        text(
            12,
            36,
            f"q_lens {list(PREFILL_Q_LENS[:2])}, the first after {cached} cached tokens; "
            f"BLOCK_M {PREFILL_BLOCK_M}; the step's decode (q_len 1) goes to the decode kernel",
            "s",
        ),
    ]
    for head in range(PREFILL_NUM_HEADS):
        x = left + head * (head_w + 16) + head_w / 2
        parts.append(text(x, top - 6, f"head {head}", "", "middle"))
    for p in programs:
        x = left + p["head"] * (head_w + 16) + p["tile_m"] * (cell_w + 10)
        y = top + p["prefill"] * (cell_h + 10)
        empty = p["first_row"] >= p["rows_end"]
        attrs = "".join(f' data-{k.replace("_", "-")}="{v}"' for k, v in p.items())
        fill = "#F5F5F5" if empty else PALETTE[p["seq"] % len(PALETTE)] + "22"
        parts.append(f"<g{attrs}>" + rect(x, y, cell_w, cell_h, "b", fill))
        parts.append(
            text(x + 6, y + 15, f"pid ({p['head']}, {p['tile_m']}, {p['prefill']})")
        )
        if empty:
            label = "returns: tile past q_len"
        else:
            label = f"rows {p['first_row']}..{p['rows_end'] - 1}, keys < {p['last']}"
        parts.append(text(x + 6, y + 30, label, "s") + "</g>")
    for prefill in range(num_prefills):
        seq = next(p["seq"] for p in programs if p["prefill"] == prefill)
        label = f"seq {seq} ({PREFILL_Q_LENS[seq]} new)"
        parts.append(text(12, top + prefill * (cell_h + 10) + 24, label))
    width = left + PREFILL_NUM_HEADS * (head_w + 16) + 4
    height = top + num_prefills * (cell_h + 10) + 6
    return document("\n".join(parts), width, height, "The prefill kernel's launch grid")


def tile_walk(start: int, end: int) -> list[dict]:
    """Each BLOCK_N tile of positions start .. end - 1 and the table entries it reads.

    One entry per logical block a tile touches: the kernel loads `block_tables[seq, pos //
    block_size]` once per position, and the positions of one block share an entry.
    """
    entries = []
    for tile, first in enumerate(range(start, end, DECODE_BLOCK_N)):
        positions = range(first, min(first + DECODE_BLOCK_N, end))
        for logical in sorted({pos // BLOCK_SIZE for pos in positions}):
            physical = BLOCK_TABLE[logical]
            entries.append(
                {
                    "tile": tile,
                    "logical": logical,
                    "physical": physical,
                    "first_slot": physical * BLOCK_SIZE,
                }
            )
    return entries


def launch_grid_svg() -> str:
    """The grid (num_decodes, num_kv_heads, num_splits): a cell per program, its chunk of tokens."""
    programs = grid_programs()
    num_splits = max(p["split"] for p in programs) + 1
    cell_w, cell_h, head_w, left, top = 108, 40, 2 * 108 + 12, 96, 56
    parts = [
        text(12, 20, "The decode grid: one program per (decode, KV head, chunk)", "t"),
        text(
            12,
            36,
            f"seq_lens {list(SEQ_LENS)}, {NUM_KV_HEADS} KV heads, {num_splits} chunks "
            f"of {programs[1]['start']} tokens (plan_attention)",
            "s",
        ),
    ]
    for kv_head in range(NUM_KV_HEADS):
        parts.append(
            text(
                left + kv_head * (head_w + 16) + head_w / 2,
                top - 6,
                f"KV head {kv_head}",
                "",
                "middle",
            )
        )
    for p in programs:
        x = left + p["kv_head"] * (head_w + 16) + p["split"] * (cell_w + 12)
        y = top + p["decode"] * (cell_h + 10)
        empty = p["start"] >= p["end"]
        attrs = "".join(
            f' data-{key.replace("_", "-")}="{value}"' for key, value in p.items()
        )
        fill = "#F5F5F5" if empty else PALETTE[p["decode"] % len(PALETTE)] + "22"
        parts.append(f"<g{attrs}>" + rect(x, y, cell_w, cell_h, "b", fill))
        parts.append(
            text(x + 6, y + 15, f"pid ({p['decode']}, {p['kv_head']}, {p['split']})")
        )
        label = (
            "empty: start >= seq_len"
            if empty
            else f"tokens {p['start']} .. {p['end'] - 1}"
        )
        parts.append(text(x + 6, y + 30, label, "s") + "</g>")
    for decode, seq_len in enumerate(SEQ_LENS):
        parts.append(
            text(12, top + decode * (cell_h + 10) + 24, f"decode {decode} ({seq_len})")
        )
    width = left + NUM_KV_HEADS * (head_w + 16) + 4
    height = top + len(SEQ_LENS) * (cell_h + 10) + 6
    return document("\n".join(parts), width, height, "The decode kernel's launch grid")


def tile_walk_svg() -> str:
    """Program (0, 0, 0): its tiles of BLOCK_N positions, the table entries each reads, the pool."""
    first = grid_programs()[0]
    entries = tile_walk(first["start"], first["end"])
    box_w, gap, left = 44, 6, 96
    y_tiles, y_table, y_pool = 50, 100, 190
    parts = [
        text(
            12,
            20,
            f"One program's walk: tiles of {DECODE_BLOCK_N} positions, blocks of {BLOCK_SIZE}",
            "t",
        ),
        text(
            12,
            36,
            "program (0, 0, 0); slot = block_table[pos // block_size] * block_size + pos % block_size",
            "m",
        ),
        text(12, y_tiles + 20, "tiles"),
        text(12, y_table + 20, "block table"),
        text(12, y_pool + 20, "device pool"),
    ]
    num_tiles = max(e["tile"] for e in entries) + 1
    per_tile = DECODE_BLOCK_N // BLOCK_SIZE
    for tile in range(num_tiles):
        x = left + tile * per_tile * (box_w + gap)
        color = PALETTE[tile % len(PALETTE)]
        lo = first["start"] + tile * DECODE_BLOCK_N
        hi = min(lo + DECODE_BLOCK_N, first["end"]) - 1
        parts.append(
            rect(x, y_tiles, per_tile * (box_w + gap) - gap, 30, "b", color + "33")
        )
        parts.append(text(x + 6, y_tiles + 19, f"tile {tile}: positions {lo} .. {hi}"))
    for block in range(NUM_POOL_BLOCKS):
        x = left + block * (box_w + gap) / 1.25
        read = [e for e in entries if e["physical"] == block]
        fill = PALETTE[read[0]["tile"] % len(PALETTE)] + "55" if read else ""
        parts.append(rect(x, y_pool, box_w / 1.25 - 2, 30, "b" if read else "f", fill))
        parts.append(text(x + box_w / 2.5 - 1, y_pool + 19, str(block), "", "middle"))
    for i, entry in enumerate(entries):
        x = left + i * (box_w + gap)
        color = PALETTE[entry["tile"] % len(PALETTE)]
        attrs = "".join(
            f' data-{key.replace("_", "-")}="{value}"' for key, value in entry.items()
        )
        parts.append(f"<g{attrs}>" + rect(x, y_table, box_w, 34, "b"))
        parts.append(
            text(
                x + box_w / 2,
                y_table + 14,
                f"{entry['logical']} → {entry['physical']}",
                "",
                "middle",
            )
        )
        parts.append(
            text(
                x + box_w / 2,
                y_table + 27,
                f"slot {entry['first_slot']}+",
                "s",
                "middle",
            )
        )
        pool_x = left + entry["physical"] * (box_w + gap) / 1.25 + box_w / 2.5 - 1
        parts.append(arrow(x + box_w / 2, y_table + 34, pool_x, y_pool, color) + "</g>")
    width = left + max(len(entries), NUM_POOL_BLOCKS / 1.25) * (box_w + gap) + 8
    return document(
        "\n".join(parts),
        width,
        y_pool + 42,
        "One decode program's walk through the block table",
    )


def build_figures() -> dict[str, str]:
    """File name -> SVG text of every kernel figure."""
    return {
        "decode-grid.svg": launch_grid_svg(),
        "decode-tile-walk.svg": tile_walk_svg(),
        "prefill-grid.svg": prefill_grid_svg(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a committed figure is stale"
    )
    args = parser.parse_args(argv)
    stale = []
    for name, svg in build_figures().items():
        path = OUT / name
        if path.exists() and path.read_text() == svg:
            continue
        stale.append(name)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(svg)
    if args.check and stale:
        print(f"stale: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
