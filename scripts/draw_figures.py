"""Redraw the docs' memory pictures from the worked examples: docs/img/concepts/*.svg, overview.svg.

    PYTHONPATH=. python scripts/draw_figures.py            # rewrite every figure
    PYTHONPATH=. python scripts/draw_figures.py --check    # exit 1 if a committed figure is stale

Each concept page from pages-and-frames to swapping works one example by hand (a pool size, a block
size, some sequences and the calls made on them). FIGURES replays each example on a real
BlockManager and draws what the manager holds after each step with minipaged.drawing, so the
pictures show the code's state, not a drawing of it. A figure names the phrases of its page that fix
the example (`anchors`) and the caption the page embeds it with; tests/test_drawing.py checks that
the page still says both and that the committed SVG equals what this script draws now. Change a
worked example, or the drawing, and that test fails until this script is run again.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from minipaged.drawing import PALETTE, compose, document, draw_panel, rect, text
from minipaged.reference import BlockManager
from minipaged.sequence import Sequence as Seq
from minipaged.sequence import SequenceGroup

DOCS = Path(__file__).resolve().parents[1] / "docs"


@dataclass(frozen=True)
class Figure:
    """One concept page's figure: how to draw it and what the page must say about it."""

    page: str  # the page's file name under docs/concepts, without .md
    caption: str  # the page embeds it as ![caption](../img/concepts/PAGE.svg)
    # phrases of the page's worked example that this figure replays
    anchors: tuple[str, ...]
    draw: Callable[[], str]

    @property
    def path(self) -> str:
        return f"img/concepts/{self.page}.svg"

    @property
    def embed(self) -> str:
        return f"![{self.caption}](../{self.path})"


def _group(request_id: str, *seqs: Seq) -> SequenceGroup:
    return SequenceGroup(request_id, list(seqs), arrival_time=0.0)


def _write(manager: BlockManager, seq: Seq, token: int) -> list[tuple[int, int]]:
    """The model produced `token` for `seq`: append it and give it a slot (the engine's step)."""
    seq.append_token_id(token)
    return manager.append_slots(seq)


def pages_and_frames() -> str:
    manager = BlockManager(block_size=4, num_gpu_blocks=8, watermark=0.0)
    a, b = Seq(list(range(1, 7)), seq_id=0), Seq(list(range(11, 16)), seq_id=1)
    manager.allocate(_group("A", a))
    manager.allocate(_group("B", b))
    title = "A's 6-token prompt, then B's 5-token prompt: 2 blocks each, from one pool"
    return compose(
        [draw_panel(manager, {0: "A", 1: "B"}, title=title)], "Pages and frames"
    )


def page_table() -> str:
    """Sequence S gets blocks 7, 2, 9: other sequences hold the rest of a 10-block pool."""
    manager = BlockManager(block_size=4, num_gpu_blocks=10, watermark=0.0)
    others = [Seq([1, 2, 3, 4], seq_id=i) for i in range(10)]
    for seq in others:  # seq i holds block i
        manager.allocate(_group(f"other{seq.seq_id}", seq))
    # the free list is a stack: 7 is handed out first, then 2, then 9
    for i in (9, 2, 7):
        manager.free(others[i])
    seq = Seq(list(range(100, 110)), seq_id=10)
    manager.allocate(_group("S", seq))
    title = "BlockTable(block_size=4, block_ids=[7, 2, 9], num_tokens=10): positions above, slots below"
    panel = draw_panel(manager, {10: "S"}, seqs=[10], title=title, show_slots=True)
    return compose([panel], "The page table")


def frame_allocator() -> str:
    """The page's allocator calls, made by sequences: A and B allocate, C = fork(A), B frees."""
    manager = BlockManager(block_size=4, num_gpu_blocks=4, watermark=0.0)
    a, b, c = (
        Seq([1, 2, 3, 4], seq_id=0),
        Seq([5, 6, 7, 8], seq_id=1),
        Seq([1, 2, 3, 4], seq_id=2),
    )
    names = {0: "A", 1: "B", 2: "C"}
    manager.allocate(_group("A", a))  # allocate() -> 0
    manager.allocate(_group("B", b))  # allocate() -> 1
    manager.fork(a, c)  # incref(0) -> 2
    title = "allocate() -> 0, allocate() -> 1, incref(0) -> 2: block 0 has two holders"
    first = draw_panel(manager, names, title=title, show_free_list=True)
    manager.free(b)  # free(1) -> 0
    title = "free(1) -> 0: block 1 is released, back on top of the free list"
    second = draw_panel(manager, names, title=title, show_free_list=True)
    return compose([first, second], "The frame allocator")


def demand_paging() -> str:
    manager = BlockManager(block_size=4, num_gpu_blocks=10, watermark=0.1)
    seq = Seq([101, 102, 103, 104, 105, 106, 107], seq_id=0)
    manager.allocate(_group("A", seq))
    panels = [
        draw_panel(
            manager, {0: "A"}, title="len(seq) = 7: the prompt takes blocks 0 and 1"
        )
    ]
    for token in range(201, 207):
        _write(manager, seq, token)
        if len(seq) == 9:
            title = "len(seq) = 9: the 9th token finds block 1 full and gets block 2"
            panels.append(draw_panel(manager, {0: "A"}, title=title))
    title = "len(seq) = 13: block 3, and never a block before it is needed"
    panels.append(draw_panel(manager, {0: "A"}, title=title))
    return compose(panels, "Demand paging")


def fork() -> str:
    manager = BlockManager(block_size=4, num_gpu_blocks=8)
    parent = Seq(list(range(100, 110)), seq_id=0)
    beams = _group("beams", parent)
    manager.allocate(beams)
    for seq_id in (1, 2):
        # as parent.fork(), with a fixed id
        child = Seq(list(parent.token_ids), seq_id=seq_id)
        beams.add(child)
        manager.fork(parent, child)
    names = {0: "P", 1: "C1", 2: "C2"}  # parent, child 1, child 2
    first = draw_panel(
        manager, names, title="after two forks: three tables, three blocks, ref count 3"
    )
    manager.free(child)
    second = draw_panel(
        manager, names, title="after freeing child 2: ref count 2, nothing released"
    )
    return compose([first, second], "Fork and shared pages")


def copy_on_write() -> str:
    manager = BlockManager(block_size=4, num_gpu_blocks=8, watermark=0.0)
    prompt = [101, 102, 103, 104, 105, 106, 107]
    a1, a2 = Seq(list(prompt), seq_id=0), Seq(list(prompt), seq_id=1)
    manager.allocate(_group("A", a1, a2))
    names = {0: "A1", 1: "A2"}  # sample 1 and sample 2, named as in Figure 8
    panels = [
        draw_panel(manager, names, title="after allocate: both samples share [0, 1]")
    ]
    cow = _write(manager, a1, 201)
    title = f"sample 1 writes: block 1 is shared and partly filled, copied first {cow}"
    panels.append(draw_panel(manager, names, title=title, cow=cow))
    cow = _write(manager, a2, 202)
    title = f"sample 2 writes: block 1's count is 1 now, written in place {cow}"
    panels.append(draw_panel(manager, names, title=title, cow=cow))
    return compose(panels, "Copy-on-write, as in the paper's Figure 8")


def prefix_caching() -> str:
    manager = BlockManager(
        block_size=4, num_gpu_blocks=4, watermark=0.0, enable_prefix_caching=True
    )
    x, y = Seq(list(range(1, 9)), seq_id=0), Seq(list(range(41, 50)), seq_id=1)
    names = {0: "X", 1: "Y"}
    manager.allocate(_group("X", x))
    panels = [
        draw_panel(
            manager, names, title="X = [1, ..., 8] allocated: two full blocks, named"
        )
    ]
    manager.free(x)
    panels.append(
        draw_panel(
            manager,
            names,
            title="X freed: its blocks stay cached (LRU first: 1, then 0)",
        )
    )
    manager.allocate(_group("Y", y))
    title = "Y = [41, ..., 49] allocated: blocks 2, 3 from the free list, then block 1 evicted"
    panels.append(draw_panel(manager, names, title=title))
    return compose(panels, "Prefix caching with LRU eviction")


def swapping() -> str:
    manager = BlockManager(
        block_size=4, num_gpu_blocks=4, num_cpu_blocks=4, watermark=0.0
    )
    seq = Seq([1, 2, 3, 4, 5, 6], seq_id=0)
    request = _group("A", seq)
    manager.allocate(request)
    panels = [
        draw_panel(
            manager,
            {0: "A"},
            title="running: table [0, 1] on the device",
            show_host=True,
        )
    ]
    moved = manager.swap_out(request)
    title = f"swap_out returns {moved}: A is on the host"
    panels.append(draw_panel(manager, {0: "A"}, title=title, show_host=True))
    moved = manager.swap_in(request)
    title = f"swap_in returns {moved}: back on the device"
    panels.append(draw_panel(manager, {0: "A"}, title=title, show_host=True))
    return compose(panels, "Swapping a sequence out and in")


def tensor_parallel() -> str:
    """Rank 0's block tables over two ranks' pools: the same blocks, half the KV heads each."""
    manager = BlockManager(block_size=4, num_gpu_blocks=8, watermark=0.0)
    a, b = Seq(list(range(1, 7)), seq_id=0), Seq(list(range(11, 16)), seq_id=1)
    manager.allocate(_group("A", a))
    manager.allocate(_group("B", b))
    names = {0: "A", 1: "B"}
    panels = [
        draw_panel(
            manager,
            names,
            title=f"rank {rank}'s pools: KV heads {heads} of 4, "
            "in the blocks rank 0's tables name",
        )
        for rank, heads in ((0, "0-1"), (1, "2-3"))
    ]
    return compose(panels, "One page table, many memories")


FIGURES = (
    Figure(
        "pages-and-frames",
        "Two sequences' logical blocks in one pool of physical blocks, drawn from a real BlockManager",
        (
            "A pool of 8 physical blocks, `block_size=4`",
            "a.append_tokens(6",
            "b.append_tokens(5",
        ),
        pages_and_frames,
    ),
    Figure(
        "page-table",
        "The worked example's block table as Figure 6 draws it: each entry's physical block and filled slots",
        ("`BlockTable(block_size=4, block_ids=[7, 2, 9], num_tokens=10)`",),
        page_table,
    ),
    Figure(
        "frame-allocator",
        "The worked example's calls on a pool of 4 blocks: reference counts and the free list",
        ("A pool of 4 blocks.", "| `incref(0)` | 2 |", "| `free(1)` | 0 |"),
        frame_allocator,
    ),
    Figure(
        "demand-paging",
        "The 7-token prompt growing to 13 tokens: a new block only when the last one is full",
        (
            "BlockManager(block_size=4, num_gpu_blocks=10, watermark=0.1)",
            "Sequence([101, 102, 103, 104, 105, 106, 107])",
            "| 13 | `[0, 1, 2, 3]` | 3 | 12 |",
        ),
        demand_paging,
    ),
    Figure(
        "fork",
        "Beam width 3: three block tables share three physical blocks",
        (
            "`BlockManager(block_size=4, num_gpu_blocks=8)`, a 10-token prompt",
            "list(range(100, 110))",
        ),
        fork,
    ),
    Figure(
        "copy-on-write",
        "The paper's Figure 8 on a real BlockManager: the first writer copies block 1, the last "
        "writes in place",
        (
            "BlockManager(block_size=4, num_gpu_blocks=8, watermark=0.0)`, one request with 2 samples",
            "7-token prompt `[101, ..., 107]`",
            "| sample 1 writes a token | `[(1, 2)]` |",
        ),
        copy_on_write,
    ),
    Figure(
        "prefix-caching",
        "X's named blocks outlive X; Y evicts the least recently used one",
        (
            "BlockManager(block_size=4, num_gpu_blocks=4, watermark=0.0, enable_prefix_caching=True)",
            "X = `[1, ..., 8]`",
            "Y = `[41, ..., 49]`",
        ),
        prefix_caching,
    ),
    Figure(
        "swapping",
        "One sequence swapped out to the host pool and back in",
        (
            "BlockManager(block_size=4, num_gpu_blocks=4, num_cpu_blocks=4, watermark=0.0)",
            "one sequence of 6 tokens with table `[0, 1]`",
        ),
        swapping,
    ),
    Figure(
        "tensor-parallel",
        "One block table and two ranks' pools with the same block ids, each holding half the KV heads",
        (
            "`BlockManager(block_size=4, num_gpu_blocks=8)`",
            "a model of 4 KV heads on 2 ranks",
        ),
        tensor_parallel,
    ),
)

OVERVIEW_CAPTION = (
    "How a request's memory flows: the scheduler asks the block manager, "
    "the kernels follow the tables"
)
OVERVIEW_BOXES = (  # (name, the OS counterpart, what it does), left to right
    ("request", "a process", "prompt + params"),
    ("scheduler", "CPU scheduler", "admit, preempt"),
    ("block manager", "virtual memory", "allocate, fork, swap"),
    ("block tables", "page tables", "logical \u2192 physical"),
    ("kernels", "the MMU", "K/V by slot"),
)
OVERVIEW_POOLS = (
    ("device pool", "physical memory (GPU)", PALETTE[2]),
    ("host pool", "swap space (CPU)", PALETTE[1]),
)


def overview() -> str:
    """The home page's diagram: request -> scheduler -> block manager -> tables -> kernels -> pools."""
    w, h, gap, top, pool_w = 112, 70, 24, 40, 136
    body = [
        text(
            12,
            22,
            "one engine step, and the operating-system part each piece plays",
            "t",
        )
    ]
    for i, (name, os_name, does) in enumerate(OVERVIEW_BOXES):
        x = 12 + i * (w + gap)
        body.append(
            rect(
                x,
                top,
                w,
                h,
                "b",
                extra=f' style="stroke:{PALETTE[0]};stroke-width:1.5"',
            )
        )
        body.append(text(x + w / 2, top + 22, name, "t", "middle"))
        body.append(text(x + w / 2, top + 40, os_name, "", "middle", PALETTE[0]))
        body.append(text(x + w / 2, top + 57, does, "s", "middle"))
        if i:
            body.append(_side_arrow(x - gap + 2, top + h / 2, x, top + h / 2))
    pool_x = 12 + len(OVERVIEW_BOXES) * (w + gap)
    for j, (name, os_name, color) in enumerate(OVERVIEW_POOLS):
        y = top - 24 + j * 82
        body.append(
            rect(
                pool_x,
                y,
                pool_w,
                58,
                "b",
                extra=f' style="stroke:{color};stroke-width:1.5"',
            )
        )
        body.append(text(pool_x + pool_w / 2, y + 24, name, "t", "middle"))
        body.append(text(pool_x + pool_w / 2, y + 42, os_name, "", "middle", color))
        body.append(_side_arrow(pool_x - gap + 2, top + h / 2, pool_x, y + 29))
    body.append(
        text(pool_x + pool_w / 2, top + 52, "\u2195 swap_blocks", "s", "middle")
    )
    note = "K/V live in blocks anywhere in the pools; only the block tables know which block is whose."
    body.append(text(12, top + h + 30, note, "s"))
    return document(
        "\n".join(body), pool_x + pool_w + 12, top + h + 44, OVERVIEW_CAPTION
    )


def _side_arrow(x1: float, y1: float, x2: float, y2: float) -> str:
    """A left-to-right curve with its head at (x2, y2)."""
    mid = (x1 + x2) / 2
    d = f"M{x1:g} {y1:g}C{mid:g} {y1:g} {mid:g} {y2:g} {x2 - 7:g} {y2:g}"
    curve = f'<path d="{d}" fill="none" stroke="#555"/>'
    return (
        curve
        + f'<path d="M{x2 - 7:g} {y2 - 4:g}L{x2 - 7:g} {y2 + 4:g}L{x2:g} {y2:g}Z" fill="#555"/>'
    )


def build_figures() -> dict[str, str]:
    """Every figure, drawn now: path under docs/ -> SVG text."""
    figures = {figure.path: figure.draw() for figure in FIGURES}
    figures["img/overview.svg"] = overview()
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DOCS, help="the docs folder to write img/ into"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if a figure is stale",
    )
    args = parser.parse_args(argv)
    stale = []
    for path, svg in build_figures().items():
        target = args.out / path
        if args.check:
            if not target.exists() or target.read_text() != svg:
                stale.append(path)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(svg)
        print(f"wrote {target} ({len(svg)} bytes)")
    for path in stale:
        print(
            f"stale: {path} (run PYTHONPATH=. python scripts/draw_figures.py)",
            file=sys.stderr,
        )
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
