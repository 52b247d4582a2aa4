"""The buddy allocator (experiments/buddy.py) and the Orca baselines placed by it.

A hypothesis state machine allocates random sizes and frees random live blocks, and checks after
every step: live and free blocks tile the pool (no overlap, nothing outside it, nothing lost), each
block is a power of two aligned to its size within its top-level block, a live block is the next
power of two of the size asked, the smallest free block large enough served it, no two free buddies
stay unmerged (coalescing is complete), and the dry run agrees with the real thing. Freeing
everything gives back exactly the initial top-level blocks. Unit tests walk split and coalesce by
hand (the docs page's walk-through and exercise), a pool that is not a power of two, the errors,
and ContiguousAllocator with placement="buddy".
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from minipaged.experiments.baselines import (
    BREAKDOWN_FIELDS,
    ContiguousAllocator,
    FirstFitAllocator,
)
from minipaged.experiments.buddy import BuddyAllocator


@dataclass(frozen=True)
class Req:
    request_id: str
    prompt_len: int
    output_len: int


class BuddyMachine(RuleBasedStateMachine):
    """Random allocate / free on one BuddyAllocator, against a model of the live blocks."""

    @initialize(capacity=st.integers(1, 100))
    def setup(self, capacity):
        self.pool = BuddyAllocator(capacity)
        self.initial = self.pool.free_blocks
        self.live: dict[int, tuple[int, int]] = {}  # start -> (size asked, block size)

    # small ones often; some never fit
    @rule(size=st.one_of(st.integers(1, 8), st.integers(1, 130)))
    def allocate(self, size):
        before, block = self.pool.free_blocks, self.pool.block_size_of(size)
        if block > self.pool.max_block_size:
            with pytest.raises(ValueError, match=r"size=.*can never fit"):
                self.pool.allocate(size)
            assert self.pool.free_blocks == before
            return
        start = self.pool.allocate(size)
        fitting = [(s, n) for s, n in before if n >= block]
        if start is None:  # no free block is large enough: refused, and nothing changed
            assert not fitting and self.pool.free_blocks == before
            return
        # the smallest free block large enough, lowest first
        smallest = min(n for _, n in fitting)
        assert start == min(s for s, n in fitting if n == smallest)
        assert start not in self.live
        self.live[start] = (size, block)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        start = data.draw(st.sampled_from(sorted(self.live)))
        self.pool.free(start)
        del self.live[start]
        with pytest.raises(ValueError, match="double free"):
            self.pool.free(start)

    @rule(sizes=st.lists(st.integers(1, 40), max_size=5))
    def dry_run(self, sizes):
        """can_allocate_all changes nothing and says what allocating them in order would do."""
        before, trial = self.pool.free_blocks, copy.deepcopy(self.pool)
        expected = all(
            trial.block_size_of(s) <= trial.max_block_size
            and trial.allocate(s) is not None
            for s in sizes
        )
        assert self.pool.can_allocate_all(sizes) == expected
        assert self.pool.free_blocks == before

    @invariant()
    def blocks_tile_the_pool(self):
        """Live and free blocks never overlap, lie inside the pool, and together cover it."""
        assert self.pool.allocated_blocks == sorted(
            (s, block) for s, (_, block) in self.live.items()
        )
        position = 0
        for start, size in sorted(self.pool.allocated_blocks + self.pool.free_blocks):
            assert start == position and size > 0
            position += size
        assert position == self.pool.capacity
        used = sum(block for _, block in self.live.values())
        assert self.pool.num_free + used == self.pool.capacity

    @invariant()
    def blocks_are_aligned_powers_of_two(self):
        for start, size in self.pool.allocated_blocks + self.pool.free_blocks:
            base, top_size = self.pool.top_level_block_of(start)
            assert size & (size - 1) == 0, "not a power of two"
            assert (start - base) % size == 0 and start + size <= base + top_size
        # the next power of two: at least asked, under 2x
        for asked, block in self.live.values():
            assert asked <= block < 2 * asked or block == asked == 1

    @invariant()
    def coalescing_is_complete(self):
        """No free block has its buddy free: the two would have merged."""
        free = set(self.pool.free_blocks)
        for start, size in free:
            buddy = self.pool.buddy_of(start, size)
            assert buddy is None or (buddy, size) not in free, (
                f"free buddies {start}, {buddy} unmerged"
            )
        for k, starts in enumerate(self.pool.free_area):
            assert starts == sorted(starts) and all(
                ((s, 1 << k) in free) for s in starts
            )
        assert self.pool.largest_free_block == max((n for _, n in free), default=0)

    def teardown(self):
        if not hasattr(self, "pool"):
            return
        for start in list(self.live):
            self.pool.free(start)
        assert self.pool.free_blocks == self.initial == self.pool.top_level_blocks
        assert self.pool.num_free == self.pool.capacity


TestBuddyMachine = BuddyMachine.TestCase


@pytest.mark.parametrize(
    ("size", "block"), [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (9, 16), (2048, 2048)]
)
def test_block_size_is_the_next_power_of_two(size, block):
    assert BuddyAllocator(4096).block_size_of(size) == block


def test_docs_split_and_coalesce_walkthrough():
    """docs/concepts/buddy-allocation.md: A (3 slots), B (5), C (2) on 16 slots, then A and C freed."""
    pool = BuddyAllocator(16)
    assert pool.free_area == [[], [], [], [], [0]]
    assert pool.allocate(3) == 0  # 16 -> 8 + 8, 8 -> 4 + 4: A keeps the lowest 4
    assert pool.free_blocks == [(4, 4), (8, 8)]
    assert pool.free_area == [[], [], [4], [8], []]
    assert pool.allocate(5) == 8  # B needs 8: the free 8 at slot 8 serves, no split
    assert pool.free_blocks == [(4, 4)]
    assert pool.allocate(2) == 4  # C needs 2: the free 4 at slot 4 splits into 2 + 2
    assert pool.free_blocks == [(6, 2)]
    assert pool.num_free == 2 and pool.largest_free_block == 2
    pool.free(0)  # A's buddy is the block at 0 ^ 4 = 4, split (C holds half): no merge
    assert pool.free_blocks == [(0, 4), (6, 2)]
    # C merges with 4 ^ 2 = 6, then (4, 4) with 4 ^ 4 = 0; (0, 8)'s buddy 8 is B's
    pool.free(4)
    assert pool.free_blocks == [(0, 8)]
    assert pool.free_area == [[], [], [], [0], []]
    pool.free(8)
    assert pool.free_blocks == [(0, 16)]


def test_docs_exercise_adjacent_free_blocks_that_are_not_buddies():
    """docs/concepts/buddy-allocation.md, the exercise: B and C free 8 contiguous slots, 4..11, in two
    blocks that are not buddies, so a request of 7 slots (a block of 8) waits; first fit places it."""
    pool = BuddyAllocator(16)
    assert [pool.allocate(size) for size in (3, 4, 2, 4)] == [0, 4, 8, 12]  # A, B, C, D
    assert pool.allocated_blocks == [(0, 4), (4, 4), (8, 2), (12, 4)]
    # A's rounding
    assert sum(size for _, size in pool.allocated_blocks) - (3 + 4 + 2 + 4) == 1
    assert pool.free_blocks == [(10, 2)]
    pool.free(4)  # B: its buddy (0, 4) is A's
    pool.free(8)  # C: merges with (10, 2) into (8, 4), whose buddy (12, 4) is D's
    assert pool.free_blocks == [(4, 4), (8, 4)]
    assert (pool.buddy_of(4, 4), pool.buddy_of(8, 4)) == (0, 12)
    assert pool.num_free == 8 and pool.largest_free_block == 4
    assert pool.allocate(7) is None  # E: a block of 8, and no free block of 8
    # Seen by the Orca baseline: the 8 free slots would hold E's block: external fragmentation.
    alloc = ContiguousAllocator(16, "oracle", 16)
    for name, (prompt_len, output_len) in zip(
        "ABCD", [(2, 1), (3, 1), (1, 1), (3, 1)], strict=True
    ):
        # reserves 3, 4, 2, 4 slots
        assert alloc.try_admit(Req(name, prompt_len, output_len))
    alloc.free("B")
    alloc.free("C")
    b = alloc.breakdown([Req("E", 4, 3)])
    assert (b.external_fragmentation, b.stranded, b.free) == (8, 0, 0)
    # First fit keeps holes, not blocks: the same two free extents merge into one, and E fits.
    first_fit = FirstFitAllocator(16)
    assert [first_fit.allocate(4) for _ in range(4)] == [0, 4, 8, 12]
    first_fit.free(4)
    first_fit.free(8)
    assert first_fit.free_blocks == [(4, 8)] and first_fit.allocate(7) == 4
    pool.free(0)  # A finishes: (0, 4) and (4, 4) merge into (0, 8), and E fits there
    assert pool.free_blocks == [(0, 8), (8, 4)] and pool.allocate(7) == 0


def test_a_pool_that_is_not_a_power_of_two():
    """15,000 slots, the experiments' pool: the bits of 15,000, each an aligned top-level block."""
    pool = BuddyAllocator(15_000)
    assert pool.top_level_blocks == [
        (0, 8192),
        (8192, 4096),
        (12288, 2048),
        (14336, 512),
        (14848, 128),
        (14976, 16),
        (14992, 8),
    ]
    assert pool.max_block_size == 8192 and pool.num_free == 15_000
    assert pool.can_allocate_all([2048] * 7) and not pool.can_allocate_all([2048] * 8)
    with pytest.raises(ValueError, match="size=8193 needs a block of 16384 slots"):
        pool.allocate(8193)
    assert pool.allocate(10) == 14976  # a block of 16: the top-level 16 serves, unsplit
    assert pool.allocate(5) == 14992  # a block of 8: the top-level 8
    assert pool.allocate(100) == 14848  # a block of 128
    # a block of 4: the smallest free block is now the 512
    assert pool.allocate(3) == 14336
    assert pool.free_blocks[:4] == [(0, 8192), (8192, 4096), (12288, 2048), (14340, 4)]


def test_blocks_never_merge_across_top_level_blocks():
    pool = BuddyAllocator(24)  # 16 at 0, 8 at 16
    assert pool.allocate(16) == 0 and pool.allocate(8) == 16
    # top-level: no buddy
    assert pool.buddy_of(0, 16) is None and pool.buddy_of(16, 8) is None
    pool.free(0)
    pool.free(16)
    # never (0, 24): 24 is not a power of two
    assert pool.free_blocks == [(0, 16), (16, 8)]
    # the smallest block large enough serves, the 16 stays whole
    assert pool.allocate(8) == 16
    assert pool.free_blocks == [(0, 16)]


def test_a_refused_allocate_changes_nothing():
    pool = BuddyAllocator(16)
    assert pool.allocate(8) == 0 and pool.allocate(2) == 8
    before, area = pool.free_blocks, [list(s) for s in pool.free_area]
    assert pool.allocate(5) is None  # 6 slots free, but the largest free block is 4
    assert pool.free_blocks == before and pool.free_area == area
    # 4 + 2 fit; the third single does not
    assert not pool.can_allocate_all([4, 1, 1, 1])
    assert pool.can_allocate_all([4, 1, 1]) and pool.free_blocks == before


@pytest.mark.parametrize("capacity", [0, -4, 2.0, True, None])
def test_bad_capacity_raises_naming_it(capacity):
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        BuddyAllocator(capacity)


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "4"])
def test_bad_sizes_raise_naming_them(size):
    pool = BuddyAllocator(16)
    for call in (
        pool.allocate,
        pool.block_size_of,
        lambda s: pool.can_allocate_all([1, s]),
    ):
        with pytest.raises(ValueError, match="size must be a positive int"):
            call(size)
    assert pool.free_blocks == [(0, 16)]


def test_bad_frees_raise_naming_the_start():
    pool = BuddyAllocator(16)
    a = pool.allocate(4)
    with pytest.raises(ValueError, match="start=2: no allocated block starts"):
        pool.free(2)  # inside A's block, not its start
    with pytest.raises(ValueError, match="start=8: double free"):
        pool.free(8)  # never allocated, and free
    with pytest.raises(ValueError, match="start=99: no allocated block"):
        pool.free(99)
    pool.free(a)
    with pytest.raises(ValueError, match="start=0: double free"):
        pool.free(a)
    assert pool.free_blocks == [(0, 16)]


# ---- ContiguousAllocator(placement="buddy"): the Orca baselines' default ----------------------


def test_buddy_is_the_default_placement():
    assert ContiguousAllocator(64).placement == "buddy"
    with pytest.raises(ValueError, match="placement must be one of buddy, first-fit"):
        ContiguousAllocator(64, placement="best-fit")


def test_a_buddy_range_occupies_its_power_of_two_and_the_rounding_is_internal_fragmentation():
    """Oracle reserves 5 + 4 = 9 slots; buddy gives a block of 16. The request stores at most 8
    tokens (its last is never stored), so 16 - 8 = 8 slots are internal fragmentation: 7 of
    rounding and the last token's slot."""
    alloc = ContiguousAllocator(64, "oracle", 32)
    req = Req("a", 5, 4)
    assert (alloc.reservation(req), alloc.footprint(req)) == (9, 16)
    assert alloc.try_admit(req) and alloc.range_of("a") == (0, 16)
    assert alloc.free_extents == [(16, 16), (32, 32)]
    b = alloc.breakdown()
    assert (b.token_states, b.reserved, b.internal_fragmentation, b.free) == (
        5,
        3,
        8,
        48,
    )
    assert sum(getattr(b, name) for name in BREAKDOWN_FIELDS) == 64
    first_fit = ContiguousAllocator(64, "oracle", 32, placement="first-fit")
    assert first_fit.try_admit(req) and first_fit.range_of("a") == (0, 9)
    # the last token's slot only
    assert first_fit.breakdown().internal_fragmentation == 1


def test_buddy_free_slots_too_few_for_the_block_are_stranded():
    """13 free slots would hold a 9-slot reservation, not its 16-slot block: stranded, not external."""
    alloc = ContiguousAllocator(32, "oracle", 32)
    assert alloc.try_admit(Req("a", 10, 5))  # 15 -> a block of 16 at slot 0
    assert alloc.try_admit(Req("b", 2, 1))  # 3 -> a block of 4 at slot 16
    assert alloc.free_extents == [(20, 4), (24, 8)]
    # 9 slots, a block of 16: 12 free slots are too few
    b = alloc.breakdown([Req("c", 4, 5)])
    assert (b.external_fragmentation, b.stranded, b.free) == (0, 12, 0)
    b = alloc.breakdown([Req("d", 4, 4)])  # 8 slots: the free block (24, 8) holds it
    assert (b.external_fragmentation, b.stranded, b.free) == (0, 0, 12)


@pytest.mark.parametrize("placement", ["buddy", "first-fit"])
def test_orca_max_uses_exactly_2048_slots_per_range(placement):
    """Orca (Max) at max_model_len 2048: 2048 is a power of two, so buddy rounds nothing, and a
    pool of 15,000 slots holds 7 ranges under either placement."""
    alloc = ContiguousAllocator(15_000, "max", 2048, placement=placement)
    reqs = [Req(f"r{i}", 100, 50) for i in range(8)]
    assert [alloc.try_admit(r) for r in reqs] == [True] * 7 + [False]
    assert all(alloc.range_of(r.request_id)[1] == 2048 for r in reqs[:7])
    assert alloc.breakdown().internal_fragmentation == 7 * (2048 - 149)
    assert alloc.breakdown().free == 15_000 - 7 * 2048


def test_a_range_larger_than_the_largest_top_level_block_can_never_fit():
    """10,000 slots fit a 15,000-slot pool by first fit, never by buddy: a block of 16,384."""
    req = Req("long", 5_000, 5_000)
    ContiguousAllocator(15_000, "oracle", 16_384, placement="first-fit").check(req)
    alloc = ContiguousAllocator(15_000, "oracle", 16_384)
    with pytest.raises(ValueError, match="can never fit a pool of capacity=15000"):
        alloc.try_admit(req)
    # 3 blocks of 4096: 8192 holds two, 4096 one
    alloc.check(Req("two", 2_000, 2_000), copies=3)
    with pytest.raises(ValueError, match="4 range"):
        alloc.check(Req("two", 2_000, 2_000), copies=4)
