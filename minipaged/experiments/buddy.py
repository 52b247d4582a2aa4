"""Buddy allocation: where the paper's Orca baselines put each request's KV range.

OS idea: a binary buddy allocator hands out blocks whose sizes are powers of two
(OSTEP ch. 17, "Buddy Allocation"; Linux's page allocator, with one free list per
order in `free_area`). A request of `size` slots gets a block of the next power of
two; the rounding is internal fragmentation. The block comes from the smallest free
block large enough, halved again and again: one half is kept, the other, its
*buddy*, goes on the free list of its order. Freeing a block merges it with its
buddy while the buddy is free, order after order (coalescing). The buddy of the
block at offset `start` of size `s` is at `start ^ s` (the two differ in that one
bit), so coalescing is arithmetic, not a search.
KV counterpart: vLLM paper section 6.1: the authors reimplemented Orca and assume it
places the KV cache with a buddy allocator; experiments/baselines.py's
ContiguousAllocator uses this one by default (placement="buddy").

A capacity that is not a power of two (the experiments use 15,000 slots) is covered
by maximal aligned power-of-two *top-level* blocks, the bits of the capacity from the
highest down: 15,000 = 8192 + 4096 + 2048 + 512 + 128 + 16 + 8, at slots 0, 8192,
12288, ... Each starts at a multiple of its own size; offsets and buddies are taken
relative to its base, and a block never merges past it, so no range larger than
8192 slots ever fits such a pool.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable


def _order(size: int) -> int:
    """k such that size == 2**k, for a power of two."""
    return size.bit_length() - 1


def _take(free_area: list[list[int]], order: int) -> int | None:
    """Cut a block of 2**order slots from `free_area` (in place): its start, or None.

    The smallest order that has a free block serves, its lowest-addressed block first;
    that block is halved until it has the size asked, each upper half going to the free
    list of its order.
    """
    k = next((k for k in range(order, len(free_area)) if free_area[k]), None)
    if k is None:
        return None
    start = free_area[k].pop(0)
    while k > order:  # split: keep the lower half; the upper half, its buddy, is free
        k -= 1
        bisect.insort(free_area[k], start + (1 << k))
    return start


class BuddyAllocator:
    """A binary buddy allocator over `capacity` token slots.

    Args:
        capacity: slots in the pool, any positive int (see the module docstring for
            one that is not a power of two).

    Attributes:
        top_level_blocks: (base, size) of the blocks covering the pool, largest first.
        free_area: free_area[k] lists the starts of the free blocks of 2**k slots,
            lowest first.

    Raises:
        ValueError: if `capacity` is not a positive int.
    """

    def __init__(self, capacity: int) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self.top_level_blocks: list[tuple[int, int]] = []
        base = 0
        for k in reversed(range(capacity.bit_length())):  # its bits, highest first
            if capacity >> k & 1:
                self.top_level_blocks.append((base, 1 << k))
                base += 1 << k
        self.free_area: list[list[int]] = [[] for _ in range(capacity.bit_length())]
        for base, size in self.top_level_blocks:
            self.free_area[_order(size)].append(base)
        self._bases = [base for base, _ in self.top_level_blocks]  # ascending
        self._order_of: dict[int, int] = {}  # start of an allocated block -> its order

    @property
    def max_block_size(self) -> int:
        """The largest block the pool can ever give: its largest top-level block."""
        return self.top_level_blocks[0][1]

    @property
    def num_free(self) -> int:
        """Free slots, in all free blocks together."""
        return sum(len(starts) << k for k, starts in enumerate(self.free_area))

    @property
    def free_blocks(self) -> list[tuple[int, int]]:
        """The free blocks, (start, size), lowest address first."""
        area = self.free_area
        return sorted(
            (start, 1 << k) for k, starts in enumerate(area) for start in starts
        )

    @property
    def allocated_blocks(self) -> list[tuple[int, int]]:
        """The allocated blocks, (start, size), lowest address first."""
        return sorted((start, 1 << k) for start, k in self._order_of.items())

    @property
    def largest_free_block(self) -> int:
        """Size of the largest free block (0 if none): the most allocate serves now."""
        return max(
            (1 << k for k, starts in enumerate(self.free_area) if starts), default=0
        )

    def block_size_of(self, size: int) -> int:
        """The block a request of `size` slots gets: the next power of two (1 -> 1, 9 -> 16).

        Raises:
            ValueError: if `size` is not a positive int.
        """
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        return 1 << (size - 1).bit_length()

    def top_level_block_of(self, slot: int) -> tuple[int, int]:
        """(base, size) of the top-level block that holds `slot`."""
        return self.top_level_blocks[bisect.bisect_right(self._bases, slot) - 1]

    def buddy_of(self, start: int, size: int) -> int | None:
        """Start of the buddy of the block (start, size); None for a top-level block.

        Offsets are relative to the top-level block's base:
        base + ((start - base) ^ size).
        """
        base, top_size = self.top_level_block_of(start)
        return None if size >= top_size else base + ((start - base) ^ size)

    def allocate(self, size: int) -> int | None:
        """Give a block of block_size_of(size) slots, split from a larger one if needed.

        Returns:
            The block's start slot, or None if no free block is large enough (nothing
            changes then).

        Raises:
            ValueError: if `size` is not a positive int, or needs a block larger than any
                top-level block: it could never be served.
        """
        block = self.block_size_of(size)
        if block > self.max_block_size:
            raise ValueError(
                f"size={size} needs a block of {block} slots: more than the largest "
                f"block of a pool of capacity={self.capacity} ({self.max_block_size}), "
                "so it can never fit"
            )
        start = _take(self.free_area, _order(block))
        if start is not None:
            self._order_of[start] = _order(block)
        return start

    def free(self, start: int) -> None:
        """Return the block at `start`, merged with its buddy while the buddy is free.

        Raises:
            ValueError: if no allocated block starts at `start`, naming a double free
                when the slot is free already.
        """
        is_slot = isinstance(start, int) and not isinstance(start, bool)
        k = self._order_of.pop(start, None) if is_slot else None
        if k is None:
            if is_slot and any(s <= start < s + n for s, n in self.free_blocks):
                raise ValueError(f"start={start!r}: double free, slot {start} is free")
            raise ValueError(f"start={start!r}: no allocated block starts at this slot")
        while (buddy := self.buddy_of(start, 1 << k)) is not None:
            i = bisect.bisect_left(self.free_area[k], buddy)
            if i == len(self.free_area[k]) or self.free_area[k][i] != buddy:
                break  # the buddy is allocated, or split: merging stops here
            del self.free_area[k][i]
            # the pair: one free block, one order up
            start, k = min(start, buddy), k + 1
        bisect.insort(self.free_area[k], start)

    def can_allocate_all(self, sizes: Iterable[int]) -> bool:
        """Would allocate, called for each of `sizes` in order, give each a block now?

        A dry run on a copy of the free lists: nothing changes. A size that could never
        fit gives False here rather than an error.

        Raises:
            ValueError: if a size is not a positive int.
        """
        free_area = [list(starts) for starts in self.free_area]
        for size in sizes:
            block = self.block_size_of(size)
            if block > self.max_block_size or _take(free_area, _order(block)) is None:
                return False
        return True


__all__ = ["BuddyAllocator"]
