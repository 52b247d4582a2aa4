"""What memory looks like: the figures the paper plots, as plain data.

OS idea: `free`, `vmstat` and /proc/meminfo report how much memory is free, used, shared and cached,
and a process's resident set vs what it reserved (OSTEP ch. 22). KV counterpart: vLLM paper section 3
and Fig. 2: the share of allocated KV slots that hold a token (utilization), the slots reserved but
never filled (internal waste), and what sharing saves (section 4.4). BlockManager.memory_stats()
builds these snapshots; experiments, docs pictures and tests read them.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

from minipaged.reference.block_allocator import BlockAllocator
from minipaged.reference.block_table import BlockTable


@dataclass(frozen=True)
class SeqMemory:
    """One sequence's footprint: its slots holding tokens vs the slots its blocks offer."""

    seq_id: int
    location: str  # "device" or "host"
    num_blocks: int
    slots_used: int
    slots_allocated: int

    @property
    def internal_waste(self) -> int:
        """Allocated slots holding no token: at most block_size - 1 (internal fragmentation)."""
        return self.slots_allocated - self.slots_used


@dataclass(frozen=True)
class PoolStats:
    """One pool's state. Slots are counted once per physical block, however many tables share it."""

    name: str
    num_blocks: int
    num_free: int  # includes cached-free blocks: allocate() can hand them out
    num_used: int
    num_shared: int  # used blocks held by two or more tables
    num_cached_free: int  # free blocks whose K/V the prefix cache still names
    slots_used: int  # slots of used blocks that hold a token
    slots_allocated: int  # num_used * block_size
    blocks_saved_by_sharing: int  # sum over tables of their blocks, minus num_used

    @property
    def utilization(self) -> float:
        """slots_used / slots_allocated (1.0 for an empty pool): the paper's KV-cache usage."""
        return self.slots_used / self.slots_allocated if self.slots_allocated else 1.0

    @property
    def internal_waste(self) -> int:
        return self.slots_allocated - self.slots_used


@dataclass(frozen=True)
class MemoryStats:
    """What the manager's memory looks like now, as plain data for docs, experiments and tests."""

    device: PoolStats
    host: PoolStats
    seqs: list[SeqMemory]
    prefix_cache_hits: int
    prefix_cache_misses: int
    cow_copies: int  # blocks copied by copy-on-write so far
    blocks_swapped_out: int  # so far
    blocks_swapped_in: int  # so far


def pool_stats(
    pool: BlockAllocator, tables: dict[int, BlockTable], block_size: int
) -> PoolStats:
    """The state of `pool`, whose blocks the block tables `tables` hold.

    Every block of a table but its last is full (a table fills its blocks in order), so only the
    last blocks are looked at one by one; the rest is counted in bulk. A block's reference count is
    the number of tables that hold it, so a shared block is one that two or more tables name.

    Every used block has at least one holder, so when the tables name exactly as many blocks as
    are used, each has one: nothing is shared, and the slots used are the tokens the tables
    hold. That case, the usual one (the engine asks every step), needs no count per block.
    """
    if sum(len(t.block_ids) for t in tables.values()) == pool.num_used:
        return PoolStats(
            name=pool.name,
            num_blocks=pool.num_blocks,
            num_free=pool.num_free,
            num_used=pool.num_used,
            num_shared=0,
            num_cached_free=getattr(pool, "num_cached_free", 0),
            slots_used=sum(t.num_tokens for t in tables.values()),
            slots_allocated=pool.num_used * block_size,
            blocks_saved_by_sharing=0,
        )
    holders = Counter(
        itertools.chain.from_iterable(t.block_ids for t in tables.values())
    )
    full = set(itertools.chain.from_iterable(t.block_ids[:-1] for t in tables.values()))
    # a table's last block -> the most slots any holder filled in it
    last_fill: dict[int, int] = {}
    for table in tables.values():
        if table.block_ids:
            block = table.block_ids[-1]
            fill = table.num_tokens - (len(table.block_ids) - 1) * block_size
            last_fill[block] = max(last_fill.get(block, 0), fill)
    partial = sum(
        block_size - fill for block, fill in last_fill.items() if block not in full
    )
    return PoolStats(
        name=pool.name,
        num_blocks=pool.num_blocks,
        num_free=pool.num_free,
        num_used=pool.num_used,
        num_shared=sum(count > 1 for count in holders.values()),
        num_cached_free=getattr(pool, "num_cached_free", 0),
        slots_used=len(holders) * block_size - partial,
        slots_allocated=pool.num_used * block_size,
        blocks_saved_by_sharing=holders.total() - len(holders),
    )
