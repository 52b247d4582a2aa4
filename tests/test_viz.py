"""The text pictures of viz.py: exact strings for tiny managers pin the format students see."""

from __future__ import annotations

import pytest

from minipaged.reference.block_allocator import BlockAllocator
from minipaged.reference.block_manager import BlockManager
from minipaged.reference.block_table import BlockTable
from minipaged.sequence import Sequence, SequenceGroup
from minipaged.viz import (
    POOL_LEGEND,
    TABLE_LEGEND,
    render_allocator,
    render_block_table,
    render_block_tables,
    render_pool,
    render_stats,
)

NAMES = {0: "A", 1: "B"}


@pytest.fixture
def two_prompts():
    """block_size 2, prefix caching: A = [1, 2, 3] and B = [1, 2, 5] share their first (full) block."""
    manager = BlockManager(2, 5, 2, watermark=0.0, enable_prefix_caching=True)
    a, b = Sequence([1, 2, 3], seq_id=0), Sequence([1, 2, 5], seq_id=1)
    manager.allocate(SequenceGroup("a", [a]))
    manager.allocate(SequenceGroup("b", [b]))
    return manager, a, b


def test_pool_shows_holders_and_ref_counts(two_prompts):
    manager, _, _ = two_prompts
    assert render_pool(manager, names=NAMES, legend=False) == (
        "device pool: 5 blocks of 2 slots, 3 used, 2 free\n"
        "   0       1       2       3       4\n"
        "  [A,B x2][A     ][B     ][.     ][.     ]"
    )


def test_pool_without_names_labels_by_seq_id(two_prompts):
    manager, _, _ = two_prompts
    assert "[s0,s1 x2][s0      ][s1      ]" in render_pool(manager, legend=False)


def test_block_tables_show_mapping_fill_and_sharing(two_prompts):
    manager, a, b = two_prompts
    assert render_block_tables(manager, [a, b], NAMES) == (
        "A    3 tokens, device: 0->0*[##] 1->1[#.]\nB    3 tokens, device: 0->0*[##] 1->2[#.]"
    )


def test_freed_cached_block_is_marked_cached_free(two_prompts):
    manager, a, b = two_prompts
    manager.free(a)
    manager.free(b)
    assert render_pool(manager, names=NAMES, legend=False) == (
        "device pool: 5 blocks of 2 slots, 0 used, 5 free (1 cached-free)\n"
        "   0  1  2  3  4\n"
        "  [~][.][.][.][.]"
    )
    assert render_block_tables(manager, [a], NAMES) == "A  holds no blocks"


def test_host_pool_after_swap_out(two_prompts):
    manager, a, _ = two_prompts
    mapping = manager.swap_out(SequenceGroup("a", [a]))
    assert mapping == [(0, 0), (1, 1)]
    assert render_pool(manager, "host", NAMES, legend=False) == (
        "host pool: 2 blocks of 2 slots, 2 used, 0 free\n   0  1\n  [A][A]"
    )
    assert (
        render_block_tables(manager, [a], NAMES)
        == "A    3 tokens, host:   0->0[##] 1->1[#.]"
    )


def test_stats_summary(two_prompts):
    manager, _, _ = two_prompts
    assert render_stats(manager.memory_stats()) == (
        "device: 3/5 blocks used (1 shared, saving 1), 2 free\n"
        "        slots: 4 used / 6 allocated = 67% utilization; 2 wasted in partial blocks\n"
        "host:   0/2 blocks used, 2 free\n"
        "        slots: none allocated\n"
        "prefix cache: 1 hit, 1 miss; copied on write: 0 blocks; swapped: 0 out, 0 in"
    )


def test_stats_count_copy_on_write_and_swaps():
    manager = BlockManager(2, 6, 4, watermark=0.0)
    # an automatic id: fork() draws the child's from the same counter
    parent = Sequence([7, 8, 9])
    group = SequenceGroup("p", [parent])
    manager.allocate(group)
    child = parent.fork()
    group.add(child)
    manager.fork(parent, child)
    parent.append_token_id(1)
    assert manager.append_slots(parent) == [(1, 2)]
    manager.swap_out(group)
    manager.swap_in(group)
    text = render_stats(manager.memory_stats())
    assert "copied on write: 1 block;" in text
    assert "swapped: 3 out, 3 in" in text
    assert "prefix cache: 0 hits, 0 misses" in text


def test_legends_are_appended_on_request(two_prompts):
    manager, a, _ = two_prompts
    assert render_pool(manager, names=NAMES).endswith(POOL_LEGEND)
    assert render_block_tables(manager, [a], NAMES, legend=True).endswith(TABLE_LEGEND)


def test_allocator_alone_and_wrapping():
    allocator = BlockAllocator(12, "device")
    allocator.allocate()
    allocator.incref(allocator.allocate())
    assert render_allocator(allocator, legend=False, per_row=6) == (
        "device pool: 12 blocks, 2 used, 10 free\n"
        "   0        1        2        3        4        5\n"
        "  [held   ][held x2][.      ][.      ][.      ][.      ]\n"
        "   6        7        8        9        10       11\n"
        "  [.      ][.      ][.      ][.      ][.      ][.      ]"
    )
    assert render_allocator(BlockAllocator(0, "host"), legend=False) == (
        "host pool: 0 blocks, 0 used, 0 free\n  (no blocks)"
    )


def test_wide_pools_wrap_to_80_columns():
    manager = BlockManager(4, 40, 0)
    manager.allocate(SequenceGroup("x", [Sequence(list(range(10)), seq_id=0)]))
    picture = render_pool(manager, names={0: "a-long-name"})
    assert max(len(line) for line in picture.splitlines()) <= 80


def test_large_blocks_show_counts_instead_of_bars():
    table = BlockTable(16, [3, 9], num_tokens=20)
    assert render_block_table(table) == "0->3[16/16] 1->9[4/16]"
    assert render_block_table(BlockTable(4)) == "(empty)"


def test_unknown_pool_is_an_error(two_prompts):
    manager, _, _ = two_prompts
    with pytest.raises(ValueError, match="device"):
        render_pool(manager, "disk")
