"""minipaged: PagedAttention built twice, as readable PyTorch and as Triton kernels.

    from minipaged import LLM, SamplingParams
    llm = LLM("tiny-llama")  # a preset with seeded random weights; or a local checkpoint directory
    outs = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=8))

The engine (LLM) drives the scheduler and the paged memory manager in `minipaged.reference`, and a
backend of the kernel contract (`get_backend("reference")`, minipaged.backend) for the tensor work.
"""

from minipaged._triton_env import use_triton_interpreter_without_gpu

use_triton_interpreter_without_gpu()  # first: transformers imports triton, and the switch must precede it

from minipaged.backend import KVBackend, available_backends, get_backend
from minipaged.engine import LLM
from minipaged.outputs import (
    BeamSearchOutput,
    BeamSequence,
    CompletionOutput,
    EngineStats,
    RequestOutput,
    StepStats,
)
from minipaged.reference import (
    AllocStatus,
    BlockAllocator,
    BlockManager,
    BlockTable,
    NoFreeBlocksError,
    PrefixCachingBlockAllocator,
)
from minipaged.sampling import BeamSearchParams, SamplingParams
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "AllocStatus",
    "BeamSearchOutput",
    "BeamSearchParams",
    "BeamSequence",
    "BlockAllocator",
    "BlockManager",
    "BlockTable",
    "CompletionOutput",
    "EngineStats",
    "KVBackend",
    "NoFreeBlocksError",
    "PrefixCachingBlockAllocator",
    "RequestOutput",
    "SamplingParams",
    "Sequence",
    "SequenceGroup",
    "SequenceStatus",
    "StepStats",
    "__version__",
    "available_backends",
    "get_backend",
]
