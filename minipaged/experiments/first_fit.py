"""First fit: the simplest placement of contiguous ranges, kept beside buddy for comparison.

OS idea: a free-space manager keeps a free list of holes; first fit scans it from the lowest
address and carves a new range from the first hole big enough; a freed range merges with the holes
beside it (coalescing). It wastes nothing inside a range but cuts free space into holes too small
for the next request: external fragmentation (OSTEP ch. 17). KV counterpart: vLLM paper section 3,
Fig. 3: contiguous KV ranges fragment the pool. experiments/baselines.py places the Orca baselines'
ranges by buddy allocation (experiments/buddy.py), as the paper's Orca does, or by first fit with
placement="first-fit", through the same calls.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable


class FirstFitAllocator:
    """First fit over a free list of holes, with the calls of BuddyAllocator (experiments/buddy.py).

    A range takes exactly the slots asked, carved from the low end of the lowest hole big enough.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = self.max_block_size = capacity
        # free extents (start, length), by start
        self._holes: list[tuple[int, int]] = [(0, capacity)]
        self._size_of: dict[int, int] = {}  # start of a live range -> its length

    @property
    def free_blocks(self) -> list[tuple[int, int]]:
        """The holes, (start, length), lowest address first; never two adjacent (they are merged)."""
        return list(self._holes)

    @property
    def num_free(self) -> int:
        return sum(length for _, length in self._holes)

    def block_size_of(self, size: int) -> int:
        """Slots a range of `size` occupies: `size` itself (first fit rounds nothing)."""
        return size

    def allocate(self, size: int) -> int | None:
        """Carve `size` slots from the lowest hole big enough: the start, or None (nothing changes)."""
        i = _first_fit(self._holes, size)
        if i is None:
            return None
        start, length = self._holes[i]
        if length == size:
            del self._holes[i]
        else:
            # carve from the hole's low end
            self._holes[i] = (start + size, length - size)
        self._size_of[start] = size
        return start

    def free(self, start: int) -> None:
        """Free the range at `start`, merging it with the holes beside it."""
        end = start + self._size_of.pop(start)
        i = bisect.bisect_left(self._holes, (start, 0))
        # merge with the hole after
        if i < len(self._holes) and self._holes[i][0] == end:
            end += self._holes.pop(i)[1]
        if i > 0 and sum(self._holes[i - 1]) == start:  # merge with the hole before
            i -= 1
            start = self._holes.pop(i)[0]
        self._holes.insert(i, (start, end - start))

    def can_allocate_all(self, sizes: Iterable[int]) -> bool:
        """Would first fit place all of `sizes`, in order, now? A dry run, on a copy of the holes."""
        trial = FirstFitAllocator(self.capacity)
        trial._holes = list(self._holes)
        return all(trial.allocate(size) is not None for size in sizes)


def _first_fit(holes: list[tuple[int, int]], size: int) -> int | None:
    """Index of the lowest-addressed hole of at least `size` slots, or None."""
    return next((i for i, (_, length) in enumerate(holes) if length >= size), None)


__all__ = ["FirstFitAllocator"]
