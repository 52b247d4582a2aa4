"""The kernel contract: the four tensor operations a backend provides, and `get_backend(name)`.

OS idea: an operating system keeps its policy (which page to evict, whom to schedule) apart from the
mechanism that moves bytes (the MMU, the DMA engine), behind a narrow interface, so the mechanism can
be replaced without touching the policy (OSTEP ch. 4, "mechanism vs policy"). KV counterpart: the
block manager and the scheduler decide; a *backend* does the tensor work for their decisions. vLLM
paper section 5.1 lists the same kernels: fused reshape-and-write of K/V, block-wise attention
reading through the block table, and fused block copy.

Every backend keeps one KV pool per layer in this layout, so a block is a page of token rows:

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot = block_table[pos // block_size] * block_size + pos % block_size

Rules every backend keeps: softmax and accumulation in float32 whatever the cache dtype (fp32, fp16,
bf16); never read a slot at or past `seq_lens[b]`; tables may name any block, repeated or not; bad
inputs raise a ValueError naming the argument (the checks in reference/validation.py, shared by all).

    >>> backend = get_backend("reference")
    >>> backend.name
    'reference'
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from minipaged.reference import attention, cache_ops

BACKENDS = ("reference", "triton")
INSTALL_TRITON = "pip install 'minipaged[triton]'  (or: pip install triton)"


@runtime_checkable
class KVBackend(Protocol):
    """What a backend provides. Arguments are positional, in this order; tests call every backend alike."""

    name: str

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Store key, value `[num_tokens, num_kv_heads, head_dim]` at their slots; slot -1 means skip."""
        ...

    def paged_attention(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        query_start_loc: torch.Tensor,
        scale: float,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal attention of each sequence's last q_len tokens through its block table.

        query `[num_q_tokens, num_heads, head_dim]`; block_tables `[num_seqs, max_blocks]` int32
        (padding -1); seq_lens `[num_seqs]` int32; query_start_loc `[num_seqs + 1]` int32. Returns
        `[num_q_tokens, num_heads, head_dim]` (written into `out` when given). Every query row
        belongs to a sequence: a step padded for write_kv (slot -1) passes only its real rows here.
        """
        ...

    def copy_blocks(
        self,
        k_caches: Sequence[torch.Tensor],
        v_caches: Sequence[torch.Tensor],
        block_mapping: torch.Tensor,
    ) -> None:
        """Copy whole blocks (src, dst) of block_mapping `[n, 2]` int64 in every layer (copy-on-write)."""
        ...

    def swap_blocks(
        self, src: torch.Tensor, dst: torch.Tensor, block_mapping: torch.Tensor
    ) -> None:
        """Move whole blocks between two pools that may sit on different devices (swap out / in)."""
        ...


class ReferenceBackend:
    """The readable pure-PyTorch backend: the functions of reference/cache_ops.py and attention.py."""

    name = "reference"
    write_kv = staticmethod(cache_ops.write_kv)
    paged_attention = staticmethod(attention.paged_attention)
    copy_blocks = staticmethod(cache_ops.copy_blocks)
    swap_blocks = staticmethod(cache_ops.swap_blocks)

    def __repr__(self) -> str:
        return "ReferenceBackend()"


def get_backend(name: str) -> KVBackend:
    """The backend called `name`: "reference" (pure PyTorch) or "triton" (Triton kernels, minipaged.fast).

    Raises:
        ValueError: if `name` is not one of BACKENDS (the message lists them).
        ImportError: for "triton" when the triton package is not installed (the message says how to
            install it).
    """
    if name == "reference":
        return ReferenceBackend()
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ImportError(
                f"backend 'triton' needs the triton package, which is not installed: {INSTALL_TRITON}"
            )
        # imported only when asked for: it imports triton
        from minipaged.fast import TritonBackend

        return TritonBackend()
    raise ValueError(
        f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {name!r}"
    )


def available_backends() -> list[str]:
    """The backends that `get_backend` can load here: "reference" always, "triton" when it is installed."""
    names = ["reference"]
    if importlib.util.find_spec("triton") is not None:
        names.append("triton")
    return names
