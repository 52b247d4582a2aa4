"""minipaged: PagedAttention built twice, as readable PyTorch and as Triton kernels.

The engine (LLM, SamplingParams, ...) arrives with the engine issue; today the package holds the paged
memory manager in `minipaged.reference`, the sequences it manages in `minipaged.sequence`, and the
kernel contract with its reference backend (`get_backend("reference")`, minipaged.backend).
"""

from minipaged.backend import KVBackend, available_backends, get_backend
from minipaged.reference import (
    AllocStatus,
    BlockAllocator,
    BlockManager,
    BlockTable,
    NoFreeBlocksError,
    PrefixCachingBlockAllocator,
)
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus

__version__ = "0.1.0"

__all__ = [
    "AllocStatus",
    "BlockAllocator",
    "BlockManager",
    "BlockTable",
    "KVBackend",
    "NoFreeBlocksError",
    "PrefixCachingBlockAllocator",
    "Sequence",
    "SequenceGroup",
    "SequenceStatus",
    "__version__",
    "available_backends",
    "get_backend",
]
