"""The SVG pictures of drawing.py say exactly what the block manager holds; the docs' figures are current.

A picture's data attributes are checked against a state computed here from the manager's public
state (its tables and allocators), after random runs of allocate / append / fork / free / swap with
copy-on-write and prefix caching. Then the committed figures under docs/img must equal what
scripts/draw_figures.py draws now, and each concept page must embed its figure and still describe
the worked example the figure replays.
"""

from __future__ import annotations

import importlib.util
import random
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipaged.drawing import compose, draw_manager, draw_panel
from minipaged.reference.block_allocator import NoFreeBlocksError
from minipaged.reference.block_manager import AllocStatus, BlockManager
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "draw_figures", ROOT / "scripts" / "draw_figures.py"
    )
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up while the script runs
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


draw_figures = _load_script()


# ---- a random manager, driven the way the scheduler drives it ------------------------------------


class RandomRun:
    """A BlockManager with random sizes, and random operations on it."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.manager = BlockManager(
            block_size=rng.choice([1, 2, 3, 4, 8, 16]),
            num_gpu_blocks=rng.randint(1, 18),
            num_cpu_blocks=rng.randint(0, 10),
            watermark=0.0,
            enable_prefix_caching=rng.random() < 0.5,
        )
        self.groups: list[SequenceGroup] = []
        self.next_id = 0
        self.cow: list[tuple[int, int]] = []  # the last append_slots' copies

    def _seq(self, tokens: list[int]) -> Sequence:
        self.next_id += 1
        return Sequence(tokens, seq_id=self.next_id - 1)

    def _live(self, tables) -> list[tuple[SequenceGroup, Sequence]]:
        return [
            (g, s)
            for g in self.groups
            for s in g.get_unfinished_seqs()
            if s.seq_id in tables
        ]

    def step(self) -> None:
        op = self.rng.choice([self.allocate, self.allocate, self.append, self.append, self.fork, self.free,
                              self.swap_out, self.swap_in])  # fmt: skip
        op()

    def allocate(self) -> None:
        size = self.manager.block_size
        # shared prefixes
        prompt = [self.rng.randint(1, 3) for _ in range(self.rng.randint(1, 3 * size))]
        group = SequenceGroup(
            f"r{self.next_id}",
            [self._seq(list(prompt)) for _ in range(self.rng.randint(1, 3))],
        )
        if self.manager.can_allocate(group) == AllocStatus.OK:
            self.manager.allocate(group)
            self.groups.append(group)

    def append(self) -> None:
        live = self._live(self.manager.device_tables)
        if live:
            _, seq = self.rng.choice(live)
            seq.append_token_id(self.rng.randint(1, 3))
            try:
                self.cow = self.manager.append_slots(seq)
            except NoFreeBlocksError:
                seq.output_token_ids.pop()  # the step did not happen

    def fork(self) -> None:
        live = self._live(self.manager.device_tables)
        if live:
            group, parent = self.rng.choice(live)
            child = self._seq(list(parent.prompt_token_ids))
            child.output_token_ids = list(parent.output_token_ids)
            group.add(child)
            self.manager.fork(parent, child)

    def free(self) -> None:
        live = self._live({**self.manager.device_tables, **self.manager.host_tables})
        if live:
            _, seq = self.rng.choice(live)
            self.manager.free(seq)
            seq.status = SequenceStatus.FINISHED_ABORTED

    def swap_out(self) -> None:
        groups = {id(g): g for g, _ in self._live(self.manager.device_tables)}
        if groups:
            group = self.rng.choice(list(groups.values()))
            if self.manager.host.num_blocks and self.manager.can_swap_out(group):
                self.manager.swap_out(group)

    def swap_in(self) -> None:
        groups = {id(g): g for g, _ in self._live(self.manager.host_tables)}
        if groups:
            group = self.rng.choice(list(groups.values()))
            if self.manager.can_swap_in(group):
                self.manager.swap_in(group)


# ---- what the picture must say, computed from the manager ----------------------------------------


def expected_blocks(manager: BlockManager, pool: str) -> dict[int, dict[str, str]]:
    allocator = manager.device if pool == "device" else manager.host
    tables = manager.device_tables if pool == "device" else manager.host_tables
    size = manager.block_size
    out = {}
    for block in range(allocator.num_blocks):
        holders = sorted(
            s for s, t in tables.items() for b in t.block_ids if b == block
        )
        fills = [
            min(size, t.num_tokens - i * size)
            for t in tables.values()
            for i, b in enumerate(t.block_ids)
            if b == block
        ]
        cached = getattr(allocator, "is_cached_free", lambda b: False)(block)
        ref = allocator.ref_count(block)
        # the manager's own invariant, which the picture relies on
        assert ref == len(holders)
        out[block] = {
            "data-ref-count": str(ref),
            "data-seqs": ",".join(map(str, holders)),
            "data-state": "used" if ref else "cached-free" if cached else "free",
            "data-filled": str(size if cached else max(fills, default=0)),
        }
    return out


def drawn_blocks(root: ET.Element, pool: str) -> dict[int, dict[str, str]]:
    keys = ("data-ref-count", "data-seqs", "data-state", "data-filled")
    drawn = {}
    for el in root.iter():
        if el.get("data-pool") == pool:
            block = int(el.get("data-block"))
            assert block not in drawn, f"{pool} block {block} drawn twice"
            drawn[block] = {k: el.get(k) for k in keys}
    return drawn


def drawn_entries(root: ET.Element) -> dict[tuple[int, int], tuple[str, int, int]]:
    return {
        (int(el.get("data-seq")), int(el.get("data-logical"))): (
            el.get("data-location"),
            int(el.get("data-physical")),
            int(el.get("data-filled")),
        )
        for el in root.iter()
        if el.get("data-logical") is not None
    }


def expected_entries(
    manager: BlockManager, seqs=None
) -> dict[tuple[int, int], tuple[str, int, int]]:
    size, out = manager.block_size, {}
    for location, tables in (
        ("device", manager.device_tables),
        ("host", manager.host_tables),
    ):
        for seq_id, table in tables.items():
            if seqs is None or seq_id in seqs:
                for i, block in enumerate(table.block_ids):
                    out[(seq_id, i)] = (
                        location,
                        block,
                        min(size, table.num_tokens - i * size),
                    )
    return out


def assert_picture_matches(svg: str, manager: BlockManager, seqs=None, cow=()) -> None:
    root = ET.fromstring(svg)  # well-formed XML, or this raises
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert drawn_blocks(root, "device") == expected_blocks(manager, "device")
    assert drawn_blocks(root, "host") == expected_blocks(manager, "host")
    assert drawn_entries(root) == expected_entries(manager, seqs)
    tables = {
        int(el.get("data-table")): int(el.get("data-num-tokens"))
        for el in root.iter()
        if el.get("data-table")
    }
    all_tables = {**manager.device_tables, **manager.host_tables}
    assert tables == {
        s: t.num_tokens for s, t in all_tables.items() if seqs is None or s in seqs
    }
    arcs = [
        (int(el.get("data-cow-src")), int(el.get("data-cow-dst")))
        for el in root.iter()
        if el.get("data-cow-src")
    ]
    assert arcs == list(cow)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_picture_holds_the_managers_state_after_random_operations(seed):
    rng = random.Random(seed)
    run = RandomRun(rng)
    for _ in range(rng.randint(5, 40)):
        run.cow = []
        run.step()
        per_row = rng.randint(1, 14)
        svg = draw_manager(run.manager, show_host=True, cow=run.cow, per_row=per_row)
        assert_picture_matches(svg, run.manager, cow=run.cow)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_a_subset_of_sequences_still_counts_every_holder(seed):
    """Blocks of sequences left out of the picture still name all their holders and ref counts."""
    rng = random.Random(seed)
    run = RandomRun(rng)
    for _ in range(25):
        run.step()
    held = sorted({**run.manager.device_tables, **run.manager.host_tables})
    shown = set(rng.sample(held, rng.randint(0, len(held))))
    names = {s: f"q{s}" for s in shown}
    svg = compose(
        [draw_panel(run.manager, names, seqs=shown, show_host=True)], "subset"
    )
    assert_picture_matches(svg, run.manager, seqs=shown)


def test_host_pool_drawn_only_when_it_holds_blocks_by_default():
    manager = BlockManager(
        block_size=2, num_gpu_blocks=3, num_cpu_blocks=3, watermark=0.0
    )
    seq = Sequence([5, 6, 7], seq_id=0)
    group = SequenceGroup("g", [seq])
    manager.allocate(group)
    assert 'data-pool="host"' not in draw_manager(manager)
    manager.swap_out(group)
    svg = draw_manager(manager)
    assert_picture_matches(svg, manager)
    assert drawn_entries(ET.fromstring(svg)) == {
        (0, 0): ("host", 0, 2),
        (0, 1): ("host", 1, 1),
    }


def test_free_list_is_drawn_in_allocation_order():
    manager = BlockManager(block_size=2, num_gpu_blocks=5, watermark=0.0)
    seqs = [Sequence([1, 2], seq_id=i) for i in range(3)]
    for seq in seqs:
        manager.allocate(SequenceGroup(str(seq.seq_id), [seq]))
    manager.free(seqs[0])
    root = ET.fromstring(draw_manager(manager, show_free_list=True))
    (drawn,) = [
        el.get("data-free-list")
        for el in root.iter()
        if el.get("data-free-list") is not None
    ]
    # allocate() pops from the right: block 0, freed last, is handed out next
    assert [int(b) for b in drawn.split(",")] == [4, 3, 0]
    assert manager.device.allocate() == int(drawn.split(",")[-1])


@pytest.mark.parametrize(
    ("kwargs", "found"),
    [
        ({"per_row": 0}, "per_row"),
        ({"per_row": True}, "per_row"),
        ({"cow": [(0, 99)]}, "cow"),
        ({"cow": [(0,)]}, "cow"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, found):
    manager = BlockManager(block_size=2, num_gpu_blocks=3)
    with pytest.raises(ValueError, match=found):
        draw_panel(manager, **kwargs)


def test_compose_needs_a_panel():
    with pytest.raises(ValueError, match="panels"):
        compose([], "nothing")


# ---- the committed figures and the pages that show them ------------------------------------------


@pytest.fixture(scope="module")
def figures():
    return draw_figures.build_figures()


def test_committed_figures_are_what_the_script_draws_now(figures):
    stale = [
        path
        for path, svg in figures.items()
        if not (DOCS / path).exists() or (DOCS / path).read_text() != svg
    ]
    assert not stale, (
        f"stale figures {stale}: run `PYTHONPATH=. python scripts/draw_figures.py`"
    )
    committed = {
        f"img/concepts/{p.name}" for p in (DOCS / "img" / "concepts").glob("*.svg")
    }
    assert committed == {p for p in figures if p.startswith("img/concepts/")}, (
        "a figure no script draws"
    )


def test_figures_are_small_legible_and_self_contained(figures):
    for path, svg in figures.items():
        root = ET.fromstring(svg)
        assert len(svg) < 24_000, f"{path} is {len(svg)} bytes"
        assert root.find("{http://www.w3.org/2000/svg}title").text
        assert not re.search(r"<script|<image|href=|@import|url\(", svg), (
            f"{path} reaches outside itself"
        )
        assert "font-family:sans-serif" in svg


@pytest.mark.parametrize("figure", draw_figures.FIGURES, ids=lambda f: f.page)
def test_each_concept_page_embeds_its_figure_and_keeps_its_example(figure):
    page = (DOCS / "concepts" / f"{figure.page}.md").read_text()
    assert figure.embed in page, (
        f"{figure.page}.md must embed its figure as {figure.embed}"
    )
    assert (DOCS / figure.path).exists()
    prose = " ".join(page.split())  # the page wraps lines anywhere
    for anchor in figure.anchors:
        assert anchor in prose, (
            f"{figure.page}.md no longer says {anchor!r}: update the figure's scenario"
        )


def test_the_eight_pages_from_pages_and_frames_to_swapping_have_figures():
    pages = ["pages-and-frames", "page-table", "frame-allocator", "demand-paging", "fork", "copy-on-write",
             "prefix-caching", "swapping", "tensor-parallel"]  # fmt: skip
    assert [figure.page for figure in draw_figures.FIGURES] == pages


def test_tensor_parallel_figure_shows_one_table_over_two_ranks_pools(figures):
    """Both ranks' panels show the same tables and the same used blocks: one page table."""
    root = ET.fromstring(figures["img/concepts/tensor-parallel.svg"])
    panels = root.findall("{http://www.w3.org/2000/svg}g")
    used = [sorted(el.get("data-block") for el in p.iter() if el.get("data-state") == "used")
            for p in panels]  # fmt: skip
    assert len(panels) == 2 and used[0] == used[1] == ["0", "1", "2", "3"]


def test_home_page_embeds_the_overview(figures):
    assert "img/overview.svg" in figures
    assert f"]({'img/overview.svg'})" in (DOCS / "index.md").read_text()


def test_page_table_figure_shows_the_worked_examples_table(figures):
    root = ET.fromstring(figures["img/concepts/page-table.svg"])
    entries = drawn_entries(root)
    assert [entries[(10, i)][1] for i in range(3)] == [7, 2, 9]  # block_ids=[7, 2, 9]
    assert [entries[(10, i)][2] for i in range(3)] == [4, 4, 2]  # num_tokens=10


def test_copy_on_write_figure_shows_figure_8(figures):
    root = ET.fromstring(figures["img/concepts/copy-on-write.svg"])
    panels = root.findall("{http://www.w3.org/2000/svg}g")
    arcs = [[(el.get("data-cow-src"), el.get("data-cow-dst")) for el in p.iter() if el.get("data-cow-src")]
            for p in panels]  # fmt: skip
    # the first writer copies block 1 to block 2; the last does not
    assert arcs == [[], [("1", "2")], []]
