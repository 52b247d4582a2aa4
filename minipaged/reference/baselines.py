"""Contiguous KV allocators: the systems PagedAttention is measured against.

OS idea: base and bounds, then segmentation, give each process one contiguous range of physical
memory. A free list of holes (extents) places each new range, here by *first fit*: scan the holes from
the lowest address and take the first one big enough; freeing a range merges it with free neighbours
(coalescing). Two wastes follow: *internal fragmentation*, space inside a range that is never used,
and *external fragmentation*, free space cut into holes too small for the next range (OSTEP ch. 15-17).
KV counterpart: vLLM paper section 3 (Fig. 2 and 3): systems before vLLM (FasterTransformer, Orca)
stored each request's KV cache in one contiguous range reserved at admission; section 6.1's
baselines are Orca (Max), Orca (Pow2) and Orca (Oracle), which differ only in how much they reserve.
VAttentionAllocator (Prabhu et al. 2024, "vAttention") keeps a virtually contiguous range per request
but backs it with large physical pages mapped on demand, and PagedAllocator puts the real
BlockManager behind the same calls, so one simulator can compare all of them on one pool of slots.

Every allocator answers: try_admit(req, num_tokens) -> bool, can_append(*ids), append(id), free(id),
breakdown(waiting) -> MemoryBreakdown. A request is anything with .request_id, .prompt_len and
.output_len (the true number of tokens it generates); its *true length* is prompt_len + output_len.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

from minipaged.reference.block_allocator import BlockAllocator, NoFreeBlocksError
from minipaged.reference.block_manager import AllocStatus, BlockManager
from minipaged.reference.block_table import num_blocks_for
from minipaged.reference.memory_stats import PoolStats, pool_stats
from minipaged.sequence import Sequence, SequenceGroup

POLICIES = ("max", "pow2", "oracle")
# vAttention's default 2 MiB pages hold one layer's K (or V) of 2 MiB / (40 heads x 128 x 2 bytes)
# = 204 tokens for OPT-13B in fp16: its pages are 12x coarser than vLLM's 16-token blocks.
VATTENTION_PAGE_TOKENS = 2 * 2**20 // (40 * 128 * 2)
BREAKDOWN_FIELDS = ("token_states", "reserved", "internal_fragmentation", "external_fragmentation", "free")


@dataclass(frozen=True)
class MemoryBreakdown:
    """Where every token slot of the pool is, in the words of the paper's Fig. 3. Fields sum to capacity.

    Attributes:
        token_states: slots holding a token's K/V ("KV cache states").
        reserved: slots reserved for tokens the request will still generate ("reserved for future
            tokens"): used later, but held now while other requests could use them.
        internal_fragmentation: slots held that will never hold a token: past the request's true
            length in a contiguous range, or the unfilled tail of the last page or block.
        external_fragmentation: free slots that cannot be used: every free slot while the head of
            the waiting queue cannot be placed (no hole fits its range); 0 when nothing waits or it
            fits. Allocators that map pages on demand have none: any free page serves any request.
        free: the other free slots.
    """

    token_states: int
    reserved: int
    internal_fragmentation: int
    external_fragmentation: int
    free: int

    @property
    def capacity(self) -> int:
        return sum(getattr(self, name) for name in BREAKDOWN_FIELDS)

    @property
    def used(self) -> int:
        """Slots not free: held by requests or lost to external fragmentation."""
        return self.capacity - self.free

    @property
    def utilization(self) -> float:
        """token_states / used (1.0 when nothing is used): the share of the memory in use holding tokens."""
        return self.token_states / self.used if self.used else 1.0

    def fractions(self) -> dict[str, float]:
        """Each field as a fraction of the capacity."""
        return {name: getattr(self, name) / self.capacity for name in BREAKDOWN_FIELDS}

    @classmethod
    def from_pool_stats(cls, stats: PoolStats, block_size: int) -> MemoryBreakdown:
        """The breakdown of a paged pool: blocks are mapped on demand, so nothing is reserved ahead."""
        return cls(stats.slots_used, 0, stats.internal_waste, 0, stats.num_free * block_size)


def reservation_size(policy: str, prompt_len: int, output_len: int, max_model_len: int) -> int:
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


def _positive(**values: object) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_request(req, max_model_len: int) -> None:
    _positive(prompt_len=req.prompt_len, output_len=req.output_len)
    if req.prompt_len + req.output_len > max_model_len:
        raise ValueError(
            f"request {req.request_id!r}: prompt_len + output_len = {req.prompt_len + req.output_len} "
            f"is beyond max_model_len={max_model_len}: it can never be served"
        )


@dataclass
class _Range:
    start: int
    size: int  # slots reserved
    length: int  # the request's true length: prompt_len + output_len
    num_tokens: int  # slots holding a token, from `start`


class ContiguousAllocator:
    """Orca-style: one contiguous range per request, reserved at admission, placed by first fit.

    Args:
        capacity: token slots in the pool.
        policy: how much to reserve: "max", "pow2" or "oracle" (see reservation_size).
        max_model_len: the longest request (prompt plus output).

    Raises:
        ValueError: naming the argument, for a non-positive size or an unknown policy.
    """

    def __init__(self, capacity: int, policy: str = "max", max_model_len: int = 2048) -> None:
        _positive(capacity=capacity, max_model_len=max_model_len)
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.capacity, self.policy, self.max_model_len = capacity, policy, max_model_len
        self._holes: list[tuple[int, int]] = [(0, capacity)]  # free extents (start, length), by start
        self._ranges: dict[str, _Range] = {}

    @property
    def free_extents(self) -> list[tuple[int, int]]:
        """The holes, (start, length), lowest address first; never two adjacent (they are merged)."""
        return list(self._holes)

    def range_of(self, request_id: str) -> tuple[int, int]:
        """(start, size) of a live request's range."""
        r = self._ranges[request_id]
        return r.start, r.size

    def num_tokens(self, request_id: str) -> int:
        return self._ranges[request_id].num_tokens

    def reservation(self, req) -> int:
        """Slots this allocator reserves for `req` (see reservation_size)."""
        return reservation_size(self.policy, req.prompt_len, req.output_len, self.max_model_len)

    def check(self, req, copies: int = 1) -> None:
        """Raise ValueError if `copies` ranges for `req` could never fit, even in an empty pool."""
        _check_request(req, self.max_model_len)
        if copies * self.reservation(req) > self.capacity:
            raise ValueError(
                f"request {req.request_id!r}: {copies} range(s) of {self.reservation(req)} slots "
                f"({self.policy}) can never fit a pool of capacity={self.capacity}"
            )

    def try_admit(self, req, num_tokens: int | None = None) -> bool:
        """Reserve a range for `req` by first fit and store its first `num_tokens` tokens (the prompt).

        Returns:
            False if no hole is big enough (the request waits); nothing changes then.

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
        i = _first_fit(self._holes, size)
        if i is None:
            return False
        start, length = self._holes[i]
        if length == size:
            del self._holes[i]
        else:
            self._holes[i] = (start + size, length - size)  # carve from the hole's low end
        self._ranges[req.request_id] = _Range(start, size, req.prompt_len + req.output_len, num_tokens)
        return True

    def can_append(self, *request_ids: str) -> bool:
        """Can each of these requests store one more token? Yes until its range is full."""
        return all(self._ranges[i].num_tokens < self._ranges[i].size for i in request_ids)

    def append(self, request_id: str) -> None:
        """Store one more token of the request, in the next slot of its range.

        Raises:
            NoFreeBlocksError: if the range is full: a contiguous range cannot grow in place.
        """
        r = self._ranges[request_id]
        if r.num_tokens >= r.size:
            raise NoFreeBlocksError(f"request {request_id!r} has filled its {r.size} reserved slots")
        r.num_tokens += 1

    def free(self, request_id: str) -> None:
        """Return the request's range to the free list, merged with the holes beside it."""
        r = self._ranges.pop(request_id)
        start, end = r.start, r.start + r.size
        i = bisect.bisect_left(self._holes, (start, 0))
        if i < len(self._holes) and self._holes[i][0] == end:  # merge with the hole after
            end += self._holes.pop(i)[1]
        if i > 0 and sum(self._holes[i - 1]) == start:  # merge with the hole before
            i -= 1
            start = self._holes.pop(i)[0]
        self._holes.insert(i, (start, end - start))

    def can_place(self, reqs: Iterable) -> bool:
        """Would first fit place ranges for all of `reqs` now (a dry run)?"""
        holes = list(self._holes)
        for req in reqs:
            i = _first_fit(holes, size := self.reservation(req))
            if i is None:
                return False
            holes[i] = (holes[i][0] + size, holes[i][1] - size)
        return True

    def breakdown(self, waiting: Iterable = ()) -> MemoryBreakdown:
        """The pool now; `waiting` is the head of the waiting queue (its ranges), if any waits."""
        tokens = sum(r.num_tokens for r in self._ranges.values())
        reserved = sum(max(0, r.length - r.num_tokens) for r in self._ranges.values())
        internal = sum(r.size - max(r.length, r.num_tokens) for r in self._ranges.values())
        free = sum(length for _, length in self._holes)
        waiting = list(waiting)
        external = free if waiting and not self.can_place(waiting) else 0
        return MemoryBreakdown(tokens, reserved, internal, external, free - external)


def _check_on_demand(req, copies: int, max_model_len: int, unit: int, usable: int, what: str) -> None:
    """Refuse a request whose `copies` sequences, grown whole, exceed the usable pages or blocks:
    alone in the pool it could then never be (re-)admitted."""
    _check_request(req, max_model_len)
    if copies * num_blocks_for(req.prompt_len + req.output_len, unit) > usable:
        raise ValueError(
            f"request {req.request_id!r}: {copies} x {req.prompt_len + req.output_len} tokens can never "
            f"fit the {usable} usable {what} of {unit} slots (the watermark kept free)"
        )


def _first_fit(holes: list[tuple[int, int]], size: int) -> int | None:
    """Index of the lowest-addressed hole of at least `size` slots, or None."""
    return next((i for i, (_, length) in enumerate(holes) if length >= size), None)


class VAttentionAllocator:
    """vAttention-style: a virtually contiguous range per request, physical pages mapped as it grows.

    Each request sees max_model_len contiguous virtual slots (which cost no physical memory); a
    physical page of `page_tokens` slots is mapped only when a token falls past the last mapped one.
    So only the last page of a request is partly empty and there is no external fragmentation, but
    pages are large (GPU drivers map 2 MiB), so that tail is large too. Admission keeps a watermark
    of free pages like vLLM's scheduler, which vAttention runs under.

    Args:
        capacity: token slots in the pool; rounded down to whole pages.
        page_tokens: token slots per physical page.
        max_model_len: the longest request (prompt plus output).
        watermark: fraction of pages kept free at admission.

    Raises:
        ValueError: naming the argument, for non-positive sizes, a page larger than the pool, or a
            watermark outside [0, 1).
    """

    def __init__(
        self,
        capacity: int,
        page_tokens: int = VATTENTION_PAGE_TOKENS,
        max_model_len: int = 2048,
        watermark: float = 0.01,
    ) -> None:
        _positive(capacity=capacity, page_tokens=page_tokens, max_model_len=max_model_len)
        if page_tokens > capacity:
            raise ValueError(f"page_tokens must be <= capacity={capacity}, got {page_tokens}")
        if not isinstance(watermark, (int, float)) or not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {watermark!r}")
        self.page_tokens, self.max_model_len = page_tokens, max_model_len
        self.pages = BlockAllocator(capacity // page_tokens, "vattention")  # physical page frames
        self.capacity = self.pages.num_blocks * page_tokens
        self.watermark_pages = int(watermark * self.pages.num_blocks)
        self._pages_of: dict[str, list[int]] = {}  # request -> its physical pages, in virtual order
        self._num_tokens: dict[str, int] = {}

    def pages_of(self, request_id: str) -> list[int]:
        return list(self._pages_of[request_id])

    def num_tokens(self, request_id: str) -> int:
        return self._num_tokens[request_id]

    def check(self, req, copies: int = 1) -> None:
        """Raise ValueError if `copies` requests like `req` could never fit, even in an empty pool."""
        usable = self.pages.num_blocks - self.watermark_pages
        _check_on_demand(req, copies, self.max_model_len, self.page_tokens, usable, "pages")

    def try_admit(self, req, num_tokens: int | None = None) -> bool:
        """Map pages for the first `num_tokens` tokens of `req` (its prompt), keeping the watermark."""
        self.check(req)
        if req.request_id in self._pages_of:
            raise ValueError(f"request {req.request_id!r} is already admitted")
        num_tokens = req.prompt_len if num_tokens is None else num_tokens
        _positive(num_tokens=num_tokens)
        needed = num_blocks_for(num_tokens, self.page_tokens)
        if self.pages.num_free - needed < self.watermark_pages:
            return False
        self._pages_of[req.request_id] = [self.pages.allocate() for _ in range(needed)]
        self._num_tokens[req.request_id] = num_tokens
        return True

    def can_append(self, *request_ids: str) -> bool:
        """Are there free pages for each of these requests to store one more token?"""
        new_pages = sum(self._num_tokens[i] % self.page_tokens == 0 for i in request_ids)
        return new_pages <= self.pages.num_free

    def append(self, request_id: str) -> None:
        """Store one more token; map a fresh page first if the last one is full (demand paging).

        Raises:
            NoFreeBlocksError: if a page is needed and none is free (nothing changes).
        """
        if self._num_tokens[request_id] % self.page_tokens == 0:
            self._pages_of[request_id].append(self.pages.allocate())
        self._num_tokens[request_id] += 1

    def free(self, request_id: str) -> None:
        """Unmap the request's pages and give them back."""
        for page in self._pages_of.pop(request_id):
            self.pages.free(page)
        del self._num_tokens[request_id]

    def breakdown(self, waiting: Iterable = ()) -> MemoryBreakdown:
        """The pool now (`waiting` is ignored: on-demand pages leave no external fragmentation)."""
        tokens = sum(self._num_tokens.values())
        mapped = self.pages.num_used * self.page_tokens
        return MemoryBreakdown(tokens, 0, mapped - tokens, 0, self.pages.num_free * self.page_tokens)


class PagedAllocator:
    """The same calls over the real BlockManager: one sequence per request, blocks on demand.

    Args:
        capacity: token slots in the pool; rounded down to whole blocks.
        block_size: tokens per block.
        max_model_len: the longest request (prompt plus output).
        watermark: fraction of blocks kept free at admission (the BlockManager's).
    """

    def __init__(
        self, capacity: int, block_size: int = 16, max_model_len: int = 2048, watermark: float = 0.01
    ) -> None:
        _positive(capacity=capacity, block_size=block_size, max_model_len=max_model_len)
        if block_size > capacity:
            raise ValueError(f"block_size must be <= capacity={capacity}, got {block_size}")
        self.manager = BlockManager(block_size, capacity // block_size, 0, watermark)
        self.block_size, self.max_model_len = block_size, max_model_len
        self.capacity = self.manager.device.num_blocks * block_size
        self._seqs: dict[str, Sequence] = {}

    def check(self, req, copies: int = 1) -> None:
        """Raise ValueError if `copies` requests like `req` could never fit, even in an empty pool."""
        usable = self.manager.device.num_blocks - self.manager.watermark_blocks
        _check_on_demand(req, copies, self.max_model_len, self.block_size, usable, "blocks")

    def try_admit(self, req, num_tokens: int | None = None) -> bool:
        """Allocate blocks for the first `num_tokens` tokens of `req` (its prompt) if the manager says OK."""
        self.check(req)
        if req.request_id in self._seqs:
            raise ValueError(f"request {req.request_id!r} is already admitted")
        seq = Sequence([0] * (req.prompt_len if num_tokens is None else num_tokens))
        group = SequenceGroup(req.request_id, [seq], arrival_time=0.0)
        if self.manager.can_allocate(group) != AllocStatus.OK:
            return False
        self.manager.allocate(group)
        self._seqs[req.request_id] = seq
        return True

    def can_append(self, *request_ids: str) -> bool:
        tables = [self.manager.get_block_table(self._seqs[i]) for i in request_ids]
        new_blocks = sum(t.num_filled_in_last_block == self.block_size for t in tables)
        return new_blocks <= self.manager.device.num_free

    def append(self, request_id: str) -> None:
        seq = self._seqs[request_id]
        seq.append_token_id(0)
        self.manager.append_slots(seq)

    def free(self, request_id: str) -> None:
        self.manager.free(self._seqs.pop(request_id))

    def breakdown(self, waiting: Iterable = ()) -> MemoryBreakdown:
        """The pool now (`waiting` is ignored: any free block serves any request)."""
        stats = pool_stats(self.manager.device, self.manager.device_tables, self.block_size)
        return MemoryBreakdown.from_pool_stats(stats, self.block_size)


__all__ = [
    "BREAKDOWN_FIELDS",
    "POLICIES",
    "VATTENTION_PAGE_TOKENS",
    "ContiguousAllocator",
    "MemoryBreakdown",
    "PagedAllocator",
    "VAttentionAllocator",
    "reservation_size",
]
