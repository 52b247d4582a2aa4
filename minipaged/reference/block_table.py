"""Page table for one sequence: logical KV blocks -> physical KV blocks.

OS idea: a process sees contiguous virtual pages; the page table maps each virtual page number to a
physical frame, so physical memory need not be contiguous, and a frame is only found when a page is
first touched (demand paging; OSTEP ch. 18-21). KV counterpart: vLLM paper section 4.2-4.3,
"block table". Token position `pos` lives in logical block `pos // block_size`, at offset
`pos % block_size`; its *slot* (the row of the KV pool it occupies) is

    slot = block_ids[pos // block_size] * block_size + pos % block_size

which is exactly the virtual -> physical address translation with block_size as the page size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens: ceil(num_tokens / block_size)."""
    return -(-num_tokens // block_size)


class BlockTable:
    """The logical -> physical block mapping of one sequence, and how many slots it has filled.

    The table holds `num_tokens` tokens in `len(block_ids)` blocks; only its last block may be
    partly filled. Blocks are allocated on demand: a new one only when the last one is full.

    Args:
        block_size: tokens per block (the page size).
        block_ids: physical block ids, logical block i -> block_ids[i].
        num_tokens: tokens already stored; must fit in the given blocks.

    Raises:
        ValueError: if block_size is not positive, or num_tokens does not match the blocks.
    """

    def __init__(
        self, block_size: int, block_ids: Sequence[int] = (), num_tokens: int = 0
    ) -> None:
        if not _is_int(block_size) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if not _is_int(num_tokens) or num_tokens < 0:
            raise ValueError(
                f"num_tokens must be a non-negative int, got {num_tokens!r}"
            )
        if num_blocks_for(num_tokens, block_size) != len(block_ids):
            raise ValueError(
                f"num_tokens={num_tokens} needs {num_blocks_for(num_tokens, block_size)} blocks of "
                f"{block_size}, but {len(block_ids)} block ids were given"
            )
        self.block_size = block_size
        self.block_ids: list[int] = list(block_ids)
        self.num_tokens = num_tokens

    def __len__(self) -> int:
        """Number of blocks (pages) in the table."""
        return len(self.block_ids)

    @property
    def capacity(self) -> int:
        """Slots the table's blocks offer: len(self) * block_size."""
        return len(self.block_ids) * self.block_size

    @property
    def num_filled_in_last_block(self) -> int:
        """Filled slots of the last block (block_size when it is full, 0 for an empty table)."""
        # BEGIN SOLUTION 1.1
        if self.num_tokens == 0:
            return 0
        return self.num_tokens - (len(self.block_ids) - 1) * self.block_size
        # END SOLUTION

    def num_new_blocks_needed(self, num_new_tokens: int) -> int:
        """Blocks that appending `num_new_tokens` would allocate (0 while the last block has room)."""
        return num_blocks_for(self.num_tokens + num_new_tokens, self.block_size) - len(
            self.block_ids
        )

    def append_tokens(
        self,
        num_new_tokens: int,
        allocate: Callable[[], int],
        free: Callable[[int], object] | None = None,
    ) -> list[int]:
        """Make room for `num_new_tokens` more tokens, calling `allocate` only when the last block is full.

        This is demand paging: the table asks the frame allocator for a block at the moment a token
        would fall past the end of its last block, never earlier.

        All or nothing: if `allocate` raises partway (the pool ran dry after giving some of the
        blocks), the blocks this call took go back through `free`, the table is left as it was,
        and the error propagates. When `allocate` is an allocator's own method
        (`pool.allocate`), `free` defaults to that allocator's `free`, so a failed append never
        leaks; with any other callable, pass `free` if the pool may run short (BlockManager
        checks the free count first, so it never does).

        Args:
            num_new_tokens: tokens to add (>= 0).
            allocate: returns a fresh physical block id (e.g. BlockAllocator.allocate).
            free: gives a block back (e.g. BlockAllocator.free); used only to undo a failed append.
                None: `allocate.__self__.free` when `allocate` is a bound method of an object
                that has one (BlockAllocator.allocate), else nothing.

        Returns:
            The block ids newly appended, in order.

        Raises:
            ValueError: if num_new_tokens is negative.
            NoFreeBlocksError: or whatever else `allocate` raises, after the undo.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        if free is None:  # pool.allocate given: its pool's free undoes a failed append
            free = getattr(getattr(allocate, "__self__", None), "free", None)
        # BEGIN SOLUTION 1.3
        new_blocks: list[int] = []
        try:
            for _ in range(self.num_new_blocks_needed(num_new_tokens)):
                new_blocks.append(allocate())
        except Exception:
            if free is not None:
                # reversed: the free list gets back its order
                for block in reversed(new_blocks):
                    free(block)
            raise
        self.block_ids.extend(new_blocks)  # only now, when every block was found
        self.num_tokens += num_new_tokens
        return new_blocks
        # END SOLUTION

    def slot(self, pos: int) -> int:
        """The KV-pool slot of token position `pos` (the address translation).

        Raises:
            IndexError: if `pos` is negative or past the table's capacity.
        """
        # BEGIN SOLUTION 1.1
        if not 0 <= pos < self.capacity:
            raise IndexError(
                f"position {pos} is outside the table's {self.capacity} slots"
            )
        return (
            self.block_ids[pos // self.block_size] * self.block_size
            + pos % self.block_size
        )
        # END SOLUTION

    def slot_mapping(self, num_q_tokens: int) -> list[int]:
        """Slots of the last `num_q_tokens` tokens: where a model step writes their K/V.

        Call after `append_tokens`: a decode step writes 1 token, a prefill all of them, a chunk of a
        chunked prefill the chunk's tokens.

        Raises:
            ValueError: if num_q_tokens is negative or more than the tokens the table holds.
        """
        if not 0 <= num_q_tokens <= self.num_tokens:
            raise ValueError(
                f"num_q_tokens must be in [0, {self.num_tokens}], got {num_q_tokens}"
            )
        # BEGIN SOLUTION 1.1
        return [
            self.slot(pos)
            for pos in range(self.num_tokens - num_q_tokens, self.num_tokens)
        ]
        # END SOLUTION

    def as_tensor(
        self, max_blocks: int | None = None, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """The table as an int32 tensor `[max_blocks]`, padded with -1 (the kernels' form).

        Raises:
            ValueError: if max_blocks is smaller than the table.
        """
        max_blocks = len(self) if max_blocks is None else max_blocks
        if max_blocks < len(self):
            raise ValueError(
                f"max_blocks must be >= the table's {len(self)} blocks, got {max_blocks}"
            )
        row = self.block_ids + [-1] * (max_blocks - len(self))
        return torch.tensor(row, dtype=torch.int32, device=device)  # [max_blocks]

    def copy(self) -> BlockTable:
        """A table with the same mapping (for fork: the child shares every block)."""
        return BlockTable(self.block_size, self.block_ids, self.num_tokens)

    def __repr__(self) -> str:
        return f"BlockTable({self.block_ids}, num_tokens={self.num_tokens}, block_size={self.block_size})"


def block_tables_tensor(
    tables: Sequence[BlockTable],
    max_blocks: int | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Stack a batch of tables into `[num_seqs, max_blocks]` int32, padded with -1.

    This is the `block_tables` argument of the kernel contract's paged_attention.
    """
    width = (
        max((len(t) for t in tables), default=0) if max_blocks is None else max_blocks
    )
    if not tables:
        return torch.empty((0, width), dtype=torch.int32, device=device)
    # [num_seqs, max_blocks]
    return torch.stack([t.as_tensor(width, device) for t in tables])
