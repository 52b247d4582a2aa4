"""Frame allocator for KV-cache blocks.

OS idea: the kernel keeps a free list of physical page frames and a reference count per frame, so
that fork() can share frames and free them only when the last process lets go (OSTEP ch. 17-18, 23).
KV counterpart: vLLM paper section 4.2, "KV cache manager"; blocks are frames, block ids are frame
numbers. The device (GPU) pool and the host (CPU) swap space are two allocators of this class.

The allocator knows nothing of sequences or tokens: it hands out block ids and counts who holds
them. Policy (who gets a block, when to copy, when to swap) lives in block_manager.py.
"""

from __future__ import annotations


class NoFreeBlocksError(RuntimeError):
    """The pool has no free block left (the KV-cache counterpart of out-of-memory)."""


class BlockAllocator:
    """A pool of `num_blocks` physical blocks: a free list plus a reference count per block.

    A block is *free* (reference count 0, on the free list) or *used* (reference count >= 1, held
    by that many block tables). `num_free + num_used == num_blocks` always.

    Args:
        num_blocks: the pool's size in blocks.
        name: a label for messages and pictures, e.g. "device" or "host".

    Raises:
        ValueError: if `num_blocks` is negative.
    """

    def __init__(self, num_blocks: int, name: str = "device") -> None:
        if (
            not isinstance(num_blocks, int)
            or isinstance(num_blocks, bool)
            or num_blocks < 0
        ):
            raise ValueError(
                f"num_blocks must be a non-negative int, got {num_blocks!r}"
            )
        self.num_blocks = num_blocks
        self.name = name
        # Pop from the end, so block 0 is handed out first: the pictures read left to right.
        self._free_list: list[int] = list(range(num_blocks - 1, -1, -1))
        self._ref_count: list[int] = [0] * num_blocks

    @property
    def free_list(self) -> list[int]:
        """The free blocks, a copy, in the order they wait: `allocate` hands out the last one first."""
        return list(self._free_list)

    @property
    def num_free(self) -> int:
        """Blocks that `allocate` can hand out right now."""
        return len(self._free_list)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one block table."""
        return self.num_blocks - self.num_free

    def ref_count(self, block: int) -> int:
        """How many block tables hold `block` (0 for a free block).

        Raises:
            ValueError: if `block` is not a block id of this pool.
        """
        if type(block) is not int or not 0 <= block < self.num_blocks:
            self._check(block)  # raises, naming what was expected
        return self._ref_count[block]

    def allocate(self) -> int:
        """Take a free block and give it reference count 1.

        Returns:
            The block id.

        Raises:
            NoFreeBlocksError: if every block is in use.
        """
        # BEGIN SOLUTION 1.2
        if not self._free_list:
            raise NoFreeBlocksError(
                f"all {self.num_blocks} blocks of the {self.name} pool are in use"
            )
        block = self._free_list.pop()
        self._ref_count[block] = 1
        return block
        # END SOLUTION

    def incref(self, block: int) -> int:
        """One more block table holds `block` (sharing, as fork() shares a frame).

        Returns:
            The new reference count.

        Raises:
            ValueError: if `block` is unknown or free: only a block someone holds can be shared.
        """
        # BEGIN SOLUTION 1.2
        self._check(block)
        if self._ref_count[block] == 0:
            raise ValueError(
                f"block {block} of the {self.name} pool is free; allocate it before sharing it"
            )
        self._ref_count[block] += 1
        return self._ref_count[block]
        # END SOLUTION

    def free(self, block: int) -> int:
        """One block table lets go of `block`; at reference count 0 the block is released.

        Returns:
            The reference count left (0 means the block was released).

        Raises:
            ValueError: if `block` is unknown or already free (a double free).
        """
        # BEGIN SOLUTION 1.2
        self._check(block)
        if self._ref_count[block] == 0:
            raise ValueError(
                f"double free: block {block} of the {self.name} pool is already free"
            )
        self._ref_count[block] -= 1
        if self._ref_count[block] == 0:
            self._release(block)
        return self._ref_count[block]
        # END SOLUTION

    def _release(self, block: int) -> None:
        """Where a block goes when its last holder lets go: back on the free list.

        PrefixCachingBlockAllocator (prefix_cache.py) overrides this to keep cached blocks.
        """
        self._free_list.append(block)

    def _check(self, block: int) -> None:
        # an int and not a bool (whose type is a subclass of int): `type` says both at once
        if type(block) is not int or not 0 <= block < self.num_blocks:
            raise ValueError(
                f"block must be a block id in [0, {self.num_blocks}) of the {self.name} pool, got {block!r}"
            )

    def __repr__(self) -> str:
        return f"BlockAllocator({self.name}: {self.num_used} used / {self.num_blocks})"
