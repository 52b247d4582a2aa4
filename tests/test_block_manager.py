"""The block manager: admission with a watermark, demand paging, fork, copy-on-write, swap, stats."""

from __future__ import annotations

import random

import pytest

from minipaged.reference import block_manager as block_manager_module
from minipaged.reference.block_allocator import NoFreeBlocksError
from minipaged.reference.block_manager import AllocStatus, BlockManager
from minipaged.reference.prefix_cache import hash_full_blocks
from minipaged.sequence import Sequence, SequenceGroup

BS = 4
PROMPT6 = [11, 12, 13, 14, 15, 16]  # one full block and one half-full block
PROMPT8 = [21, 22, 23, 24, 25, 26, 27, 28]  # two full blocks


def make_group(prompt: list[int], n: int = 1, request_id: str = "r") -> SequenceGroup:
    """A request of `n` sequences with the same prompt (n parallel samples before they diverge)."""
    return SequenceGroup(
        request_id, [Sequence(prompt_token_ids=list(prompt)) for _ in range(n)]
    )


def tokens(num: int, start: int = 100) -> list[int]:
    return list(range(start, start + num))


def ids(manager: BlockManager, seq: Sequence) -> list[int]:
    return list(manager.get_block_table(seq).block_ids)


def refs(manager: BlockManager, blocks: list[int], pool: str = "device") -> list[int]:
    return [getattr(manager, pool).ref_count(b) for b in blocks]


def allocate_and_fork(
    manager: BlockManager, prompt: list[int]
) -> tuple[Sequence, Sequence]:
    """Allocate a one-sequence request, then fork its sequence into the group: (parent, child)."""
    group = make_group(prompt)
    manager.allocate(group)
    parent = group.seqs[0]
    child = parent.fork()
    manager.fork(parent, child)
    group.add(child)
    return parent, child


@pytest.fixture
def manager() -> BlockManager:
    return BlockManager(BS, num_gpu_blocks=8, num_cpu_blocks=8)


# ---- constructor -----------------------------------------------------------------------------


@pytest.mark.task1_3
@pytest.mark.parametrize("block_size", [0, -4, 2.5, None])
def test_bad_block_size_raises(block_size):
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(block_size, 8)


@pytest.mark.task1_3
@pytest.mark.parametrize("watermark", [-0.01, 1.0, 1.5, float("nan")])
def test_bad_watermark_raises(watermark):
    with pytest.raises(ValueError, match=r"watermark must be in \[0, 1\)"):
        BlockManager(BS, 8, watermark=watermark)


@pytest.mark.task1_3
@pytest.mark.parametrize("num_gpu_blocks", [-1, 2.5, "8"])
def test_bad_num_gpu_blocks_raises(num_gpu_blocks):
    with pytest.raises(ValueError, match="num_gpu_blocks"):
        BlockManager(BS, num_gpu_blocks)


@pytest.mark.task1_3
@pytest.mark.parametrize("num_cpu_blocks", [-1, 2.5])
def test_bad_num_cpu_blocks_raises(num_cpu_blocks):
    with pytest.raises(ValueError, match="num_cpu_blocks"):
        BlockManager(BS, 8, num_cpu_blocks)


@pytest.mark.task1_3
def test_default_watermark_is_one_percent_of_device_blocks():
    assert BlockManager(BS, 100).watermark_blocks == 1
    assert BlockManager(BS, 99).watermark_blocks == 0  # int(0.99)
    assert BlockManager(BS, 1000).watermark_blocks == 10
    assert BlockManager(BS, 100, watermark=0.1).watermark_blocks == 10


# ---- task 1.3: admission and demand paging ---------------------------------------------------


@pytest.mark.task1_3
def test_can_allocate_ok_up_to_the_watermark():
    manager = BlockManager(BS, 100)  # watermark: 1 block
    assert manager.can_allocate(make_group(tokens(99 * BS))) == AllocStatus.OK


@pytest.mark.task1_3
def test_can_allocate_never_when_the_prompt_eats_the_watermark():
    manager = BlockManager(BS, 100)
    assert manager.can_allocate(make_group(tokens(99 * BS + 1))) == AllocStatus.NEVER
    assert manager.can_allocate(make_group(tokens(101 * BS))) == AllocStatus.NEVER


@pytest.mark.task1_3
def test_can_allocate_without_watermark_may_take_every_block():
    manager = BlockManager(BS, 100, watermark=0.0)
    assert manager.can_allocate(make_group(tokens(100 * BS))) == AllocStatus.OK
    assert manager.can_allocate(make_group(tokens(100 * BS + 1))) == AllocStatus.NEVER


@pytest.mark.task1_3
def test_can_allocate_later_when_free_blocks_minus_watermark_are_too_few():
    manager = BlockManager(BS, 100)
    manager.allocate(make_group(tokens(BS), request_id="running"))  # 99 free now
    # 99 - 98 = 1
    assert manager.can_allocate(make_group(tokens(98 * BS))) == AllocStatus.OK
    # 99 - 99 = 0
    assert manager.can_allocate(make_group(tokens(98 * BS + 1))) == AllocStatus.LATER


@pytest.mark.task1_3
def test_can_allocate_counts_every_sequence_of_a_diverged_group():
    manager = BlockManager(BS, 10, watermark=0.0)
    a = Sequence(prompt_token_ids=list(PROMPT8), output_token_ids=tokens(9, start=200))
    b = Sequence(prompt_token_ids=list(PROMPT8), output_token_ids=tokens(9, start=300))
    # each holds 5 blocks; they share the 2 prompt blocks: 2 + 3 + 3 = 8 blocks
    assert manager.can_allocate(SequenceGroup("g", [a, b])) == AllocStatus.OK
    c = Sequence(prompt_token_ids=list(PROMPT8), output_token_ids=tokens(9, start=400))
    # 11 > 10
    assert manager.can_allocate(SequenceGroup("g", [a, b, c])) == AllocStatus.NEVER


@pytest.mark.task1_3
@pytest.mark.parametrize(
    ("num_tokens", "num_blocks"), [(1, 1), (4, 1), (5, 2), (10, 3)]
)
def test_allocate_gives_ceil_len_over_block_size_blocks(
    manager, num_tokens, num_blocks
):
    group = make_group(tokens(num_tokens))
    assert manager.allocate(group) == 0  # nothing came from a prefix cache
    (seq,) = group.seqs
    table = manager.get_block_table(seq)
    assert (len(table), table.num_tokens) == (num_blocks, num_tokens)
    assert manager.device.num_used == num_blocks
    assert refs(manager, table.block_ids) == [1] * num_blocks


@pytest.mark.task1_3
def test_identical_sequences_of_a_group_share_every_block(manager):
    group = make_group(PROMPT6, n=3)
    manager.allocate(group)
    tables = [ids(manager, seq) for seq in group.seqs]
    assert tables[0] == tables[1] == tables[2]
    assert len(tables[0]) == 2
    assert refs(manager, tables[0]) == [3, 3]
    assert manager.device.num_used == 2


@pytest.mark.task1_3
def test_allocate_too_big_raises_and_changes_nothing():
    manager = BlockManager(BS, 2)
    group = make_group(tokens(3 * BS))
    with pytest.raises(NoFreeBlocksError, match="'r' needs 3 blocks, 2 free"):
        manager.allocate(group)
    assert manager.device.num_free == 2
    assert manager.device_tables == {}


@pytest.mark.task1_3
def test_allocate_of_a_group_that_does_not_fit_allocates_none_of_it():
    manager = BlockManager(BS, 4)
    seqs = [
        Sequence(prompt_token_ids=list(PROMPT8), output_token_ids=[t, t + 1])
        for t in (31, 41, 51)
    ]
    # the first fits alone (3 blocks); all three need 3 + 1 + 1 = 5, sharing the 2 prompt blocks
    with pytest.raises(NoFreeBlocksError, match="'g' needs 5 blocks, 4 free"):
        manager.allocate(SequenceGroup("g", seqs))
    assert manager.device.num_free == 4
    assert manager.device_tables == {}


@pytest.mark.task1_3
def test_allocate_of_a_sequence_already_holding_blocks_raises(manager):
    group = make_group(PROMPT6)
    manager.allocate(group)
    with pytest.raises(
        ValueError,
        match=f"seq {group.seqs[0].seq_id} of group 'r' already holds blocks",
    ):
        manager.allocate(group)
    assert manager.device.num_used == 2


@pytest.mark.task1_3
def test_append_slots_fills_the_last_block_before_allocating(manager):
    group = make_group(PROMPT6)
    manager.allocate(group)
    (seq,) = group.seqs
    for token in (31, 32):
        seq.append_token_id(token)
        assert manager.append_slots(seq) == []
    assert manager.device.num_used == 2
    assert manager.get_block_table(seq).num_tokens == 8


@pytest.mark.task1_3
def test_append_slots_allocates_when_the_last_block_is_full(manager):
    group = make_group(PROMPT8)
    manager.allocate(group)
    (seq,) = group.seqs
    seq.append_token_id(31)
    assert manager.append_slots(seq) == []  # no copy: only a new block
    table = manager.get_block_table(seq)
    assert (len(table), table.num_tokens) == (3, 9)
    assert manager.device.num_used == 3


@pytest.mark.task1_3
def test_append_slots_without_new_tokens_changes_nothing(manager):
    group = make_group(PROMPT8)
    manager.allocate(group)
    assert manager.append_slots(group.seqs[0]) == []
    assert manager.device.num_used == 2


@pytest.mark.task1_3
def test_append_slots_with_no_free_block_raises_and_changes_nothing():
    manager = BlockManager(BS, 2)
    group = make_group(PROMPT8)
    manager.allocate(group)
    (seq,) = group.seqs
    seq.append_token_id(31)
    with pytest.raises(NoFreeBlocksError, match="needs 1 blocks, 0 free"):
        manager.append_slots(seq)
    assert manager.get_block_table(seq).num_tokens == 8
    assert manager.device.num_used == 2


@pytest.mark.task1_3
def test_append_slots_of_a_sequence_without_blocks_raises(manager):
    with pytest.raises(KeyError, match="holds no device blocks"):
        manager.append_slots(Sequence(prompt_token_ids=[11, 12]))


@pytest.mark.task1_3
def test_can_append_slots_needs_a_block_only_when_the_last_is_full():
    manager = BlockManager(BS, 2)
    half, full = (
        make_group(PROMPT6[:2], request_id="half"),
        make_group(PROMPT6[:4], request_id="full"),
    )
    manager.allocate(half)
    manager.allocate(full)  # the pool is now empty
    half.seqs[0].append_token_id(31)
    full.seqs[0].append_token_id(41)
    assert manager.can_append_slots(half)
    assert not manager.can_append_slots(full)


@pytest.mark.task1_5
def test_can_append_slots_counts_a_copy_on_write():
    manager = BlockManager(BS, 2)
    group = make_group(PROMPT6, n=2)  # 2 shared blocks, the last one half full; 0 free
    manager.allocate(group)
    group.seqs[1].append_token_id(31)
    assert not manager.can_append_slots(group)


# ---- task 1.4: fork --------------------------------------------------------------------------


@pytest.mark.task1_4
def test_fork_shares_every_block_without_allocating():
    manager = BlockManager(BS, 2)
    # the pool is full: a fork must still work
    parent, child = allocate_and_fork(manager, PROMPT6)
    assert ids(manager, child) == ids(manager, parent)
    assert manager.get_block_table(child).num_tokens == 6
    assert refs(manager, ids(manager, parent)) == [2, 2]
    assert (manager.device.num_used, manager.device.num_free) == (2, 0)


@pytest.mark.task1_4
def test_forked_table_is_a_separate_table(manager):
    parent, child = allocate_and_fork(manager, PROMPT8)
    child.append_token_id(31)
    manager.append_slots(child)
    assert len(manager.get_block_table(child)) == 3
    assert len(manager.get_block_table(parent)) == 2
    assert manager.get_block_table(parent).num_tokens == 8


@pytest.mark.task1_4
def test_forks_of_forks_count_every_holder_and_freeing_gives_the_counts_back():
    manager = BlockManager(BS, 8)
    prompt = random.sample(range(100, 200), random.randint(5, 16))
    parent, child = allocate_and_fork(manager, prompt)
    grandchild = child.fork()
    manager.fork(child, grandchild)
    blocks = ids(manager, parent)
    assert ids(manager, grandchild) == blocks
    assert refs(manager, blocks) == [3] * len(blocks)
    assert manager.device.num_used == len(blocks)  # a fork allocates nothing
    manager.free(parent)
    manager.free(grandchild)
    assert refs(manager, blocks) == [1] * len(blocks)
    assert ids(manager, child) == blocks


@pytest.mark.task1_6  # fork (1.4) with the prefix cache (1.6)
def test_a_forked_child_keeps_the_parents_block_hashes_for_the_prefix_cache():
    """The child's next full block is named by the hash chain of the parent's blocks: a later
    prompt made of the child's tokens hits it."""
    manager = BlockManager(BS, 16, enable_prefix_caching=True)
    prompt = random.sample(range(100, 200), 2 * BS + 1)  # two full blocks and one token
    _, child = allocate_and_fork(manager, prompt)
    for token in random.sample(range(300, 400), BS):  # fills the child's third block
        child.append_token_id(token)
        manager.append_slots(child)
    third = ids(manager, child)[2]
    later = make_group([*child.token_ids[: 3 * BS], 7], request_id="later")
    assert manager.allocate(later) == 3 * BS
    assert ids(manager, later.seqs[0])[2] == third


@pytest.mark.task1_6  # fork (1.4) with the prefix cache (1.6)
def test_a_forked_child_does_not_hash_its_parents_blocks_again(monkeypatch):
    """fork copies the parent's block hashes: the child hashes only the blocks it fills."""
    manager = BlockManager(BS, 16, enable_prefix_caching=True)
    prompt = random.sample(range(100, 200), 3 * BS + 1)
    _, child = allocate_and_fork(manager, prompt)
    hashed = []

    def counting(token_ids, block_size, parent=""):
        hashed.append(len(token_ids) // block_size)
        return hash_full_blocks(token_ids, block_size, parent)

    monkeypatch.setattr(block_manager_module, "hash_full_blocks", counting)
    for token in random.sample(
        range(300, 400), BS - 1
    ):  # fills the child's fourth block
        child.append_token_id(token)
        manager.append_slots(child)
    assert sum(hashed) == 1, "only the new full block is hashed"


@pytest.mark.task1_4
def test_fork_of_a_parent_without_blocks_raises(manager):
    parent = Sequence(prompt_token_ids=[11, 12])
    with pytest.raises(KeyError, match=f"seq {parent.seq_id} holds no device blocks"):
        manager.fork(parent, parent.fork())


@pytest.mark.task1_4
def test_fork_into_a_child_holding_blocks_raises(manager):
    first, second = (
        make_group(PROMPT6, request_id="a"),
        make_group(PROMPT8, request_id="b"),
    )
    manager.allocate(first)
    manager.allocate(second)
    with pytest.raises(
        ValueError, match=f"child seq {second.seqs[0].seq_id} already holds blocks"
    ):
        manager.fork(first.seqs[0], second.seqs[0])
    assert refs(manager, ids(manager, first.seqs[0])) == [1, 1]


# ---- task 1.5: copy-on-write -----------------------------------------------------------------


@pytest.fixture
def forked(manager):
    """A parent of 6 tokens (blocks [0, 1], block 1 half full) and its forked child."""
    parent, child = allocate_and_fork(manager, PROMPT6)
    return manager, parent, child


@pytest.mark.task1_5
def test_write_into_a_shared_partial_block_copies_it(forked):
    manager, parent, child = forked
    child.append_token_id(31)
    assert manager.append_slots(child) == [(1, 2)]  # copy block 1 to the fresh block 2
    assert ids(manager, parent) == [0, 1]  # the other sequence keeps the old block
    assert ids(manager, child) == [0, 2]
    assert refs(manager, [0, 1, 2]) == [2, 1, 1]
    assert manager.cow_copies == 1
    assert manager.memory_stats().cow_copies == 1


@pytest.mark.task1_5
def test_last_holder_writes_in_place(forked):
    manager, parent, child = forked
    child.append_token_id(31)
    manager.append_slots(child)
    parent.append_token_id(41)
    assert manager.append_slots(parent) == []  # block 1 is the parent's alone now
    assert ids(manager, parent) == [0, 1]
    assert manager.cow_copies == 1


@pytest.mark.task1_5
def test_sole_holder_after_the_other_finishes_writes_in_place(forked):
    manager, parent, child = forked
    manager.free(parent)
    child.append_token_id(31)
    assert manager.append_slots(child) == []
    assert ids(manager, child) == [0, 1]
    assert manager.cow_copies == 0


@pytest.mark.task1_5
def test_append_after_a_shared_full_block_needs_no_copy(manager):
    _, child = allocate_and_fork(manager, PROMPT8)
    child.append_token_id(31)
    assert manager.append_slots(child) == []
    assert ids(manager, child) == [0, 1, 2]
    assert refs(manager, [0, 1, 2]) == [2, 2, 1]
    assert manager.cow_copies == 0


@pytest.mark.task1_5
def test_each_sharer_but_the_last_copies(manager):
    group = make_group(PROMPT6, n=3)
    manager.allocate(group)
    a, b, c = group.seqs
    for seq, token in ((a, 31), (b, 41), (c, 51)):
        seq.append_token_id(token)
    assert manager.append_slots(a) == [(1, 2)]
    assert manager.append_slots(b) == [(1, 3)]
    assert manager.append_slots(c) == []
    assert [ids(manager, s)[1] for s in (a, b, c)] == [2, 3, 1]
    assert manager.cow_copies == 2


# ---- task 1.7: swapping ----------------------------------------------------------------------


@pytest.fixture
def shared_pair(manager):
    """A group of two sequences sharing both blocks of PROMPT6, on the device."""
    group = make_group(PROMPT6, n=2)
    manager.allocate(group)
    return manager, group


@pytest.mark.task1_7
def test_swap_out_moves_a_shared_block_once(shared_pair):
    manager, group = shared_pair
    mapping = manager.swap_out(group)
    assert sorted(src for src, _ in mapping) == [0, 1]
    host_blocks = [dst for _, dst in mapping]
    assert len(set(host_blocks)) == 2
    assert refs(manager, host_blocks, pool="host") == [2, 2]
    assert (manager.device.num_used, manager.host.num_used) == (0, 2)
    assert manager.blocks_swapped_out == 2


@pytest.mark.task1_7
def test_swap_out_moves_tables_to_the_host_keeping_num_tokens(shared_pair):
    manager, group = shared_pair
    mapping = dict(manager.swap_out(group))
    for seq in group.seqs:
        assert seq.seq_id not in manager.device_tables
        host_table = manager.host_tables[seq.seq_id]
        assert host_table.num_tokens == 6
        assert host_table.block_ids == [mapping[0], mapping[1]]
        assert manager.seq_memory(seq).location == "host"


@pytest.mark.task1_7
def test_swap_in_returns_host_to_device_mapping(shared_pair):
    manager, group = shared_pair
    out = dict(manager.swap_out(group))
    back = manager.swap_in(group)
    assert sorted(src for src, _ in back) == sorted(out.values())
    assert manager.blocks_swapped_in == 2
    assert manager.host.num_used == 0


@pytest.mark.task1_7
def test_swap_round_trip_restores_shapes_and_sharing(shared_pair):
    manager, group = shared_pair
    manager.swap_out(group)
    manager.swap_in(group)
    a, b = group.seqs
    assert ids(manager, a) == ids(manager, b)
    assert [manager.get_block_table(s).num_tokens for s in (a, b)] == [6, 6]
    assert refs(manager, ids(manager, a)) == [2, 2]
    assert manager.host_tables == {}
    assert (manager.device.num_used, manager.host.num_used) == (2, 0)


@pytest.mark.task1_7
def test_swapped_in_sequence_keeps_growing(shared_pair):
    manager, group = shared_pair
    manager.swap_out(group)
    manager.swap_in(group)
    a, _ = group.seqs
    a.append_token_id(31)
    # the partial block is still shared: copy-on-write
    assert len(manager.append_slots(a)) == 1
    assert manager.get_block_table(a).num_tokens == 7


@pytest.mark.task1_7
def test_swap_out_with_too_small_host_raises_and_changes_nothing():
    manager = BlockManager(BS, 8, num_cpu_blocks=1)
    group = make_group(PROMPT6, n=2)
    manager.allocate(group)
    before = {s.seq_id: ids(manager, s) for s in group.seqs}
    with pytest.raises(NoFreeBlocksError, match="needs 2 host blocks, 1 free"):
        manager.swap_out(group)
    assert {s.seq_id: ids(manager, s) for s in group.seqs} == before
    assert manager.host_tables == {}
    assert (manager.device.num_used, manager.host.num_used) == (2, 0)
    assert manager.blocks_swapped_out == 0


@pytest.mark.task1_7
def test_can_swap_out_counts_shared_blocks_once():
    manager = BlockManager(BS, 8, num_cpu_blocks=2)
    group = make_group(PROMPT6, n=2)
    manager.allocate(group)
    assert manager.can_swap_out(group)
    manager.host.allocate()
    assert not manager.can_swap_out(group)


@pytest.mark.task1_7
def test_can_swap_in_keeps_the_watermark_free():
    manager = BlockManager(BS, 100, num_cpu_blocks=10)  # watermark: 1 block
    swapped = make_group(PROMPT6, request_id="swapped")  # 2 blocks
    manager.allocate(swapped)
    manager.swap_out(swapped)
    manager.allocate(make_group(tokens(97 * BS), request_id="big"))  # 3 free
    assert manager.can_swap_in(swapped)  # 3 - 2 = 1
    manager.allocate(make_group(tokens(BS), request_id="small"))  # 2 free
    assert not manager.can_swap_in(swapped)  # 2 - 2 = 0


@pytest.mark.task1_7
def test_swap_out_of_a_group_with_nothing_on_the_device_raises(manager):
    group = make_group(PROMPT6)
    with pytest.raises(
        ValueError, match="no sequence of group 'r' holds device blocks"
    ):
        manager.swap_out(group)


@pytest.mark.task1_7
def test_swap_in_of_a_group_not_swapped_out_raises(shared_pair):
    manager, group = shared_pair
    with pytest.raises(ValueError, match="no sequence of group 'r' holds host blocks"):
        manager.swap_in(group)


@pytest.mark.task1_7
def test_free_of_a_swapped_sequence_frees_its_host_blocks(shared_pair):
    manager, group = shared_pair
    mapping = manager.swap_out(group)
    host_blocks = [dst for _, dst in mapping]
    a, b = group.seqs
    manager.free(a)
    assert refs(manager, host_blocks, pool="host") == [1, 1]
    manager.free(b)
    assert manager.host.num_used == 0
    assert manager.host_tables == {}
    assert manager.device.num_used == 0


# ---- free and memory stats -------------------------------------------------------------------


@pytest.mark.task1_3
def test_free_releases_every_block(manager):
    group = make_group(PROMPT6)
    manager.allocate(group)
    manager.free(group.seqs[0])
    assert manager.device.num_free == 8
    assert manager.device_tables == {}


@pytest.mark.task1_3
def test_free_of_one_sharer_keeps_the_blocks_for_the_other(shared_pair):
    manager, group = shared_pair
    a, b = group.seqs
    manager.free(a)
    assert refs(manager, ids(manager, b)) == [1, 1]
    assert manager.device.num_used == 2


@pytest.mark.task1_3
def test_free_of_an_unknown_sequence_raises(manager):
    seq = Sequence(prompt_token_ids=[11, 12])
    with pytest.raises(KeyError, match=f"seq {seq.seq_id} holds no blocks"):
        manager.free(seq)


@pytest.mark.task1_3
def test_free_twice_raises(manager):
    group = make_group(PROMPT6)
    manager.allocate(group)
    manager.free(group.seqs[0])
    with pytest.raises(KeyError, match="holds no blocks"):
        manager.free(group.seqs[0])


@pytest.fixture
def busy(manager):
    """Group "a": two sequences sharing both blocks of PROMPT6; group "b": one sequence of 5 tokens."""
    a = make_group(PROMPT6, n=2, request_id="a")
    b = make_group([31, 32, 33, 34, 35], request_id="b")
    manager.allocate(a)
    manager.allocate(b)
    return manager, a, b


@pytest.mark.task1_3
def test_memory_stats_device_pool(busy):
    manager, _, _ = busy
    device = manager.memory_stats().device
    assert (device.name, device.num_blocks, device.num_free, device.num_used) == (
        "device",
        8,
        4,
        4,
    )
    assert (device.num_shared, device.num_cached_free) == (2, 0)
    # shared blocks count once
    assert (device.slots_used, device.slots_allocated) == (6 + 5, 4 * BS)
    assert device.utilization == pytest.approx(11 / 16)
    assert device.internal_waste == 5
    assert device.blocks_saved_by_sharing == 2


@pytest.mark.task1_3
def test_memory_stats_per_sequence(busy):
    manager, a, b = busy
    by_id = {m.seq_id: m for m in manager.memory_stats().seqs}
    assert set(by_id) == {s.seq_id for s in (*a.seqs, *b.seqs)}
    for seq in a.seqs:
        m = by_id[seq.seq_id]
        assert (
            m.location,
            m.num_blocks,
            m.slots_used,
            m.slots_allocated,
            m.internal_waste,
        ) == (
            "device",
            2,
            6,
            8,
            2,
        )
    m = by_id[b.seqs[0].seq_id]
    assert (m.num_blocks, m.slots_used, m.slots_allocated, m.internal_waste) == (
        2,
        5,
        8,
        3,
    )
    assert manager.seq_memory(b.seqs[0]) == m


@pytest.mark.task1_3
def test_memory_stats_of_an_empty_manager(manager):
    stats = manager.memory_stats()
    for pool, size in ((stats.device, 8), (stats.host, 8)):
        assert (pool.num_free, pool.num_used, pool.num_shared, pool.slots_used) == (
            size,
            0,
            0,
            0,
        )
        assert pool.utilization == 1.0
        assert pool.blocks_saved_by_sharing == 0
    assert stats.seqs == []
    assert (stats.cow_copies, stats.blocks_swapped_out, stats.blocks_swapped_in) == (
        0,
        0,
        0,
    )


@pytest.mark.task1_7
def test_memory_stats_follow_a_swap(busy):
    manager, a, _ = busy
    manager.swap_out(a)
    stats = manager.memory_stats()
    assert (stats.device.num_used, stats.device.num_shared) == (2, 0)
    assert (stats.host.num_used, stats.host.num_shared, stats.host.slots_used) == (
        2,
        2,
        6,
    )
    assert stats.host.blocks_saved_by_sharing == 2
    assert stats.blocks_swapped_out == 2
    assert {
        m.location for m in stats.seqs if m.seq_id in {s.seq_id for s in a.seqs}
    } == {"host"}


@pytest.mark.task1_3
def test_seq_memory_of_an_unknown_sequence_raises(manager):
    with pytest.raises(KeyError, match="holds no blocks"):
        manager.seq_memory(Sequence(prompt_token_ids=[11]))


@pytest.mark.task1_6
def test_memory_stats_count_cached_free_blocks():
    manager = BlockManager(BS, 8, enable_prefix_caching=True)
    group = make_group([*PROMPT8, 31])  # two full blocks and one of a single token
    manager.allocate(group)
    manager.free(group.seqs[0])
    device = manager.memory_stats().device
    assert (device.num_cached_free, device.num_free, device.num_used) == (2, 8, 0)


# ---- recompute: re-admitting a diverged group ------------------------------------------------


@pytest.mark.task1_5  # the group diverges by copy-on-write
def test_reallocating_a_diverged_group_shares_only_common_full_blocks(manager):
    prompt = [11, 12, 13, 14, 15, 16, 17, 18, 19]  # 2 full blocks + 1 token
    group = make_group(prompt, n=2)
    manager.allocate(group)
    a, b = group.seqs
    for seq, outputs in ((a, [31, 32]), (b, [41, 42, 43])):
        for token in outputs:
            seq.append_token_id(token)
            manager.append_slots(seq)
    manager.free(a)  # preempted by recompute: all blocks go
    manager.free(b)
    assert manager.device.num_used == 0

    manager.allocate(group)
    a_ids, b_ids = ids(manager, a), ids(manager, b)
    assert a_ids[:2] == b_ids[:2]
    assert a_ids[2] != b_ids[2]  # block 2 holds token 19 then different outputs
    assert refs(manager, a_ids) == [2, 2, 1]
    assert refs(manager, b_ids) == [2, 2, 1]
    assert manager.device.num_used == 4
    assert [manager.get_block_table(s).num_tokens for s in (a, b)] == [11, 12]


# ---- try_append_slots: the scheduler's one question per group and step -----------------------


def snapshot(manager: BlockManager):
    return (
        {
            k: (list(t.block_ids), t.num_tokens)
            for k, t in manager.device_tables.items()
        },
        manager.device.free_list,
        [manager.device.ref_count(b) for b in range(manager.device.num_blocks)],
    )


@pytest.mark.task1_3
def test_try_append_slots_writes_in_place_without_touching_the_pool():
    """A token that lands in the sequence's own, partly filled last block takes nothing."""
    manager = BlockManager(BS, 8, watermark=0.0)
    group = make_group(PROMPT6)  # blocks [0, 1], the second half full
    manager.allocate(group)
    (seq,) = group.seqs
    free = manager.device.free_list
    seq.append_token_id(7)
    assert manager.try_append_slots(group) == []
    assert ids(manager, seq) == [0, 1] and manager.get_block_table(seq).num_tokens == 7
    assert manager.device.free_list == free


@pytest.mark.task1_3
def test_try_append_slots_takes_a_block_past_a_full_one():
    """The fault path: past a full last block, a new one (demand paging)."""
    manager = BlockManager(BS, 8, watermark=0.0)
    group = make_group(PROMPT8)  # blocks [0, 1], both full
    manager.allocate(group)
    (seq,) = group.seqs
    seq.append_token_id(29)
    assert manager.try_append_slots(group) == []
    assert ids(manager, seq) == [0, 1, 2] and manager.device.num_free == 5


@pytest.mark.task1_6
def test_try_append_slots_publishes_the_block_its_token_fills():
    """The token that fills a block goes through the fault path too, so the prefix cache
    publishes the full block at once."""
    manager = BlockManager(BS, 8, watermark=0.0, enable_prefix_caching=True)
    group = make_group(PROMPT8[:7])  # blocks [0, 1], the second with 3 of 4 slots
    manager.allocate(group)
    (seq,) = group.seqs
    seq.append_token_id(28)  # fills block 1
    assert manager.try_append_slots(group) == []
    assert ids(manager, seq) == [0, 1]
    assert manager.device.lookup(hash_full_blocks(PROMPT8, BS)[1]) == 1


@pytest.mark.task1_5
def test_try_append_slots_copies_a_shared_block_once_per_writer_but_the_last():
    """Three samples share a partly filled last block: two copies, the third writes in
    place. With one free block too few, nothing changes and the answer is None."""
    for num_free_after, expected in ((2, "grows"), (1, None)):
        manager = BlockManager(BS, 2 + num_free_after, watermark=0.0)
        first = Sequence(list(PROMPT6))
        group = SequenceGroup("r", [first])
        manager.allocate(group)
        for _ in range(2):
            child = first.fork()
            manager.fork(first, child)
            group.add(child)
        for i, seq in enumerate(group.seqs):
            seq.append_token_id(50 + i)
        before = snapshot(manager)
        assert manager.can_append_slots(group) == (expected == "grows")
        copies = manager.try_append_slots(group)
        if expected is None:
            assert copies is None and snapshot(manager) == before
            continue
        assert [src for src, _ in copies] == [1, 1]
        assert sorted(ids(manager, s)[-1] for s in group.seqs) == [1, 2, 3]
        assert all(manager.device.ref_count(b) == 1 for b in (1, 2, 3))
        assert manager.cow_copies == 2


@pytest.mark.task1_3
def test_try_append_slots_grows_a_chunk_at_a_time():
    manager = BlockManager(BS, 8, watermark=0.0)
    seq = Sequence(list(range(1, 12)))  # 11 tokens
    group = SequenceGroup("r", [seq])
    manager.allocate(group, chunk=3)
    assert manager.get_block_table(seq).num_tokens == 3
    assert manager.try_append_slots(group, chunk=5) == []
    assert manager.get_block_table(seq).num_tokens == 8 and ids(manager, seq) == [0, 1]
    assert manager.try_append_slots(group, chunk=5) == []
    assert manager.get_block_table(seq).num_tokens == 11 and ids(manager, seq) == [
        0,
        1,
        2,
    ]
    assert manager.try_append_slots(group, chunk=5) == [], "nothing left to add"


@pytest.mark.task1_4
def test_device_stats_is_memory_stats_device_shared_or_not():
    """The engine's per-step figures equal the full snapshot's, with sharing (the counted
    path) and without (every block with one holder: the tokens are the slots used)."""
    manager = BlockManager(BS, 12, watermark=0.0)
    alone = make_group(PROMPT6, request_id="alone")
    manager.allocate(alone)
    assert manager.device_stats() == manager.memory_stats().device
    assert (
        manager.device_stats().slots_used == 6
        and manager.device_stats().num_shared == 0
    )
    allocate_and_fork(manager, PROMPT6)  # two tables on the same two blocks
    stats = manager.device_stats()
    assert stats == manager.memory_stats().device
    assert stats.num_shared == 2 and stats.slots_used == 12
