"""Demand-paged KV allocators behind the baselines' calls: vAttention's large pages, vLLM's blocks.

OS idea: demand paging. A process sees one contiguous virtual address space; the kernel maps a
physical frame behind a page only when the process first touches it, and any free frame will do, so
there is no reservation ahead of need and no external fragmentation; what is left is the unused tail
of the last page, which grows with the page size (OSTEP ch. 18-21). KV counterpart: vLLM paper
section 4.2-4.3 (blocks of 16 tokens mapped as a sequence grows) and, for comparison, vAttention
(Prabhu et al. 2024), which keeps a virtually contiguous KV range per request and maps the GPU
driver's 2 MiB pages behind it on demand.

VAttentionAllocator models vAttention; PagedAllocator puts the real BlockManager behind the same
calls as experiments/baselines.py's ContiguousAllocator (try_admit, can_admit, can_append, append, free,
breakdown), so that a test or a simulator can drive the three kinds side by side. Neither has external
fragmentation (any free page serves any request), but both strand their free pages while the head of
the waiting queue waits for more than they hold (memory_breakdown.waiting_waste).
"""

from __future__ import annotations

from collections.abc import Iterable

from minipaged.experiments.baselines import check_positive, check_request
from minipaged.experiments.memory_breakdown import (
    MemoryBreakdown,
    final_kv_len,
    waiting_waste,
)
from minipaged.reference.block_allocator import BlockAllocator, NoFreeBlocksError
from minipaged.reference.block_manager import AllocStatus, BlockManager
from minipaged.reference.block_table import num_blocks_for
from minipaged.reference.memory_stats import pool_stats
from minipaged.sequence import Sequence, SequenceGroup

# vAttention's default 2 MiB pages hold one layer's K (or V) of 2 MiB / (40 heads x 128 x 2 bytes)
# = 204 tokens for OPT-13B in fp16: its pages are 12x coarser than vLLM's 16-token blocks.
VATTENTION_PAGE_TOKENS = 2 * 2**20 // (40 * 128 * 2)


def _check_on_demand(
    req, copies: int, max_model_len: int, unit: int, usable: int, what: str
) -> None:
    """Refuse a request whose `copies` sequences, grown whole (final_kv_len tokens each), exceed the
    usable pages or blocks: alone in the pool it could then never be (re-)admitted."""
    check_request(req, max_model_len)
    final = final_kv_len(req.prompt_len, req.output_len)
    if copies * num_blocks_for(final, unit) > usable:
        raise ValueError(
            f"request {req.request_id!r}: {copies} x {final} tokens can never "
            f"fit the {usable} usable {what} of {unit} slots (the watermark kept free)"
        )


def _pages_for(reqs: Iterable, num_tokens: int | None, unit: int) -> int:
    """Pages (or blocks) of `unit` slots that admitting each of `reqs` with `num_tokens` (default: its
    prompt) maps at once."""
    return sum(
        num_blocks_for(req.prompt_len if num_tokens is None else num_tokens, unit)
        for req in reqs
    )


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
        check_positive(
            capacity=capacity, page_tokens=page_tokens, max_model_len=max_model_len
        )
        if page_tokens > capacity:
            raise ValueError(
                f"page_tokens must be <= capacity={capacity}, got {page_tokens}"
            )
        if not isinstance(watermark, (int, float)) or not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {watermark!r}")
        self.page_tokens, self.max_model_len = page_tokens, max_model_len
        # physical page frames
        self.pages = BlockAllocator(capacity // page_tokens, "vattention")
        self.capacity = self.pages.num_blocks * page_tokens
        self.watermark_pages = int(watermark * self.pages.num_blocks)
        # request -> its physical pages, in virtual order
        self._pages_of: dict[str, list[int]] = {}
        self._num_tokens: dict[str, int] = {}

    def pages_of(self, request_id: str) -> list[int]:
        return list(self._pages_of[request_id])

    def num_tokens(self, request_id: str) -> int:
        return self._num_tokens[request_id]

    def check(self, req, copies: int = 1) -> None:
        """Raise ValueError if `copies` requests like `req` could never fit, even in an empty pool."""
        usable = self.pages.num_blocks - self.watermark_pages
        _check_on_demand(
            req, copies, self.max_model_len, self.page_tokens, usable, "pages"
        )

    def try_admit(self, req, num_tokens: int | None = None) -> bool:
        """Map pages for the first `num_tokens` tokens of `req` (its prompt), keeping the watermark."""
        self.check(req)
        if req.request_id in self._pages_of:
            raise ValueError(f"request {req.request_id!r} is already admitted")
        num_tokens = req.prompt_len if num_tokens is None else num_tokens
        check_positive(num_tokens=num_tokens)
        if not self.can_admit([req], num_tokens):
            return False
        needed = num_blocks_for(num_tokens, self.page_tokens)
        self._pages_of[req.request_id] = [self.pages.allocate() for _ in range(needed)]
        self._num_tokens[req.request_id] = num_tokens
        return True

    def can_admit(self, reqs: Iterable, num_tokens: int | None = None) -> bool:
        """Would try_admit admit every one of `reqs` now, storing `num_tokens` each (default: its prompt)?"""
        needed = _pages_for(reqs, num_tokens, self.page_tokens)
        return self.pages.num_free - needed >= self.watermark_pages

    def can_append(self, *request_ids: str) -> bool:
        """Are there free pages for each of these requests to store one more token?"""
        new_pages = sum(
            self._num_tokens[i] % self.page_tokens == 0 for i in request_ids
        )
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

    def breakdown(
        self, waiting: Iterable = (), num_tokens: int | None = None
    ) -> MemoryBreakdown:
        """The pool now, in the Fig. 3 categories.

        Args:
            waiting: the head of the waiting queue (one entry per sequence), if a request waits. If
                it cannot be admitted now, the free pages are stranded while it waits; never external
                fragmentation, since any free page serves any request (waiting_waste).
            num_tokens: the tokens its admission would store (default: its prompt; more after a
                preemption by recompute).
        """
        tokens = sum(self._num_tokens.values())
        mapped = self.pages.num_used * self.page_tokens
        waiting = list(waiting)
        blocked = bool(waiting) and not self.can_admit(waiting, num_tokens)
        _, stranded, free = waiting_waste(
            self.pages.num_free * self.page_tokens, blocked, fits_in_total=False
        )
        return MemoryBreakdown(tokens, 0, mapped - tokens, 0, stranded, free)


class PagedAllocator:
    """The same calls over the real BlockManager: one sequence per request, blocks on demand.

    Args:
        capacity: token slots in the pool; rounded down to whole blocks.
        block_size: tokens per block.
        max_model_len: the longest request (prompt plus output).
        watermark: fraction of blocks kept free at admission (the BlockManager's).
    """

    def __init__(
        self,
        capacity: int,
        block_size: int = 16,
        max_model_len: int = 2048,
        watermark: float = 0.01,
    ) -> None:
        check_positive(
            capacity=capacity, block_size=block_size, max_model_len=max_model_len
        )
        if block_size > capacity:
            raise ValueError(
                f"block_size must be <= capacity={capacity}, got {block_size}"
            )
        self.manager = BlockManager(block_size, capacity // block_size, 0, watermark)
        self.block_size, self.max_model_len = block_size, max_model_len
        self.capacity = self.manager.device.num_blocks * block_size
        self._seqs: dict[str, Sequence] = {}

    def check(self, req, copies: int = 1) -> None:
        """Raise ValueError if `copies` requests like `req` could never fit, even in an empty pool."""
        usable = self.manager.device.num_blocks - self.manager.watermark_blocks
        _check_on_demand(
            req, copies, self.max_model_len, self.block_size, usable, "blocks"
        )

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

    def can_admit(self, reqs: Iterable, num_tokens: int | None = None) -> bool:
        """Would try_admit admit every one of `reqs` now, storing `num_tokens` each (default: its prompt)?
        The BlockManager's can_allocate test: the blocks fit above the watermark."""
        needed = _pages_for(reqs, num_tokens, self.block_size)
        return self.manager.device.num_free - needed >= self.manager.watermark_blocks

    def can_append(self, *request_ids: str) -> bool:
        """Are there free blocks for each of these requests to store one more token? A request
        needs a new block only when its last block is full."""
        tables = [self.manager.get_block_table(self._seqs[i]) for i in request_ids]
        new_blocks = sum(t.num_filled_in_last_block == self.block_size for t in tables)
        return new_blocks <= self.manager.device.num_free

    def append(self, request_id: str) -> None:
        """Store one more token of the request: BlockManager.append_slots maps a fresh block when
        the last one is full (demand paging).

        Raises:
            NoFreeBlocksError: if a block is needed and none is free (nothing changes).
        """
        # before the token is added: a refused append changes nothing
        if not self.can_append(request_id):
            raise NoFreeBlocksError(
                f"request {request_id!r} needs a block and none is free"
            )
        seq = self._seqs[request_id]
        seq.append_token_id(0)
        self.manager.append_slots(seq)

    def free(self, request_id: str) -> None:
        """Give the request's blocks back to the pool (BlockManager.free)."""
        self.manager.free(self._seqs.pop(request_id))

    def breakdown(
        self, waiting: Iterable = (), num_tokens: int | None = None
    ) -> MemoryBreakdown:
        """The pool now, in the Fig. 3 categories (`waiting`, `num_tokens`: as VAttentionAllocator's:
        free blocks are stranded while the head waits for more than they hold)."""
        stats = pool_stats(
            self.manager.device, self.manager.device_tables, self.block_size
        )
        waiting = list(waiting)
        blocked = bool(waiting) and not self.can_admit(waiting, num_tokens)
        return MemoryBreakdown.from_pool_stats(stats, self.block_size, waiting=blocked)


__all__ = ["VATTENTION_PAGE_TOKENS", "PagedAllocator", "VAttentionAllocator"]
