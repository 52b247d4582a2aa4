"""Automatic prefix caching: a page cache for KV blocks.

OS idea: the page cache keeps the frames of files in memory after the last process closes them,
named by (file, offset), so the next process that opens the same file finds them already there;
shared libraries are mapped once into every process this way. Frames nobody uses stay cached until
memory is needed, then the least recently used is reclaimed (OSTEP ch. 22, 23). KV counterpart:
vLLM paper section 4.4 ("shared prefix") and vLLM's automatic prefix caching. A *full* block is named
by a chained hash of (its parent block's hash, its token ids): two prompts that start with the same
tokens produce the same chain of names, so the second finds the first's blocks and skips both their
memory and their computation.

Why chained: a block's K/V depend on every token before it, not only its own, so its name must too.
Why hashlib: Python's hash() is salted per process and only 64 bits; sha256 is stable and
collision-free in practice.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence

from minipaged.reference.block_allocator import BlockAllocator, NoFreeBlocksError

ROOT_HASH = ""  # the "parent" of a sequence's first block


def hash_block_tokens(parent_hash: str, token_ids: Sequence[int]) -> str:
    """The name of a full block: sha256 over its parent's name and its token ids.

    Args:
        parent_hash: the previous block's hash, or ROOT_HASH for a sequence's first block.
        token_ids: the block's block_size token ids.

    Returns:
        A hex digest.
    """
    # BEGIN SOLUTION 1.6
    digest = hashlib.sha256(parent_hash.encode("ascii"))
    # fixed-width ints: no ambiguity
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return digest.hexdigest()
    # END SOLUTION


def hash_full_blocks(
    token_ids: Sequence[int], block_size: int, parent_hash: str = ROOT_HASH
) -> list[str]:
    """Chained hashes of every *full* block of `token_ids` (a partial last block has no name)."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block_tokens(
            parent_hash, token_ids[start : start + block_size]
        )
        hashes.append(parent_hash)
    return hashes


class PrefixCachingBlockAllocator(BlockAllocator):
    """A BlockAllocator whose full blocks are named by hash and outlive their last holder.

    A block is in one of three states:

    - free: on the free list, holding nothing worth keeping;
    - used: reference count >= 1;
    - cached-free: reference count 0 but still holding a named block's K/V, kept in an LRU evictor
      until a new prompt reuses it (a hit) or an allocation needs the memory (an eviction).

    `num_free` counts free and cached-free blocks: both can be handed out by `allocate`.

    Args:
        num_blocks: the pool's size in blocks.
        name: a label for messages and pictures.
    """

    def __init__(self, num_blocks: int, name: str = "device") -> None:
        super().__init__(num_blocks, name)
        self._block_of_hash: dict[str, int] = {}  # the cache's index: name -> block
        self._hash_of_block: dict[int, str] = {}  # reverse index, for eviction
        # cached-free blocks, least recent first
        self._evictor: OrderedDict[int, None] = OrderedDict()
        self.hits = 0  # full prompt blocks found in the cache
        self.misses = 0  # full prompt blocks that had to be computed
        self.evictions = 0  # cached-free blocks reclaimed for new content

    @property
    def num_free(self) -> int:
        return len(self._free_list) + len(self._evictor)

    @property
    def num_cached_free(self) -> int:
        """Cached blocks that nobody holds: reusable by a hit, reclaimable by an eviction."""
        return len(self._evictor)

    @property
    def num_cached(self) -> int:
        """Blocks with a name in the cache, held or not."""
        return len(self._hash_of_block)

    def is_cached_free(self, block: int) -> bool:
        return block in self._evictor

    def block_hash(self, block: int) -> str | None:
        """The name of `block` if it is in the cache."""
        return self._hash_of_block.get(block)

    def lookup(self, block_hash: str) -> int | None:
        """The block named `block_hash`, or None. No side effect."""
        return self._block_of_hash.get(block_hash)

    def allocate(self) -> int:
        """A block for new content: from the free list first, else evict the least recently used.

        Raises:
            NoFreeBlocksError: if every block is held by some sequence.
        """
        # BEGIN SOLUTION 1.6
        if self._free_list:
            return super().allocate()
        if not self._evictor:
            raise NoFreeBlocksError(
                f"all {self.num_blocks} blocks of the {self.name} pool are in use"
            )
        # the least recently used cached-free block
        block, _ = self._evictor.popitem(last=False)
        # its old content is gone
        del self._block_of_hash[self._hash_of_block.pop(block)]
        self.evictions += 1
        self._ref_count[block] = 1
        return block
        # END SOLUTION

    def match_prefix(self, block_hashes: Sequence[str]) -> list[int]:
        """Take a reference on the longest run of cached blocks that starts the chain `block_hashes`.

        Counts a hit for each block found and a miss for each of the rest.

        Returns:
            The matched block ids, in order (possibly empty).
        """
        # BEGIN SOLUTION 1.6
        matched = []
        for block_hash in block_hashes:
            block = self._block_of_hash.get(block_hash)
            if block is None:
                break  # the chain breaks here: later blocks depend on this one
            self.acquire(block)
            matched.append(block)
        self.hits += len(matched)
        self.misses += len(block_hashes) - len(matched)
        return matched
        # END SOLUTION

    def acquire(self, block: int) -> int:
        """Take a reference on a cached block: revive it if cached-free, else share it.

        Returns:
            The new reference count.

        Raises:
            ValueError: if `block` is not in the cache.
        """
        if block not in self._hash_of_block:
            raise ValueError(f"block {block} is not in the prefix cache")
        if block in self._evictor:  # cached-free: revive it
            del self._evictor[block]
            self._ref_count[block] = 1
            return 1
        return self.incref(block)

    def count_prefix(self, block_hashes: Sequence[str]) -> tuple[int, int]:
        """Dry run of `match_prefix`: (blocks it would match, of which cached-free). No side effect."""
        matched = cached_free = 0
        for block_hash in block_hashes:
            block = self._block_of_hash.get(block_hash)
            if block is None:
                break
            matched += 1
            cached_free += block in self._evictor
        return matched, cached_free

    def register(self, block: int, block_hash: str) -> bool:
        """Publish a full, held block under `block_hash` so later prompts can find it.

        If another block already has that name, the cache keeps the first (no duplicates).

        Returns:
            True if `block` is now the cache's block for `block_hash`.

        Raises:
            ValueError: if `block` is unknown or not held by anyone.
        """
        if self.ref_count(block) == 0:
            raise ValueError(
                f"block {block} is not held; only a held, full block can be cached"
            )
        if block_hash in self._block_of_hash:
            return self._block_of_hash[block_hash] == block
        if block in self._hash_of_block:
            raise ValueError(f"block {block} is already cached under another hash")
        self._block_of_hash[block_hash] = block
        self._hash_of_block[block] = block_hash
        return True

    def _release(self, block: int) -> None:
        """A cached block stays cached (most recently used end of the evictor); others go free."""
        # BEGIN SOLUTION 1.6
        if block in self._hash_of_block:
            self._evictor[block] = None
        else:
            self._free_list.append(block)
        # END SOLUTION
