"""The baseline allocators: contiguous ranges (buddy or first fit), vAttention pages, the paged adapter.

A hypothesis state machine admits, grows and frees random requests and checks after every step:
no two live reservations overlap and all lie inside the pool, the breakdown's fields are
non-negative and sum to the capacity, token_states is the sum of the tokens stored, first fit takes
the lowest hole that fits and buddy the smallest free block large enough, and freeing everything
gives the whole pool back (one free extent by first fit, the top-level blocks by buddy). Unit tests
pin the reservation of each policy, the docs page's worked example (first fit) and the errors; the
buddy allocator itself is tested in tests/test_buddy.py.
"""

from __future__ import annotations

import itertools
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
    MemoryBreakdown,
    reservation_size,
)
from minipaged.experiments.buddy import BuddyAllocator
from minipaged.experiments.vattention import PagedAllocator, VAttentionAllocator
from minipaged.reference.block_allocator import NoFreeBlocksError


@dataclass(frozen=True)
class Req:
    request_id: str
    prompt_len: int
    output_len: int


def check_breakdown(b: MemoryBreakdown, capacity: int, tokens: int) -> None:
    assert all(getattr(b, name) >= 0 for name in BREAKDOWN_FIELDS), b
    assert b.capacity == capacity
    assert b.token_states == tokens


class AllocatorMachine(RuleBasedStateMachine):
    """Random admit / append / free on one allocator, against a model of what each request stored."""

    @initialize(
        kind=st.sampled_from(["contiguous", "vattention", "paged"]),
        policy=st.sampled_from(["max", "pow2", "oracle"]),
        placement=st.sampled_from(["buddy", "first-fit"]),
        capacity=st.integers(16, 96),
        page_tokens=st.sampled_from([1, 3, 4, 8]),
        max_model_len=st.sampled_from([8, 16]),
    )
    def setup(self, kind, policy, placement, capacity, page_tokens, max_model_len):
        self.kind, self.max_model_len = kind, max_model_len
        if kind == "contiguous":
            self.alloc = ContiguousAllocator(capacity, policy, max_model_len, placement)
        elif kind == "vattention":
            self.alloc = VAttentionAllocator(
                capacity, page_tokens, max_model_len, watermark=0.0
            )
        else:
            self.alloc = PagedAllocator(
                capacity, page_tokens, max_model_len, watermark=0.0
            )
        self.tokens: dict[str, int] = {}  # live request -> tokens stored
        self.reqs: dict[str, Req] = {}
        self.next_id = 0

    @rule(data=st.data())
    def admit(self, data):
        prompt_len = data.draw(st.integers(1, self.max_model_len - 1))
        output_len = data.draw(st.integers(1, self.max_model_len - prompt_len))
        req = Req(f"r{self.next_id}", prompt_len, output_len)
        self.next_id += 1
        holes = self.alloc.free_extents if self.kind == "contiguous" else None
        try:
            admitted = self.alloc.try_admit(req)
        except ValueError:  # can never fit this pool: refused, and nothing changed
            assert (
                self.kind != "contiguous"
                or self.alloc.footprint(req) > self.alloc.pool.max_block_size
            )
            return
        if self.kind == "contiguous":
            # the reservation, rounded up to a power of two by buddy
            size = self.alloc.footprint(req)
            fitting = [(start, length) for start, length in holes if length >= size]
            # the lowest hole big enough
            if admitted and self.alloc.placement == "first-fit":
                assert self.alloc.range_of(req.request_id) == (fitting[0][0], size)
            # buddy: the smallest free block big enough, lowest first, split
            elif admitted:
                smallest = min(length for _, length in fitting)
                start = min(start for start, length in fitting if length == smallest)
                assert self.alloc.range_of(req.request_id) == (start, size)
                assert size == BuddyAllocator(1).block_size_of(
                    self.alloc.reservation(req)
                )
            else:
                assert not fitting and self.alloc.free_extents == holes
        if admitted:
            self.tokens[req.request_id], self.reqs[req.request_id] = prompt_len, req

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def append(self, data):
        request_id = data.draw(st.sampled_from(sorted(self.tokens)))
        if self.alloc.can_append(request_id):
            self.alloc.append(request_id)
            self.tokens[request_id] += 1
        else:
            with pytest.raises(NoFreeBlocksError):
                self.alloc.append(request_id)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        request_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self.alloc.free(request_id)
        del self.tokens[request_id], self.reqs[request_id]

    @invariant()
    def breakdown_sums_to_capacity(self):
        check_breakdown(
            self.alloc.breakdown(), self.alloc.capacity, sum(self.tokens.values())
        )

    @invariant()
    def reservations_are_disjoint_and_inside_the_pool(self):
        if self.kind == "contiguous":
            spans = sorted(
                [self.alloc.range_of(i) for i in self.tokens] + self.alloc.free_extents
            )
            position = 0
            for start, length in spans:  # ranges and holes tile the pool exactly
                assert start == position and length > 0
                position += length
            assert position == self.alloc.capacity
            holes = self.alloc.free_extents
            if self.alloc.placement == "first-fit":
                assert all(sum(a) < b[0] for a, b in itertools.pairwise(holes)), (
                    "adjacent holes not merged"
                )
            else:  # buddy: no free block has its buddy free
                buddies = {
                    (self.alloc.pool.buddy_of(start, size), size)
                    for start, size in holes
                }
                assert not buddies & set(holes), "free buddies not merged"
            for i, n in self.tokens.items():
                assert n <= self.alloc.range_of(i)[1]
        elif self.kind == "vattention":
            pages = [p for i in self.tokens for p in self.alloc.pages_of(i)]
            assert len(pages) == len(set(pages)) and all(
                0 <= p < self.alloc.pages.num_blocks for p in pages
            )
            # mapped on demand: exactly the pages its tokens need
            for i, n in self.tokens.items():
                assert len(self.alloc.pages_of(i)) == -(-n // self.alloc.page_tokens)

    @invariant()
    def waiting_head_makes_free_slots_waste(self):
        """One rule for every allocator: while the head cannot be admitted, every free slot is waste,
        external fragmentation if together they would hold it (holes: contiguous only), else stranded."""
        head = Req("head", 1, self.max_model_len - 1)
        alone, b = self.alloc.breakdown(), self.alloc.breakdown([head])
        assert b.token_states == alone.token_states and b.used - alone.used in (
            0,
            alone.free,
        )
        if self.alloc.can_admit([head]):
            assert b == alone
            return
        assert b.free == 0 and b.external_fragmentation + b.stranded == alone.free
        if self.kind == "contiguous" and self.alloc.footprint(head) <= alone.free:
            # enough slots in all, no hole big enough
            assert b.external_fragmentation == alone.free
        else:
            assert b.stranded == alone.free and b.external_fragmentation == 0

    @invariant()
    def reserved_and_internal_follow_the_final_length(self):
        """A request stores at most prompt_len + output_len - 1 tokens: its last token is never
        stored, so a range's last slot is internal fragmentation, never reserved."""
        if self.kind != "contiguous":
            assert self.alloc.breakdown().reserved == 0
            return
        reserved = internal = 0
        for i, n in self.tokens.items():
            final, size = (
                self.reqs[i].prompt_len + self.reqs[i].output_len - 1,
                self.alloc.range_of(i)[1],
            )
            reserved += max(0, final - n)
            internal += size - max(final, n)
        b = self.alloc.breakdown()
        assert (b.reserved, b.internal_fragmentation) == (reserved, internal)

    def teardown(self):
        if not hasattr(self, "alloc"):
            return
        for request_id in list(self.tokens):
            self.alloc.free(request_id)
        b = self.alloc.breakdown()
        assert b.free == self.alloc.capacity  # all memory returned
        if self.kind == "contiguous" and self.alloc.placement == "first-fit":
            # as one extent
            assert self.alloc.free_extents == [(0, self.alloc.capacity)]
        elif self.kind == "contiguous":  # buddy: as the blocks it started with
            assert (
                self.alloc.free_extents
                == BuddyAllocator(self.alloc.capacity).top_level_blocks
            )


TestAllocatorMachine = AllocatorMachine.TestCase


@pytest.mark.parametrize(
    ("policy", "prompt_len", "output_len", "expected"),
    [
        ("max", 10, 25, 2048),  # whatever the request
        # the paper's example: output 25 -> 32 positions for outputs
        ("pow2", 10, 25, 10 + 32),
        ("pow2", 10, 32, 10 + 32),  # already a power of two
        ("pow2", 10, 33, 10 + 64),  # at most 2x
        ("pow2", 7, 1, 7 + 1),
        ("pow2", 1600, 400, 2048),  # 1600 + 512 capped at max_model_len
        ("oracle", 10, 25, 35),  # the true length
    ],
)
def test_reservation_sizes(policy, prompt_len, output_len, expected):
    assert reservation_size(policy, prompt_len, output_len, 2048) == expected
    assert (
        ContiguousAllocator(4096, policy).reservation(Req("a", prompt_len, output_len))
        == expected
    )


# the worked example of the docs page
A, B, C = Req("A", 3, 4), Req("B", 2, 9), Req("C", 5, 3)


def run_worked_example(alloc):
    """Admit A, B, C in order (each that fits stores its prompt), then two decode steps."""
    admitted = [r.request_id for r in (A, B, C) if alloc.try_admit(r)]
    for _ in range(2):
        for request_id in admitted:
            alloc.append(request_id)
    return admitted


@pytest.mark.parametrize(
    ("alloc", "admitted", "expected"),
    [
        (ContiguousAllocator(32, "max", 16, "first-fit"), "AB", (9, 7, 16, 0, 0, 0)),
        (ContiguousAllocator(32, "pow2", 16, "first-fit"), "ABC", (16, 7, 9, 0, 0, 0)),
        (
            ContiguousAllocator(32, "oracle", 16, "first-fit"),
            "ABC",
            (16, 7, 3, 0, 0, 6),
        ),
        # 16: no rounding
        (ContiguousAllocator(32, "max", 16), "AB", (9, 7, 16, 0, 0, 0)),
        # C's 16 > 8 free
        (ContiguousAllocator(32, "pow2", 16), "AB", (9, 7, 8, 0, 8, 0)),
        (ContiguousAllocator(32, "oracle", 16), "ABC", (16, 7, 9, 0, 0, 0)),
        (VAttentionAllocator(32, 8, 16, watermark=0.0), "ABC", (16, 0, 8, 0, 0, 8)),
        (PagedAllocator(32, 4, 16, watermark=0.0), "ABC", (16, 0, 4, 0, 0, 12)),
    ],
    ids=[
        "max",
        "pow2",
        "oracle",
        "max-buddy",
        "pow2-buddy",
        "oracle-buddy",
        "vattention",
        "paged",
    ],
)
def test_docs_worked_example(alloc, admitted, expected):
    """docs/concepts/baseline-allocators.md, the table of the worked example."""
    assert "".join(run_worked_example(alloc)) == admitted
    # the picture's blocks
    if isinstance(alloc, ContiguousAllocator) and alloc.placement == "buddy":
        blocks = {
            "max": [(0, 16), (16, 16)],
            "pow2": [(0, 8), (16, 16)],
            "oracle": [(0, 8), (16, 16), (8, 8)],
        }
        assert [alloc.range_of(r) for r in admitted] == blocks[alloc.policy]
    waiting = [C] if admitted == "AB" else []
    b = alloc.breakdown(waiting)
    assert tuple(getattr(b, name) for name in BREAKDOWN_FIELDS) == expected
    assert b.capacity == 32


def test_docs_external_fragmentation():
    """The docs page's exercise: Oracle, A finishes, D (9 slots) finds 13 free slots and no hole."""
    alloc = ContiguousAllocator(32, "oracle", 16, "first-fit")
    run_worked_example(alloc)
    assert [alloc.range_of(r) for r in "ABC"] == [(0, 7), (7, 11), (18, 8)]
    alloc.free("A")
    assert alloc.free_extents == [(0, 7), (26, 6)]
    d = Req("D", 4, 5)
    b = alloc.breakdown([d])
    # 13 >= 9 slots, in two holes
    assert (b.external_fragmentation, b.stranded, b.free) == (13, 0, 0)
    # 16 slots: more than the 13 free slots together: they are stranded
    big = Req("E", 4, 12)
    b = alloc.breakdown([big])
    assert (b.external_fragmentation, b.stranded, b.free) == (0, 13, 0)
    assert not alloc.try_admit(d)
    # B's range merges with the hole before it: one hole of 18 slots at 0
    alloc.free("B")
    assert alloc.free_extents == [(0, 18), (26, 6)]
    assert alloc.try_admit(d) and alloc.range_of("D") == (0, 9)
    assert alloc.free_extents == [(9, 9), (26, 6)]


@pytest.mark.parametrize(
    ("policy", "placement", "size"),
    [
        ("oracle", "first-fit", 15),
        ("pow2", "first-fit", 18),
        ("max", "first-fit", 64),
        # 15 rounded up to a power of two: one more slot never used
        ("oracle", "buddy", 16),
        ("pow2", "buddy", 32),
        ("max", "buddy", 64),
    ],
)
def test_the_last_token_is_never_stored_so_its_slot_is_internal_fragmentation(
    policy, placement, size
):
    """A 10 + 5 request stores at most 14 tokens: the 5th output token ends it unstored. The slot
    reserved for it is internal fragmentation from the start, never "reserved"."""
    alloc = ContiguousAllocator(128, policy, 64, placement)
    assert alloc.try_admit(Req("a", 10, 5))  # the prefill stores the prompt
    b = alloc.breakdown()
    assert (b.token_states, b.reserved, b.internal_fragmentation) == (10, 4, size - 14)
    # output tokens 1 to 4 are stored by the next steps; the 5th never is
    for _ in range(4):
        alloc.append("a")
    b = alloc.breakdown()
    assert (b.token_states, b.reserved, b.internal_fragmentation) == (14, 0, size - 14)


@pytest.mark.parametrize(
    "alloc",
    [
        VAttentionAllocator(100, 10, 64, watermark=0.2),
        PagedAllocator(100, 10, 64, watermark=0.2),
    ],
    ids=["vattention", "paged"],
)
def test_on_demand_free_pages_are_stranded_while_the_head_waits(alloc):
    """The same rule as the contiguous allocators': the head cannot be admitted, so the free pages are
    waste; never external fragmentation, since any free page would serve it."""
    # 6 of the 10 pages; 2 are kept free (the watermark)
    assert alloc.try_admit(Req("a", 55, 5))
    # 2 more pages leave 2: it would be admitted
    assert alloc.breakdown([Req("b", 20, 5)]).free == 40
    b = alloc.breakdown([Req("c", 21, 5)])  # 3 pages would leave 1 < 2: it waits
    assert (b.external_fragmentation, b.stranded, b.free) == (0, 40, 0)
    assert b.used == 100 and b.token_states == 55


@pytest.mark.parametrize(
    "alloc",
    [
        VAttentionAllocator(16, 4, 16, watermark=0.0),
        PagedAllocator(16, 4, 16, watermark=0.0),
    ],
)
def test_a_refused_append_changes_nothing(alloc):
    """Found by the state machine: a paged append that found no free block used to keep the token it
    had added, so the next append asked for two blocks."""
    # the 4 pages: all
    assert alloc.try_admit(Req("a", 8, 8)) and alloc.try_admit(Req("b", 8, 8))
    with pytest.raises(NoFreeBlocksError):
        alloc.append("a")  # a 9th token needs a 3rd page
    assert alloc.breakdown().token_states == 16
    alloc.free("b")
    assert alloc.can_append("a")
    alloc.append("a")
    assert (
        alloc.breakdown().token_states == 9
        and alloc.breakdown().internal_fragmentation == 3
    )


def test_free_merges_both_neighbours():
    alloc = ContiguousAllocator(30, "oracle", 10, "first-fit")
    for name in "abc":
        assert alloc.try_admit(Req(name, 5, 5))
    alloc.free("a")
    alloc.free("c")
    assert alloc.free_extents == [(0, 10), (20, 10)]
    alloc.free("b")
    assert alloc.free_extents == [(0, 30)]


def test_contiguous_range_cannot_grow_past_its_reservation():
    alloc = ContiguousAllocator(16, "oracle", 16)
    alloc.try_admit(Req("a", 3, 1))
    alloc.append("a")  # the slot of its one output token
    assert not alloc.can_append("a")
    with pytest.raises(NoFreeBlocksError, match="filled its 4 reserved slots"):
        alloc.append("a")


def test_vattention_maps_pages_on_demand_and_keeps_its_watermark():
    # 10 pages, 2 kept free at admission
    alloc = VAttentionAllocator(100, 10, 64, watermark=0.2)
    assert alloc.try_admit(Req("a", 25, 5))  # 3 pages
    assert alloc.pages_of("a") == [0, 1, 2]
    for _ in range(5):
        alloc.append("a")
    assert len(alloc.pages_of("a")) == 3  # 30 tokens still fit 3 pages
    alloc.append("a")
    assert len(alloc.pages_of("a")) == 4  # the 31st maps a fourth
    assert not alloc.try_admit(Req("b", 41, 1))  # 5 pages would leave 1 < 2 free
    assert alloc.try_admit(Req("b", 40, 1))
    # only the last page of each is partly empty
    assert alloc.breakdown().internal_fragmentation == 9


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ContiguousAllocator(0), "capacity"),
        (lambda: ContiguousAllocator(64, "best"), "policy"),
        (lambda: ContiguousAllocator(64, "max", 0), "max_model_len"),
        (lambda: ContiguousAllocator(64, "max", 16, "best-fit"), "placement"),
        (lambda: VAttentionAllocator(64, 0), "page_tokens"),
        (lambda: VAttentionAllocator(64, 128), "page_tokens"),
        (lambda: VAttentionAllocator(64, 8, watermark=1.0), "watermark"),
        (lambda: PagedAllocator(64, 0), "block_size"),
        (lambda: reservation_size("first-fit", 1, 1, 8), "policy"),
    ],
)
def test_bad_arguments_raise_naming_them(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "alloc",
    [
        ContiguousAllocator(64, "max", 128),
        VAttentionAllocator(64, 8, 128),
        PagedAllocator(64, 4, 128),
    ],
    ids=["contiguous", "vattention", "paged"],
)
def test_requests_that_can_never_fit_are_refused(alloc):
    with pytest.raises(ValueError, match="can never"):
        alloc.try_admit(Req("huge", 100, 20))  # fits max_model_len, never the pool
    with pytest.raises(ValueError, match="max_model_len"):
        alloc.try_admit(Req("long", 100, 100))
    with pytest.raises(ValueError, match="output_len"):
        alloc.try_admit(Req("empty", 4, 0))
    assert alloc.breakdown().free == alloc.capacity  # nothing was taken


def test_same_request_twice_is_refused():
    alloc = ContiguousAllocator(64, "oracle", 64)
    alloc.try_admit(Req("a", 4, 4))
    with pytest.raises(ValueError, match="already"):
        alloc.try_admit(Req("a", 4, 4))
