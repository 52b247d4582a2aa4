"""The block table (page table): address translation, tensors for the kernels, demand allocation.

Task 1.1 is the translation `slot = block_ids[pos // block_size] * block_size + pos % block_size` and
the kernels' tensor forms; task 1.3 is append_tokens, which asks for a block only when the last is full.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from minipaged.reference.block_allocator import BlockAllocator, NoFreeBlocksError
from minipaged.reference.block_table import (
    BlockTable,
    block_tables_tensor,
    num_blocks_for,
)


class CountingAllocator:
    """A stand-in for BlockAllocator.allocate: hands out 50, 51, 52, ... and counts the calls."""

    def __init__(self, first: int = 50) -> None:
        self.next_id = first
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        self.next_id += 1
        return self.next_id - 1


@pytest.fixture
def table() -> BlockTable:
    """Block size 4, logical blocks [0, 1] -> physical [7, 2], 6 tokens (the last block half full)."""
    return BlockTable(4, [7, 2], num_tokens=6)


# ---- task 1.1: translation -------------------------------------------------------------------


@pytest.mark.task1_1
@pytest.mark.parametrize(
    ("num_tokens", "blocks"), [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2), (9, 3)]
)
def test_num_blocks_for_is_ceil_division(num_tokens, blocks):
    assert num_blocks_for(num_tokens, 4) == blocks


@pytest.mark.task1_1
def test_len_and_capacity_count_blocks_and_slots(table):
    assert len(table) == 2
    assert table.capacity == 8
    assert table.num_tokens == 6


@pytest.mark.task1_1
@pytest.mark.parametrize(
    ("pos", "slot"), [(0, 28), (1, 29), (3, 31), (4, 8), (5, 9), (7, 11)]
)
def test_slot_translates_position_through_the_table(table, pos, slot):
    assert table.slot(pos) == slot


@pytest.mark.task1_1
@pytest.mark.parametrize("pos", [-1, 8, 100])
def test_slot_outside_the_table_raises_index_error(table, pos):
    with pytest.raises(IndexError, match=f"position {pos}"):
        table.slot(pos)


@pytest.mark.task1_1
@pytest.mark.parametrize(
    ("block_ids", "num_tokens", "filled"), [([], 0, 0), ([3], 1, 1), ([3, 9], 6, 2)]
)
def test_num_filled_in_last_block_partial(block_ids, num_tokens, filled):
    assert BlockTable(4, block_ids, num_tokens).num_filled_in_last_block == filled


@pytest.mark.task1_1
def test_num_filled_in_last_block_is_block_size_when_full():
    assert BlockTable(4, [3, 9], 8).num_filled_in_last_block == 4
    assert BlockTable(1, [3, 9, 5], 3).num_filled_in_last_block == 1


@pytest.mark.task1_1
def test_slot_mapping_of_the_last_tokens(table):
    assert table.slot_mapping(1) == [9]  # a decode step writes the newest token only
    assert table.slot_mapping(2) == [8, 9]
    # a prefill writes every token
    assert table.slot_mapping(6) == [28, 29, 30, 31, 8, 9]
    assert table.slot_mapping(0) == []


@pytest.mark.task1_1
@pytest.mark.parametrize("num_q_tokens", [-1, 7])
def test_slot_mapping_out_of_range_raises(table, num_q_tokens):
    with pytest.raises(ValueError, match=r"num_q_tokens must be in \[0, 6\]"):
        table.slot_mapping(num_q_tokens)


@pytest.mark.task1_1
def test_as_tensor_is_int32_of_the_block_ids(table):
    row = table.as_tensor()
    assert row.dtype == torch.int32
    assert row.tolist() == [7, 2]


@pytest.mark.task1_1
def test_as_tensor_pads_with_minus_one(table):
    assert table.as_tensor(max_blocks=4).tolist() == [7, 2, -1, -1]


@pytest.mark.task1_1
def test_as_tensor_max_blocks_too_small_raises(table):
    with pytest.raises(ValueError, match="max_blocks"):
        table.as_tensor(max_blocks=1)


@pytest.mark.task1_1
def test_block_tables_tensor_stacks_and_pads_to_the_longest():
    tables = [
        BlockTable(4, [7, 2], 6),
        BlockTable(4, [5], 3),
        BlockTable(4, [1, 3, 8], 9),
    ]
    batch = block_tables_tensor(tables)
    assert batch.dtype == torch.int32
    assert batch.tolist() == [[7, 2, -1], [5, -1, -1], [1, 3, 8]]


@pytest.mark.task1_1
def test_block_tables_tensor_with_explicit_width():
    batch = block_tables_tensor(
        [BlockTable(4, [7, 2], 6), BlockTable(4, [5], 3)], max_blocks=4
    )
    assert batch.tolist() == [[7, 2, -1, -1], [5, -1, -1, -1]]


@pytest.mark.task1_1
def test_block_tables_tensor_of_no_tables_is_empty_int32():
    batch = block_tables_tensor([])
    assert batch.shape == (0, 0)
    assert batch.dtype == torch.int32


@pytest.mark.task1_1
def test_block_tables_tensor_width_too_small_raises():
    with pytest.raises(ValueError, match="max_blocks"):
        block_tables_tensor([BlockTable(4, [7, 2], 6)], max_blocks=1)


# ---- constructor validation and copy ---------------------------------------------------------


@pytest.mark.task1_1
@pytest.mark.parametrize("block_size", [0, -4, 2.5, "4", None])
def test_bad_block_size_raises(block_size):
    with pytest.raises(ValueError, match="block_size"):
        BlockTable(block_size)


@pytest.mark.task1_1
@pytest.mark.parametrize(
    ("block_ids", "num_tokens"), [([3], 5), ([3, 9], 4), ([], 1), ([3], 0)]
)
def test_num_tokens_inconsistent_with_block_ids_raises(block_ids, num_tokens):
    with pytest.raises(ValueError, match=f"num_tokens={num_tokens}"):
        BlockTable(4, block_ids, num_tokens)


@pytest.mark.task1_1
@pytest.mark.parametrize(("block_ids", "num_tokens"), [([], -1), ([], -3), ([3], -1)])
def test_negative_num_tokens_raises(block_ids, num_tokens):
    with pytest.raises(ValueError, match="num_tokens"):
        BlockTable(4, block_ids, num_tokens)


@pytest.mark.task1_1
def test_table_keeps_its_own_list_of_block_ids():
    ids = [7, 2]
    table = BlockTable(4, ids, 6)
    ids.append(9)
    assert table.block_ids == [7, 2]


@pytest.mark.task1_1
def test_copy_has_the_same_mapping(table):
    child = table.copy()
    assert child is not table
    assert (child.block_size, child.block_ids, child.num_tokens) == (4, [7, 2], 6)


@pytest.mark.task1_1
def test_copy_is_independent_of_the_original(table):
    child = table.copy()
    child.block_ids.append(50)
    child.num_tokens = 9
    child.block_ids[0] = 99
    assert table.block_ids == [7, 2]
    assert table.num_tokens == 6
    assert child.block_ids == [99, 2, 50]
    assert child.num_tokens == 9


# ---- task 1.3: demand allocation -------------------------------------------------------------


@pytest.mark.task1_3
def test_append_to_empty_table_allocates_one_block():
    table, allocate = BlockTable(4), CountingAllocator()
    assert table.append_tokens(1, allocate) == [50]
    assert allocate.calls == 1
    assert (table.block_ids, table.num_tokens) == ([50], 1)


@pytest.mark.task1_3
def test_append_while_last_block_has_room_does_not_allocate(table):
    allocate = CountingAllocator()
    assert table.append_tokens(2, allocate) == []  # 6 + 2 = 8 fills block [2] exactly
    assert allocate.calls == 0
    assert (table.block_ids, table.num_tokens) == ([7, 2], 8)


@pytest.mark.task1_3
def test_append_allocates_when_last_block_is_full():
    table, allocate = BlockTable(4, [7, 2], 8), CountingAllocator()
    assert table.append_tokens(1, allocate) == [50]
    assert allocate.calls == 1
    assert table.block_ids == [7, 2, 50]
    assert table.num_filled_in_last_block == 1


@pytest.mark.task1_3
def test_append_many_tokens_allocates_exactly_the_blocks_needed(table):
    allocate = CountingAllocator()
    new = table.append_tokens(7, allocate)  # 6 + 7 = 13 tokens -> 4 blocks: 2 more
    assert new == [50, 51]
    assert allocate.calls == 2
    assert (table.block_ids, table.num_tokens) == ([7, 2, 50, 51], 13)
    assert table.slot_mapping(7) == [10, 11, 200, 201, 202, 203, 204]


@pytest.mark.task1_3
def test_decode_steps_allocate_once_per_block():
    table, allocate = BlockTable(4), CountingAllocator()
    calls_after_each = []
    for _ in range(9):
        table.append_tokens(1, allocate)
        calls_after_each.append(allocate.calls)
    assert calls_after_each == [1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert table.block_ids == [50, 51, 52]


@pytest.mark.task1_3
def test_append_zero_tokens_does_nothing(table):
    allocate = CountingAllocator()
    assert table.append_tokens(0, allocate) == []
    assert allocate.calls == 0
    assert (table.block_ids, table.num_tokens) == ([7, 2], 6)


@pytest.mark.task1_3
def test_num_new_blocks_needed(table):
    assert table.num_new_blocks_needed(0) == 0
    assert table.num_new_blocks_needed(2) == 0
    assert table.num_new_blocks_needed(3) == 1
    assert table.num_new_blocks_needed(11) == 3


@pytest.mark.task1_3
def test_append_negative_tokens_raises_and_changes_nothing(table):
    allocate = CountingAllocator()
    with pytest.raises(ValueError, match="num_new_tokens must be >= 0"):
        table.append_tokens(-1, allocate)
    assert allocate.calls == 0
    assert (table.block_ids, table.num_tokens) == ([7, 2], 6)


# ---- task 1.3: a failed append changes nothing -----------------------------------------------


def allocator_state(pool: BlockAllocator) -> tuple[list[int], list[int]]:
    """Everything an allocator holds: its free list (in the order it hands blocks out) and the counts."""
    return list(pool._free_list), [pool.ref_count(b) for b in range(pool.num_blocks)]


def pool_blocks_in_order(state: tuple[list[int], list[int]]) -> list[int]:
    """The blocks an allocator in `state` hands out next, first to last (it pops its free list)."""
    return state[0][::-1]


@pytest.mark.task1_3
@given(block_size=st.integers(1, 8), num_blocks=st.integers(0, 6), data=st.data())
def test_append_past_the_pool_gives_back_every_block_it_took(
    block_size, num_blocks, data
):
    pool = BlockAllocator(num_blocks)
    table = BlockTable(block_size)
    num_new_tokens = data.draw(
        st.integers(num_blocks * block_size + 1, (num_blocks + 3) * block_size)
    )
    with pytest.raises(NoFreeBlocksError):
        table.append_tokens(num_new_tokens, pool.allocate, pool.free)
    assert (table.block_ids, table.num_tokens) == ([], 0)
    assert pool.num_used == 0, "the blocks taken before the pool ran dry went back"
    assert allocator_state(pool) == allocator_state(BlockAllocator(num_blocks))


@pytest.mark.task1_3
def test_the_leak_case_four_blocks_from_a_pool_of_three():
    pool = BlockAllocator(3)
    table = BlockTable(4)
    with pytest.raises(NoFreeBlocksError):
        table.append_tokens(16, pool.allocate, pool.free)  # 16 tokens: 4 blocks of 4
    assert (len(table), table.num_tokens, pool.num_used) == (0, 0, 0)
    assert table.append_tokens(12, pool.allocate, pool.free) == [0, 1, 2], (
        "the pool is whole again"
    )


@pytest.mark.task1_3
@given(block_size=st.integers(1, 6), data=st.data())
def test_a_failed_append_leaves_a_partly_filled_table_and_its_pool_as_they_were(
    block_size, data
):
    pool = BlockAllocator(data.draw(st.integers(2, 8)))
    other = BlockTable(block_size)  # another sequence's blocks, used throughout
    other.append_tokens(data.draw(st.integers(0, block_size)), pool.allocate, pool.free)
    table = BlockTable(block_size)
    table.append_tokens(
        data.draw(st.integers(1, pool.num_free * block_size)), pool.allocate, pool.free
    )
    before = (list(table.block_ids), table.num_tokens, allocator_state(pool))
    # the most that fits
    room = table.capacity - table.num_tokens + pool.num_free * block_size
    with pytest.raises(NoFreeBlocksError):
        table.append_tokens(
            data.draw(st.integers(room + 1, room + 3 * block_size)),
            pool.allocate,
            pool.free,
        )
    assert (table.block_ids, table.num_tokens, allocator_state(pool)) == before
    assert table.append_tokens(room, pool.allocate, pool.free) == pool_blocks_in_order(
        before[2]
    )
    assert pool.num_free == 0


@pytest.mark.task1_3
def test_the_issue_repro_pool_allocate_alone_gives_its_blocks_back():
    """`append_tokens(16, BlockAllocator(3).allocate)`, as the bug report wrote it: no free passed."""
    pool = BlockAllocator(3)
    table = BlockTable(4)
    with pytest.raises(NoFreeBlocksError):
        table.append_tokens(16, pool.allocate)
    assert (len(table), table.num_tokens, pool.num_used) == (0, 0, 0)
    assert allocator_state(pool) == allocator_state(BlockAllocator(3))


@pytest.mark.task1_3
def test_without_free_a_failed_append_still_leaves_the_table_as_it_was(table):
    taken = []

    def allocate() -> int:  # two blocks, then the pool runs dry
        if len(taken) == 2:
            raise NoFreeBlocksError("dry")
        taken.append(50 + len(taken))
        return taken[-1]

    with pytest.raises(NoFreeBlocksError):
        table.append_tokens(11, allocate)  # 6 + 11 = 17 tokens: 5 blocks, 3 more
    assert (table.block_ids, table.num_tokens) == ([7, 2], 6)
    assert taken == [50, 51], (
        "with no free, the caller is left holding the blocks taken"
    )


class TablesAgainstAPool(RuleBasedStateMachine):
    """Random sequences append random token counts against a small pool, and finish: no block leaks."""

    @initialize(block_size=st.integers(1, 4), num_blocks=st.integers(0, 8))
    def setup(self, block_size, num_blocks):
        self.pool = BlockAllocator(num_blocks)
        self.block_size = block_size
        self.tables: list[BlockTable] = []

    @rule()
    def new_sequence(self):
        self.tables.append(BlockTable(self.block_size))

    @precondition(lambda self: self.tables)
    @rule(data=st.data(), num_new_tokens=st.integers(0, 12))
    def append(self, data, num_new_tokens):
        table = data.draw(st.sampled_from(self.tables))
        needed = table.num_new_blocks_needed(num_new_tokens)
        before = (list(table.block_ids), table.num_tokens)
        if needed > self.pool.num_free:
            with pytest.raises(NoFreeBlocksError):
                table.append_tokens(num_new_tokens, self.pool.allocate, self.pool.free)
            assert (table.block_ids, table.num_tokens) == before
            event("the pool ran dry: undone")
        else:
            new = table.append_tokens(
                num_new_tokens, self.pool.allocate, self.pool.free
            )
            assert len(new) == needed and table.block_ids == before[0] + new

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def finish(self, data):
        table = self.tables.pop(data.draw(st.integers(0, len(self.tables) - 1)))
        for block in table.block_ids:
            self.pool.free(block)

    @invariant()
    def used_blocks_are_exactly_the_blocks_the_tables_hold(self):
        held = [b for t in self.tables for b in t.block_ids]
        assert len(held) == len(set(held)), "a block in two tables"
        assert self.pool.num_used == len(held)
        assert all(self.pool.ref_count(b) == 1 for b in held)


TablesAgainstAPool.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None
)
test_tables_against_a_pool_never_leak = pytest.mark.task1_3(TablesAgainstAPool.TestCase)
