"""Readable pure-PyTorch reference modules, one OS-paging concept each.

The CPU-side policy here (allocator, block tables, manager, prefix cache) is shared by every backend.
The tensor work (cache_ops, attention) is the reference backend of the kernel contract (backend.py).
"""

from minipaged.reference.attention import (
    dense_attention,
    paged_attention,
    paged_attention_blockwise,
)
from minipaged.reference.block_allocator import BlockAllocator, NoFreeBlocksError
from minipaged.reference.block_manager import AllocStatus, BlockManager
from minipaged.reference.block_table import (
    BlockTable,
    block_tables_tensor,
    num_blocks_for,
)
from minipaged.reference.cache_ops import copy_blocks, swap_blocks, write_kv
from minipaged.reference.memory_stats import MemoryStats, PoolStats, SeqMemory
from minipaged.reference.prefix_cache import (
    PrefixCachingBlockAllocator,
    hash_block_tokens,
    hash_full_blocks,
)

__all__ = [
    "AllocStatus",
    "BlockAllocator",
    "BlockManager",
    "BlockTable",
    "MemoryStats",
    "NoFreeBlocksError",
    "PoolStats",
    "PrefixCachingBlockAllocator",
    "SeqMemory",
    "block_tables_tensor",
    "copy_blocks",
    "dense_attention",
    "hash_block_tokens",
    "hash_full_blocks",
    "num_blocks_for",
    "paged_attention",
    "paged_attention_blockwise",
    "swap_blocks",
    "write_kv",
]
