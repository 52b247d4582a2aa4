"""The Triton backend: every op of the kernel contract as a Triton kernel (`get_backend("triton")`).

OS idea: the same mechanism, in hardware this time: where the reference reads a sequence's pages with
PyTorch indexing, these kernels walk the block table themselves, a tile of tokens at a time, like an
MMU walking a page table (OSTEP ch. 18-19). KV counterpart: vLLM paper section 5.1 (its custom
kernels: fused reshape-and-write, block-wise attention, fused block copy).

The modules, each beside the reference it mirrors:

- cache_ops.py: write_kv (one program per token), copy_blocks (every layer's pairs in one launch),
  swap_blocks (gather to a staging buffer, one transfer, scatter);
- attention.py: the public paged_attention, which plans the step and dispatches to
- decode.py: split-KV (flash-decoding) decode with a KV group's query heads packed into one tl.dot,
  and the log-sum-exp merge of the chunks;
- prefill.py: tiles of query rows against the table with the causal mask.

On CUDA tensors the kernels are compiled. Without a CUDA device they run on CPU tensors through
Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before triton is imported:
`import minipaged` does that itself when no CUDA device is present, the variable is unset and triton
is not imported yet (minipaged/_triton_env.py), so `get_backend("triton")` works on any machine;
otherwise importing this package says what to set. The interpreter is slow: keep shapes small there.
benchmarks/compile_kernels.py compiles every kernel for sm_90 and sm_80 without a GPU.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    raise ImportError(
        "the Triton backend without a CUDA device runs through Triton's interpreter, which must be on "
        "before triton is imported: set TRITON_INTERPRET=1 in the environment (e.g. "
        "`TRITON_INTERPRET=1 python ...`), or import minipaged before anything that imports triton"
    )

from minipaged.fast.attention import paged_attention
from minipaged.fast.cache_ops import copy_blocks, swap_blocks, write_kv


class TritonBackend:
    """The kernel contract in Triton: the launchers of fast/cache_ops.py and fast/attention.py."""

    name = "triton"
    write_kv = staticmethod(write_kv)
    paged_attention = staticmethod(paged_attention)
    copy_blocks = staticmethod(copy_blocks)
    swap_blocks = staticmethod(swap_blocks)

    def __repr__(self) -> str:
        return "TritonBackend()"


__all__ = ["TritonBackend", "copy_blocks", "paged_attention", "swap_blocks", "write_kv"]
