"""The exercises at the end of the concept pages (docs/concepts/*.md), checked against the real code.

Each test builds exactly the situation that its page describes and asserts the answer that the page
gives in its folded "Answer" box, so the docs cannot drift from the code. When a test here fails,
fix the page and the test together.

Markers: a page that belongs to an assignment task carries that task's marker. The contiguous-allocation
and pages-and-frames exercises use demand paging, so they carry task1_3 (they pass once tasks 1.1-1.3
are done); the KV-cache exercise uses only minipaged.config and carries none. The two kernel pages
belong to assignment 2: a question that needs a later task's code (attention, for the writing page's
question on order; the blockwise loop, for the reading page's question on lookups) is checked in a test
of its own, marked with that later task, so that `pytest -m task2_1` passes once task 2.1 is done.
"""

from __future__ import annotations

import math

import pytest
import torch

from minipaged.config import (
    SchedulerConfig,
    kv_cache_bytes_per_block,
    kv_cache_bytes_per_token,
)
from minipaged.reference.attention import (
    _attend_blockwise,
    dense_attention,
    gather_kv,
    paged_attention,
    paged_attention_blockwise,
)
from minipaged.reference.block_allocator import BlockAllocator, NoFreeBlocksError
from minipaged.reference.block_manager import AllocStatus, BlockManager
from minipaged.reference.block_table import BlockTable, block_tables_tensor
from minipaged.reference.cache_ops import write_kv
from minipaged.reference.prefix_cache import hash_full_blocks
from minipaged.reference.scheduler import Scheduler
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus
from minipaged.testing import last_slots, poison_pattern, slot_of, tolerance


def group(request_id: str, *token_lists: list[int]) -> SequenceGroup:
    """A request whose sequences start with the given token lists (one list per sample)."""
    return SequenceGroup(request_id, [Sequence(list(tokens)) for tokens in token_lists])


def ref_counts(allocator: BlockAllocator) -> list[int]:
    return [allocator.ref_count(block) for block in range(allocator.num_blocks)]


# ---- kv-cache.md ------------------------------------------------------------------------------


def test_kv_cache_exercise():
    # A Llama-3-8B-shaped model: 32 layers, 32 query heads but 8 KV heads of 128, bf16; blocks of 16.
    per_token = kv_cache_bytes_per_token(
        num_layers=32, num_kv_heads=8, head_dim=128, dtype_bytes=2
    )
    per_block = kv_cache_bytes_per_block(
        16, num_layers=32, num_kv_heads=8, head_dim=128, dtype_bytes=2
    )
    assert per_token == 131_072  # 128 KiB
    assert per_block == 2_097_152  # 2 MiB
    num_blocks = 16 * 2**30 // per_block
    assert num_blocks == 8_192
    assert num_blocks * 16 == 131_072  # tokens
    # The page's worked example: OPT-13B, the paper's "800 KB" per token and "1.6 GB" per 2048 tokens.
    assert kv_cache_bytes_per_token(40, 40, 128, 2) == 819_200
    assert kv_cache_bytes_per_token(40, 40, 128, 2) * 2048 == 1_677_721_600


# ---- contiguous-allocation.md -------------------------------------------------------------------


@pytest.mark.task1_3
def test_contiguous_allocation_exercise():
    manager = BlockManager(block_size=4, num_gpu_blocks=10, watermark=0.0)
    a = group("A", list(range(100, 116)))  # 16 tokens: 4 blocks
    b = group("B", list(range(200, 208)))  # 8 tokens: 2 blocks
    c = group("C", list(range(300, 312)))  # 12 tokens: 3 blocks
    for g in (a, b, c):
        manager.allocate(g)
    assert [manager.get_block_table(g.seqs[0]).block_ids for g in (a, b, c)] == [
        [0, 1, 2, 3],
        [4, 5],
        [6, 7, 8],
    ]
    manager.free(b.seqs[0])
    # Contiguous view of the same pool: the free blocks form holes of 2 (blocks 4-5) and 1 (block 9).
    free = [block for block in range(10) if manager.device.ref_count(block) == 0]
    assert free == [4, 5, 9]
    holes, run = [], 0
    for block in range(10):
        run = run + 1 if block in free else 0
        if run and (block == 9 or block + 1 not in free):
            holes.append(run)
    # D needs 3 contiguous blocks: a contiguous allocator must refuse it
    assert max(holes) == 2
    d = group("D", list(range(400, 412)))  # 12 tokens: 3 blocks
    # paging: any 3 free blocks will do
    assert manager.can_allocate(d) == AllocStatus.OK
    manager.allocate(d)
    assert manager.get_block_table(d.seqs[0]).block_ids == [4, 5, 9]


@pytest.mark.task1_3
def test_contiguous_allocation_worked_example_paged_side():
    # Prompt of 10 tokens, 30 generated, blocks of 16: 40 tokens in 3 blocks, 8 slots unused.
    manager = BlockManager(block_size=16, num_gpu_blocks=100, watermark=0.0)
    seq = Sequence(list(range(1000, 1010)))
    manager.allocate(SequenceGroup("r", [seq]))
    for token in range(2000, 2030):
        seq.append_token_id(token)
        manager.append_slots(seq)
    memory = manager.seq_memory(seq)
    assert (memory.num_blocks, memory.slots_used, memory.slots_allocated) == (3, 40, 48)
    assert memory.internal_waste == 8


# ---- pages-and-frames.md ----------------------------------------------------------------------


@pytest.mark.task1_3
def test_pages_and_frames_exercise():
    pool = BlockAllocator(8)
    a, b = BlockTable(block_size=4), BlockTable(block_size=4)
    assert a.append_tokens(6, pool.allocate) == [0, 1]  # A's prompt: 6 tokens
    assert b.append_tokens(5, pool.allocate) == [2, 3]  # B's prompt: 5 tokens
    for step in range(4):  # each decode step adds one token to each running sequence
        if step < 3:  # A stops after 3 generated tokens
            a.append_tokens(1, pool.allocate)
        b.append_tokens(1, pool.allocate)
    assert a.block_ids == [0, 1, 4]  # A's logical block 2 lives in physical block 4
    assert b.block_ids == [2, 3, 5]  # B's logical block 2 lives in physical block 5
    assert (a.num_tokens, b.num_tokens) == (9, 9)
    # empty slots, all in last blocks
    assert (a.capacity - a.num_tokens) + (b.capacity - b.num_tokens) == 6
    assert pool.num_free == 2


# ---- page-table.md ----------------------------------------------------------------------------


@pytest.mark.task1_1
def test_page_table_exercise():
    table = BlockTable(block_size=8, block_ids=[3, 0, 5], num_tokens=19)
    assert table.slot(12) == 4
    assert table.slot_mapping(4) == [7, 40, 41, 42]
    assert table.num_filled_in_last_block == 3
    assert table.as_tensor(5).tolist() == [3, 0, 5, -1, -1]


# ---- frame-allocator.md -----------------------------------------------------------------------


@pytest.mark.task1_2
def test_frame_allocator_exercise():
    pool = BlockAllocator(4)
    # The worked example on the page.
    assert pool.allocate() == 0
    assert pool.allocate() == 1
    assert pool.incref(0) == 2
    assert pool.free(1) == 0
    assert ref_counts(pool) == [2, 0, 0, 0]
    # The exercise continues from there.
    assert pool.allocate() == 1  # the block freed last is handed out first
    assert pool.free(0) == 1
    assert pool.free(0) == 0
    with pytest.raises(ValueError, match="double free"):
        pool.free(3)
    assert ref_counts(pool) == [0, 1, 0, 0]
    assert (pool.num_free, pool.num_used) == (3, 1)


# ---- demand-paging.md -------------------------------------------------------------------------


@pytest.mark.task1_3
def test_demand_paging_exercise():
    manager = BlockManager(block_size=4, num_gpu_blocks=10, watermark=0.1)
    assert manager.watermark_blocks == 1
    seq = Sequence([101, 102, 103, 104, 105, 106, 107])
    manager.allocate(SequenceGroup("A", [seq]))
    assert manager.get_block_table(seq).block_ids == [0, 1]
    tables = []
    for token in (201, 202):
        seq.append_token_id(token)
        assert manager.append_slots(seq) == []
        tables.append(list(manager.get_block_table(seq).block_ids))
    assert tables == [[0, 1], [0, 1, 2]]  # the 2nd generated token brings block 2
    assert manager.device.num_free == 7
    answers = {
        n: manager.can_allocate(group("B", list(range(500, 500 + n))))
        for n in (24, 28, 36, 40)
    }
    assert answers == {
        24: AllocStatus.OK,
        28: AllocStatus.LATER,
        36: AllocStatus.LATER,
        40: AllocStatus.NEVER,
    }


# ---- fork.md ----------------------------------------------------------------------------------


@pytest.mark.task1_4
def test_fork_exercise():
    manager = BlockManager(block_size=4, num_gpu_blocks=3, watermark=0.0)
    parent = Sequence(list(range(100, 110)))  # 10 tokens: 3 blocks, the whole pool
    beams = SequenceGroup("beams", [parent])
    manager.allocate(beams)
    assert manager.device.num_free == 0
    children = []
    for _ in range(2):
        child = parent.fork()
        beams.add(child)
        manager.fork(parent, child)  # does not raise: no block is allocated
        children.append(child)
    assert ref_counts(manager.device) == [3, 3, 3]
    assert manager.device.num_free == 0
    assert all(
        manager.get_block_table(child).block_ids == [0, 1, 2] for child in children
    )
    children[0].append_token_id(500)
    assert not manager.can_append_slots(beams)
    with pytest.raises(NoFreeBlocksError):
        manager.append_slots(children[0])
    assert manager.get_block_table(children[0]).block_ids == [0, 1, 2]  # unchanged


# ---- copy-on-write.md -------------------------------------------------------------------------


@pytest.mark.task1_5
def test_copy_on_write_exercise():
    manager = BlockManager(block_size=4, num_gpu_blocks=8, watermark=0.0)
    prompt = [101, 102, 103, 104, 105, 106, 107]
    samples = group("samples", prompt, prompt, prompt)  # n = 3 parallel samples
    manager.allocate(samples)
    assert ref_counts(manager.device)[:2] == [3, 3]
    copies, slots = [], []
    for token, seq in zip((301, 302, 303), samples.seqs, strict=True):
        seq.append_token_id(token)
        copies.append(manager.append_slots(seq))
        slots.append(manager.get_block_table(seq).slot_mapping(1)[0])
    assert copies == [[(1, 2)], [(1, 3)], []]
    assert [manager.get_block_table(seq).block_ids for seq in samples.seqs] == [
        [0, 2],
        [0, 3],
        [0, 1],
    ]
    assert slots == [11, 15, 7]
    assert ref_counts(manager.device)[:4] == [3, 1, 1, 1]
    assert manager.cow_copies == 2


@pytest.mark.task1_5
def test_copy_on_write_full_last_block_needs_no_copy():
    # The page's note: an 8-token prompt fills its last block, so the samples' next tokens go to new blocks.
    manager = BlockManager(block_size=4, num_gpu_blocks=8, watermark=0.0)
    prompt = [101, 102, 103, 104, 105, 106, 107, 108]
    samples = group("samples", prompt, prompt)
    manager.allocate(samples)
    for token, seq in zip((301, 302), samples.seqs, strict=True):
        seq.append_token_id(token)
        assert manager.append_slots(seq) == []
    assert [manager.get_block_table(seq).block_ids for seq in samples.seqs] == [
        [0, 1, 2],
        [0, 1, 3],
    ]


# ---- prefix-caching.md ------------------------------------------------------------------------


@pytest.mark.task1_6
def test_prefix_caching_exercise():
    manager = BlockManager(
        block_size=4, num_gpu_blocks=8, watermark=0.0, enable_prefix_caching=True
    )
    cache = manager.device
    system = [11, 12, 13, 14, 15, 16, 17, 18]
    a = group("A", [*system, 21, 22])
    assert manager.allocate(a) == 0
    assert manager.get_block_table(a.seqs[0]).block_ids == [0, 1, 2]
    manager.free(a.seqs[0])  # A finishes
    assert (cache.num_free, cache.num_cached_free) == (8, 2)
    b = group("B", [*system, 31, 32, 33])
    assert manager.allocate(b) == 8  # tokens whose K/V are already in the pool
    assert manager.get_block_table(b.seqs[0]).block_ids == [0, 1, 2]
    assert (cache.hits, cache.misses) == (2, 2)
    # second block's tokens equal the system prompt's
    c = group("C", [91, 92, 93, 94, 15, 16, 17, 18, 41])
    assert manager.allocate(c) == 0
    assert manager.get_block_table(c.seqs[0]).block_ids == [3, 4, 5]
    assert (cache.hits, cache.misses) == (2, 4)


@pytest.mark.task1_6
def test_prefix_caching_chained_names():
    # The same four tokens at a different place in the chain get a different name; [9] gets none.
    names = hash_full_blocks([1, 2, 3, 4, 1, 2, 3, 4, 9], 4)
    assert len(names) == 2
    assert names[0] != names[1]


@pytest.mark.task1_6
def test_prefix_caching_worked_example_lru_eviction():
    manager = BlockManager(
        block_size=4, num_gpu_blocks=4, watermark=0.0, enable_prefix_caching=True
    )
    cache = manager.device
    x = group("X", [1, 2, 3, 4, 5, 6, 7, 8])
    manager.allocate(x)
    manager.free(x.seqs[0])
    assert [cache.is_cached_free(block) for block in range(4)] == [
        True,
        True,
        False,
        False,
    ]
    y = group("Y", [41, 42, 43, 44, 45, 46, 47, 48, 49])
    manager.allocate(y)
    # block 1, X's tail, was evicted
    assert manager.get_block_table(y.seqs[0]).block_ids == [2, 3, 1]
    assert cache.evictions == 1
    assert cache.is_cached_free(0)  # X's first block is still cached


# ---- swapping.md ------------------------------------------------------------------------------


@pytest.mark.task1_7
def test_swapping_exercise():
    manager = BlockManager(
        block_size=4, num_gpu_blocks=8, num_cpu_blocks=3, watermark=0.0
    )
    prompt = [1, 2, 3, 4, 5, 6]
    samples = group("G", prompt, prompt)
    manager.allocate(samples)
    s1, s2 = samples.seqs
    s1.append_token_id(70)
    assert manager.append_slots(s1) == [(1, 2)]  # copy-on-write
    s2.append_token_id(71)
    assert manager.append_slots(s2) == []
    assert [manager.get_block_table(s).block_ids for s in (s1, s2)] == [[0, 2], [0, 1]]
    # Four table entries, three distinct blocks: a host pool of 3 is enough.
    assert manager.can_swap_out(samples)
    assert manager.swap_out(samples) == [(0, 0), (2, 1), (1, 2)]
    assert [manager.host_tables[s.seq_id].block_ids for s in (s1, s2)] == [
        [0, 1],
        [0, 2],
    ]
    assert ref_counts(manager.host) == [2, 1, 1]
    assert (manager.device.num_free, manager.host.num_free) == (8, 0)
    assert manager.can_swap_in(samples)
    assert manager.swap_in(samples) == [(0, 0), (1, 1), (2, 2)]
    assert [manager.get_block_table(s).block_ids for s in (s1, s2)] == [[0, 1], [0, 2]]
    assert (manager.blocks_swapped_out, manager.blocks_swapped_in) == (3, 3)


@pytest.mark.task1_7
def test_swapping_worked_example():
    manager = BlockManager(
        block_size=4, num_gpu_blocks=4, num_cpu_blocks=4, watermark=0.0
    )
    seq = Sequence([1, 2, 3, 4, 5, 6])
    request = SequenceGroup("r", [seq])
    manager.allocate(request)
    assert manager.swap_out(request) == [(0, 0), (1, 1)]
    assert manager.seq_memory(seq).location == "host"
    assert manager.device.num_free == 4
    assert manager.swap_in(request) == [(0, 0), (1, 1)]
    assert manager.get_block_table(seq).block_ids == [0, 1]


# ---- writing-through-the-table.md ---------------------------------------------------------------


def changed_rows(before: torch.Tensor, after: torch.Tensor) -> list[tuple[int, int]]:
    """The (block, offset) rows of a float32 pool whose bytes differ (NaN compares equal to itself)."""
    # [blocks, size]
    differ = (
        (before.view(torch.int32) != after.view(torch.int32)).flatten(2).any(dim=-1)
    )
    return [(block, offset) for block, offset in differ.nonzero().tolist()]


@pytest.mark.task2_1
def test_writing_through_the_table_worked_example():
    gen = torch.Generator().manual_seed(2023)
    # A's 7th token fits in block 5; B, a new 3-token prompt, got block 0
    a = BlockTable(block_size=4, block_ids=[2, 5], num_tokens=7)
    b = BlockTable(block_size=4, block_ids=[0], num_tokens=3)
    # A's decode token, B's prompt, padding
    slot_mapping = last_slots(a, 1) + last_slots(b, 3) + [-1]
    assert slot_mapping == [22, 0, 1, 2, -1]
    k_cache, v_cache = (
        torch.randn(6, 4, 2, 8, generator=gen),
        torch.randn(6, 4, 2, 8, generator=gen),
    )
    k_before, v_before = k_cache.clone(), v_cache.clone()
    key, value = (
        torch.randn(5, 2, 8, generator=gen),
        torch.randn(5, 2, 8, generator=gen),
    )
    write_kv(key, value, k_cache, v_cache, torch.tensor(slot_mapping))
    # B's three rows of block 0, A's row 2 of block 5
    written = [(0, 0), (0, 1), (0, 2), (5, 2)]
    assert changed_rows(k_before, k_cache) == changed_rows(v_before, v_cache) == written
    assert torch.equal(k_cache[5, 2], key[0]) and torch.equal(k_cache[0, :3], key[1:4])
    assert torch.equal(v_cache[5, 2], value[0]) and torch.equal(
        v_cache[0, :3], value[1:4]
    )
    assert block_tables_tensor([a, b]).tolist() == [[2, 5], [0, -1]]


def writing_exercise(gen: torch.Generator):
    """The exercise's step: A decodes, B runs a 5-token chunk, 2 padding tokens; unwritten slots are NaN."""
    a = BlockTable(block_size=4, block_ids=[3, 1], num_tokens=7)
    b = BlockTable(block_size=4, block_ids=[5, 0, 4], num_tokens=9)
    k_cache, v_cache = (
        torch.full((6, 4, 2, 8), math.nan),
        torch.full((6, 4, 2, 8), math.nan),
    )
    # written before
    earlier = [slot_of(a, pos) for pos in range(6)] + [
        slot_of(b, pos) for pos in range(4)
    ]
    for pool in (k_cache, v_cache):
        pool.view(-1, 2, 8)[earlier] = torch.randn(len(earlier), 2, 8, generator=gen)
    # 6 tokens + 2 pads
    key, value = (
        torch.randn(8, 2, 8, generator=gen),
        torch.randn(8, 2, 8, generator=gen),
    )
    return a, b, k_cache, v_cache, key, value


@pytest.mark.task2_1
def test_writing_through_the_table_exercise():
    a, b, k_cache, v_cache, key, value = writing_exercise(
        torch.Generator().manual_seed(7)
    )
    slot_mapping = last_slots(a, 1) + last_slots(b, 5) + [-1, -1]
    assert slot_mapping == [6, 0, 1, 2, 3, 16, -1, -1]
    k_before, v_before = k_cache.clone(), v_cache.clone()
    write_kv(key, value, k_cache, v_cache, torch.tensor(slot_mapping))
    expected = sorted([(1, 2), (0, 0), (0, 1), (0, 2), (0, 3), (4, 0)])
    assert (
        changed_rows(k_before, k_cache) == changed_rows(v_before, v_cache) == expected
    )
    # B's position 8
    assert torch.equal(k_cache[4, 0], key[5]) and torch.equal(v_cache[4, 0], value[5])
    assert slot_of(b, 8) == 16


@pytest.mark.task2_2
def test_writing_through_the_table_exercise_order():
    gen = torch.Generator().manual_seed(7)
    a, b, k_cache, v_cache, key, value = writing_exercise(gen)
    # 1 row for A, 5 for B; the padding has none
    query = torch.randn(6, 4, 8, generator=gen)
    args = (
        block_tables_tensor([a, b]),
        torch.tensor([7, 9], dtype=torch.int32),
        torch.tensor([0, 1, 6], dtype=torch.int32),
        8**-0.5,
    )
    # attention before write_kv
    too_early = paged_attention(query, k_cache, v_cache, *args)
    # every row sees its own NaN
    assert too_early.isnan().flatten(1).all(dim=1).tolist() == [True] * 6
    write_kv(
        key,
        value,
        k_cache,
        v_cache,
        torch.tensor(last_slots(a, 1) + last_slots(b, 5) + [-1, -1]),
    )
    out = paged_attention(query, k_cache, v_cache, *args)
    assert out.isfinite().all()
    keys = [
        k_cache.view(-1, 2, 8)[[slot_of(t, pos) for pos in range(t.num_tokens)]]
        for t in (a, b)
    ]
    values = [
        v_cache.view(-1, 2, 8)[[slot_of(t, pos) for pos in range(t.num_tokens)]]
        for t in (a, b)
    ]
    expected = dense_attention(query, keys, values, args[2], args[3])
    torch.testing.assert_close(out, expected, **tolerance(torch.float32))


# ---- reading-through-the-table.md ---------------------------------------------------------------


def reading_exercise(gen: torch.Generator):
    """seq_len 11, q_len 3, blocks of 4, table [6, 2, 9, -1]; every slot not holding a token is poisoned."""
    table = BlockTable(block_size=4, block_ids=[6, 2, 9], num_tokens=11)
    k_cache, v_cache = (
        torch.randn(10, 4, 2, 8, generator=gen),
        torch.randn(10, 4, 2, 8, generator=gen),
    )
    stale = torch.ones(40, dtype=torch.bool)
    stale[[slot_of(table, pos) for pos in range(11)]] = False
    for pool in (k_cache, v_cache):
        pool.view(-1, 2, 8)[stale] = poison_pattern(int(stale.sum()))[
            :, None, None
        ].expand(-1, 2, 8)
    query = torch.randn(3, 4, 8, generator=gen)  # 4 query heads share 2 KV heads
    args = (
        table.as_tensor(4)[None],  # [[6, 2, 9, -1]]
        torch.tensor([11], dtype=torch.int32),
        torch.tensor([0, 3], dtype=torch.int32),
        8**-0.5,
    )
    return table, query, k_cache, v_cache, args


@pytest.mark.task2_2
def test_reading_through_the_table_exercise():
    gen = torch.Generator().manual_seed(11)
    table, query, k_cache, v_cache, args = reading_exercise(gen)
    assert args[0].tolist() == [[6, 2, 9, -1]]
    # position 11's slot, past seq_len: poisoned
    assert not k_cache[9, 3].isfinite().any()
    out = paged_attention(query, k_cache, v_cache, *args)
    assert out.isfinite().all()  # the poison is never read
    # 1. Which key positions each query row sees: change one position's K/V, see which rows move.
    sees: list[list[int]] = [[], [], []]
    for pos in range(11):
        k2, v2 = k_cache.clone(), v_cache.clone()
        k2.view(-1, 2, 8)[slot_of(table, pos)] += torch.randn(2, 8, generator=gen)
        v2.view(-1, 2, 8)[slot_of(table, pos)] += torch.randn(2, 8, generator=gen)
        moved = paged_attention(query, k2, v2, *args)
        for row in range(3):
            if not torch.equal(moved[row], out[row]):
                sees[row].append(pos)
    # rows at positions 8, 9, 10
    assert sees == [list(range(9)), list(range(10)), list(range(11))]
    # 2. The rows read: blocks 6 and 2 whole, rows 0-2 of block 9.
    keys, values = gather_kv(k_cache, v_cache, args[0][0], 11)
    assert torch.equal(keys, torch.cat([k_cache[6], k_cache[2], k_cache[9, :3]]))
    assert torch.equal(values, torch.cat([v_cache[6], v_cache[2], v_cache[9, :3]]))
    expected = dense_attention(query, [keys], [values], args[2], args[3])
    torch.testing.assert_close(out, expected, **tolerance(torch.float32))
    # 3. The bytes gather_kv copies for this sequence in one layer.
    assert keys.nbytes + values.nbytes == 1_408
    # The page's cost example: a Llama-3-8B-shaped decode step at 2,048 tokens, all 32 layers.
    assert kv_cache_bytes_per_token(32, 8, 128, 2) * 2048 == 256 * 2**20


class RecordingTable(list):
    """A block-table row that records which entries are looked up."""

    def __init__(self, block_ids: list[int]) -> None:
        super().__init__(block_ids)
        self.lookups: list[int] = []

    def __getitem__(self, index):
        self.lookups.append(index)
        return super().__getitem__(index)


@pytest.mark.task2_3
def test_reading_through_the_table_exercise_blockwise():
    _, query, k_cache, v_cache, args = reading_exercise(
        torch.Generator().manual_seed(11)
    )
    out = paged_attention(query, k_cache, v_cache, *args)
    blockwise = paged_attention_blockwise(query, k_cache, v_cache, *args)
    torch.testing.assert_close(blockwise, out, **tolerance(torch.float32))
    # 4. Lookups: _attend_blockwise is paged_attention_blockwise's loop over one sequence's blocks.
    for q_len in (3, 1):  # the exercise's chunk, then a decode step at the same seq_len
        row = RecordingTable([6, 2, 9, -1])
        rows = _attend_blockwise(query[3 - q_len :], k_cache, v_cache, row, 11, args[3])
        # one per block holding tokens; the -1 is never looked up
        assert row.lookups == [0, 1, 2]
        torch.testing.assert_close(rows, out[3 - q_len :], **tolerance(torch.float32))


# ---- chunked-prefill.md -------------------------------------------------------------------------


def chunked_schedule(budget: int) -> list[list[tuple[str, int, int, bool]]]:
    """The page's two requests on the real scheduler: for each step, what each scheduled
    sequence computes (request, first token, end, sampled a token)."""
    manager = BlockManager(block_size=4, num_gpu_blocks=16, watermark=0.0)
    config = SchedulerConfig(
        max_model_len=64,
        max_num_seqs=2,
        max_num_batched_tokens=budget,
        enable_chunked_prefill=True,
    )
    scheduler = Scheduler(config, manager)
    arrivals = {"A": (0, 3, 8), "B": (1, 20, 2)}  # step, prompt length, max tokens
    steps = []
    for step in range(20):
        for name, (at, length, _) in arrivals.items():
            if at == step:
                prompt = list(range(10, 10 + length))
                scheduler.add(SequenceGroup(name, [Sequence(prompt)], float(at)))
        if not scheduler.has_unfinished():
            break
        out = scheduler.schedule()
        row = []
        for item in out.scheduled:
            name, seq = item.group.request_id, item.seq
            row.append(
                (name, item.num_computed_tokens, item.seq_len, item.completes_sequence)
            )
            seq.num_computed_tokens = item.seq_len
            if item.completes_sequence:
                seq.append_token_id(1)
                if len(seq.output_token_ids) == arrivals[name][2]:
                    seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
                    manager.free(seq)
                    scheduler.finish(item.group)
        steps.append(row)
    return steps


def test_chunked_prefill_worked_example():
    steps = chunked_schedule(budget=8)
    assert steps[:6] == [
        [("A", 0, 3, True)],
        [("A", 3, 4, True), ("B", 0, 7, False)],
        [("A", 4, 5, True), ("B", 7, 14, False)],
        [("A", 5, 6, True), ("B", 14, 20, True)],
        [("A", 6, 7, True), ("B", 20, 21, True)],
        [("A", 7, 8, True)],
    ]
    assert [sum(end - first for _, first, end, _ in row) for row in steps[:6]] == [
        3,
        8,
        8,
        7,
        2,
        1,
    ]


def test_chunked_prefill_exercise():
    steps = chunked_schedule(budget=5)
    b_prompt = [
        (s, first, end)
        for s, row in enumerate(steps)
        for name, first, end, _ in row
        if name == "B" and first < 20
    ]
    assert b_prompt == [(1, 0, 4), (2, 4, 8), (3, 8, 12), (4, 12, 16), (5, 16, 20)]
    sampled = [
        s
        for s, row in enumerate(steps)
        for name, _, end, done in row
        if name == "B" and done
    ]
    assert sampled[0] == 5
    assert all(any(name == "A" for name, *_ in steps[s]) for s in range(1, 6))


def test_tensor_parallel_exercise():
    """docs/concepts/tensor-parallel.md: 8 query heads, 2 KV heads of 64, 32 layers, hidden 4096,
    fp16, 4 ranks, blocks of 16."""
    from transformers import LlamaConfig

    from minipaged.config import kv_cache_bytes_per_block
    from minipaged.distributed.sharding import (
        _kv_share,
        check_divisible,
        local_kv_heads,
    )

    config = LlamaConfig(
        hidden_size=4096,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        num_hidden_layers=32,
    )
    check_divisible(config, 4)
    # 1. the KV head each rank keeps: (part, parts) of the KV projections
    assert [_kv_share(rank, 4, 2) for rank in range(4)] == [
        (0, 2),
        (0, 2),
        (1, 2),
        (1, 2),
    ]
    # 2. one block, all layers, K and V, in one rank's pools
    heads = local_kv_heads(config, 4)
    assert heads == 1
    assert kv_cache_bytes_per_block(16, 32, heads, 64, 2) == 131_072
    assert kv_cache_bytes_per_block(16, 32, 2, 64, 2) == 2 * 131_072  # unsplit
    # 3. (two all-reduces a layer of tokens x hidden values) is measured on a real step by
    # test_tensor_parallel_processes.py::test_each_step_records_what_it_sent
