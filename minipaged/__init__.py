"""minipaged: PagedAttention built twice, as readable PyTorch and as Triton kernels.

    from minipaged import LLM, SamplingParams
    llm = LLM("tiny-llama")  # a preset with seeded random weights; or a local checkpoint directory
    outs = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=8))

The engine (LLM) drives the scheduler and the paged memory manager in `minipaged.reference`, and a
backend of the kernel contract (`get_backend("reference")`, minipaged.backend) for the tensor work.

The names below load at first use, like pages on demand (PEP 562 `__getattr__`): `import minipaged`
and `minipaged --help` import neither torch nor transformers; `from minipaged import LLM` imports
what LLM needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from minipaged._triton_env import use_triton_interpreter_without_gpu

# first: transformers imports triton, and the switch must precede it
use_triton_interpreter_without_gpu()

__version__ = "0.1.0"

# Each public name and the module that defines it.
_EXPORTS = {
    "LLM": "minipaged.engine",
    "AllocStatus": "minipaged.reference",
    "BeamSearchOutput": "minipaged.outputs",
    "BeamSearchParams": "minipaged.sampling",
    "BeamSequence": "minipaged.outputs",
    "BlockAllocator": "minipaged.reference",
    "BlockManager": "minipaged.reference",
    "BlockTable": "minipaged.reference",
    "CompletionOutput": "minipaged.outputs",
    "EngineStats": "minipaged.outputs",
    "KVBackend": "minipaged.backend",
    "NoFreeBlocksError": "minipaged.reference",
    "PrefixCachingBlockAllocator": "minipaged.reference",
    "RequestOutput": "minipaged.outputs",
    "SamplingParams": "minipaged.sampling",
    "Sequence": "minipaged.sequence",
    "SequenceGroup": "minipaged.sequence",
    "SequenceStatus": "minipaged.sequence",
    "StepStats": "minipaged.outputs",
    "available_backends": "minipaged.backend",
    "get_backend": "minipaged.backend",
}

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


def __getattr__(name: str) -> object:
    """Import a public name (or a submodule, `minipaged.engine`) at its first use, then keep it here."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            # the submodule exists; something it imports does not
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(
                f"module {__name__!r} has no attribute {name!r}"
            ) from None
    globals()[name] = value  # the next lookup finds it without calling __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what type checkers and IDEs read: the same names, imported eagerly
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
