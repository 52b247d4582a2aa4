"""Contiguous KV allocators: the Orca baselines PagedAttention is measured against.

OS idea: base and bounds, then segmentation, give each process one contiguous range of physical
memory, placed by a free-space manager (OSTEP ch. 15-17): here *buddy* allocation (experiments/buddy.py:
power-of-two blocks, split and coalesced) or *first fit* over a free list of holes (the lowest hole
big enough; a freed range merges with the holes beside it). Two wastes follow: *internal
fragmentation*, space inside a range that is never used (buddy's rounding adds to it), and *external
fragmentation*, free space cut into pieces too small for the next range (OSTEP ch. 17).
KV counterpart: vLLM paper section 3 (Fig. 2 and 3): systems before vLLM (FasterTransformer, Orca)
stored each request's KV cache in one contiguous range reserved at admission; section 6.1's
baselines are Orca (Max), Orca (Pow2) and Orca (Oracle), which differ only in how much they reserve.
The paper's Orca places the ranges with a buddy allocator, so buddy is the default placement;
first fit places each range exactly, for comparison.

MemoryBreakdown (experiments/memory_breakdown.py), the paper's Fig. 3 categories, is the measure every
allocator reports, and experiments/vattention.py puts the demand-paged allocators (vAttention's large
pages, vLLM's blocks) behind the same calls, so that one simulator can compare all of them on one
pool of slots.

Every allocator answers: try_admit(req, num_tokens) -> bool, can_admit(reqs, num_tokens) -> bool (a dry
run), can_append(*ids), append(id), free(id), breakdown(waiting, num_tokens) -> MemoryBreakdown. A
request is anything with .request_id, .prompt_len and .output_len (the true number of tokens it
generates); its *true length* is prompt_len + output_len. Its KV cache holds at most
prompt_len + output_len - 1 tokens (final_kv_len): the last generated token is returned and the
request ends, so its K and V are never computed or stored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from minipaged.experiments.buddy import BuddyAllocator
from minipaged.experiments.first_fit import FirstFitAllocator
from minipaged.experiments.memory_breakdown import (
    BREAKDOWN_FIELDS,
    MemoryBreakdown,
    final_kv_len,
    waiting_waste,
)
from minipaged.reference.block_allocator import NoFreeBlocksError

POLICIES = ("max", "pow2", "oracle")


def reservation_size(
    policy: str, prompt_len: int, output_len: int, max_model_len: int
) -> int:
    """Slots an Orca-style allocator reserves for a request at admission (paper section 6.1).

    - "max": max_model_len, whatever the request (Orca (Max), like FasterTransformer).
    - "pow2": the prompt plus the output rounded up to a power of two, capped at max_model_len:
      the output is over-reserved by at most 2x ("if the true output length is 25, it reserves 32
      positions for outputs"; the prompt is known at admission).
    - "oracle": prompt_len + output_len, the true length (Orca (Oracle) knows the output length).

    Raises:
        ValueError: for an unknown policy.
    """
    if policy == "max":
        return max_model_len
    if policy == "pow2":
        return min(max_model_len, prompt_len + (1 << (output_len - 1).bit_length()))
    if policy == "oracle":
        return prompt_len + output_len
    raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")


def check_positive(**values: object) -> None:
    """Raise ValueError naming the first of `values` that is not a positive int."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_request(req, max_model_len: int) -> None:
    """Raise ValueError naming the request if its lengths are not positive or exceed max_model_len."""
    check_positive(prompt_len=req.prompt_len, output_len=req.output_len)
    if req.prompt_len + req.output_len > max_model_len:
        raise ValueError(
            f"request {req.request_id!r}: prompt_len + output_len = {req.prompt_len + req.output_len} "
            f"is beyond max_model_len={max_model_len}: it can never be served"
        )


PLACEMENTS = {"buddy": BuddyAllocator, "first-fit": FirstFitAllocator}


@dataclass
class _Range:
    start: int
    # slots occupied: the reservation, rounded up to a power of two by buddy placement
    size: int
    # the most tokens it will hold: final_kv_len, one less than the true length
    final: int
    num_tokens: int  # slots holding a token, from `start`


class ContiguousAllocator:
    """Orca-style: one contiguous range per request, reserved at admission.

    Args:
        capacity: token slots in the pool.
        policy: how much to reserve: "max", "pow2" or "oracle" (see reservation_size).
        max_model_len: the longest request (prompt plus output).
        placement: where a range goes: "buddy" (the default, as the paper's Orca: the range is the
            reservation rounded up to a power of two, experiments/buddy.py) or "first-fit" (exactly
            the reservation, in the lowest hole big enough).

    Raises:
        ValueError: naming the argument, for a non-positive size, an unknown policy or placement.
    """

    def __init__(
        self,
        capacity: int,
        policy: str = "max",
        max_model_len: int = 2048,
        placement: str = "buddy",
    ) -> None:
        check_positive(capacity=capacity, max_model_len=max_model_len)
        if policy not in POLICIES:
            raise ValueError(
                f"policy must be one of {', '.join(POLICIES)}, got {policy!r}"
            )
        if placement not in PLACEMENTS:
            raise ValueError(
                f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}"
            )
        self.capacity, self.policy, self.max_model_len = capacity, policy, max_model_len
        self.placement = placement
        self.pool = PLACEMENTS[placement](capacity)  # the free-space manager
        self._ranges: dict[str, _Range] = {}

    @property
    def free_extents(self) -> list[tuple[int, int]]:
        """The free space, (start, length), lowest address first: first fit's holes (never two
        adjacent: they are merged) or buddy's free blocks."""
        return self.pool.free_blocks

    def range_of(self, request_id: str) -> tuple[int, int]:
        """(start, size) of a live request's range; under buddy placement, its whole block."""
        r = self._ranges[request_id]
        return r.start, r.size

    def num_tokens(self, request_id: str) -> int:
        return self._ranges[request_id].num_tokens

    def reservation(self, req) -> int:
        """Slots this allocator reserves for `req` (see reservation_size)."""
        return reservation_size(
            self.policy, req.prompt_len, req.output_len, self.max_model_len
        )

    def footprint(self, req) -> int:
        """Slots a range for `req` occupies: the reservation, rounded up to a power of two by buddy."""
        return self.pool.block_size_of(self.reservation(req))

    def check(self, req, copies: int = 1) -> None:
        """Raise ValueError if `copies` ranges for `req` could never fit, even in an empty pool (under
        buddy placement, a range larger than the largest top-level block never fits)."""
        check_request(req, self.max_model_len)
        size = self.reservation(req)
        if not PLACEMENTS[self.placement](self.capacity).can_allocate_all(
            [size] * copies
        ):
            raise ValueError(
                f"request {req.request_id!r}: {copies} range(s) of {size} slots ({self.policy}, "
                f"{self.placement}) can never fit a pool of capacity={self.capacity}"
            )

    def try_admit(self, req, num_tokens: int | None = None) -> bool:
        """Place a range for `req` and store its first `num_tokens` tokens (the prompt) in it.

        Returns:
            False if there is no room for it now (the request waits); nothing changes then.

        Raises:
            ValueError: if the request is live already, or could never fit (see check).
        """
        self.check(req)
        if req.request_id in self._ranges:
            raise ValueError(f"request {req.request_id!r} already holds a range")
        size = self.reservation(req)
        num_tokens = req.prompt_len if num_tokens is None else num_tokens
        if not 0 < num_tokens <= size:
            raise ValueError(f"num_tokens must be in [1, {size}], got {num_tokens}")
        start = self.pool.allocate(size)
        if start is None:
            return False
        final = final_kv_len(req.prompt_len, req.output_len)
        self._ranges[req.request_id] = _Range(
            start, self.footprint(req), final, num_tokens
        )
        return True

    def can_append(self, *request_ids: str) -> bool:
        """Can each of these requests store one more token? Yes until its range is full."""
        return all(
            self._ranges[i].num_tokens < self._ranges[i].size for i in request_ids
        )

    def append(self, request_id: str) -> None:
        """Store one more token of the request, in the next slot of its range.

        Raises:
            NoFreeBlocksError: if the range is full: a contiguous range cannot grow in place.
        """
        r = self._ranges[request_id]
        if r.num_tokens >= r.size:
            raise NoFreeBlocksError(
                f"request {request_id!r} has filled its {r.size} reserved slots"
            )
        r.num_tokens += 1

    def free(self, request_id: str) -> None:
        """Return the request's range to the pool (coalesced with the free space beside it)."""
        self.pool.free(self._ranges.pop(request_id).start)

    def can_place(self, reqs: Iterable) -> bool:
        """Would the placement find room for ranges for all of `reqs` now (a dry run)?"""
        return self.pool.can_allocate_all([self.reservation(req) for req in reqs])

    def can_admit(self, reqs: Iterable, num_tokens: int | None = None) -> bool:
        """Would try_admit place every one of `reqs` now (a dry run)? A range's size does not depend
        on the tokens stored at admission, so `num_tokens` is accepted for symmetry and ignored."""
        return self.can_place(reqs)

    def breakdown(
        self, waiting: Iterable = (), num_tokens: int | None = None
    ) -> MemoryBreakdown:
        """The pool now, in the Fig. 3 categories.

        Args:
            waiting: the head of the waiting queue, one entry per range it needs (its sequences), if a
                request waits; empty if none does. If they cannot be placed, the free slots are lost
                while it waits: external fragmentation if their total would hold the ranges'
                footprints, stranded if not (waiting_waste).
            num_tokens: ignored (see can_admit).
        """
        tokens = sum(r.num_tokens for r in self._ranges.values())
        reserved = sum(max(0, r.final - r.num_tokens) for r in self._ranges.values())
        internal = sum(
            r.size - max(r.final, r.num_tokens) for r in self._ranges.values()
        )
        free, waiting = self.pool.num_free, list(waiting)
        blocked = bool(waiting) and not self.can_place(waiting)
        fits_in_total = sum(self.footprint(req) for req in waiting) <= free
        external, stranded, free = waiting_waste(free, blocked, fits_in_total)
        return MemoryBreakdown(tokens, reserved, internal, external, stranded, free)


__all__ = [
    "BREAKDOWN_FIELDS",
    "PLACEMENTS",
    "POLICIES",
    "ContiguousAllocator",
    "FirstFitAllocator",
    "MemoryBreakdown",
    "check_positive",
    "check_request",
    "final_kv_len",
    "reservation_size",
    "waiting_waste",
]
