"""Sizes of the KV cache: how many bytes a token and a block take.

OS idea: before paging anything, know the page size and what a process's memory costs (OSTEP ch. 13).
KV counterpart: vLLM paper section 3: every token keeps one key and one value vector per layer and per
KV head, so the cache grows by the same number of bytes with each token of each sequence. The engine's
CacheConfig and SchedulerConfig are validated when they are built, so a bad value fails at once with
the field's name.
"""

from __future__ import annotations

from dataclasses import dataclass


def kv_cache_bytes_per_token(
    num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int
) -> int:
    """Bytes of K and V that one token keeps in the cache: 2 x layers x kv_heads x head_dim x dtype size.

    Example: OPT-13B (40 layers, 40 heads of 128, fp16) keeps 2 x 40 x 40 x 128 x 2 = 819,200 bytes,
    the paper's "800 KB per token".

    Raises:
        ValueError: if any argument is not a positive int.
    """
    for name, value in (
        ("num_layers", num_layers),
        ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim),
        ("dtype_bytes", dtype_bytes),
    ):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def kv_cache_bytes_per_block(
    block_size: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int
) -> int:
    """Bytes of one KV block across all layers: block_size tokens' worth (what a page costs).

    Raises:
        ValueError: if any argument is not a positive int.
    """
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return block_size * kv_cache_bytes_per_token(
        num_layers, num_kv_heads, head_dim, dtype_bytes
    )


PREEMPTION_MODES = ("recompute", "swap")
BATCHING_MODES = ("iteration", "static")


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class CacheConfig:
    """The KV cache: block size and the sizes of the device pool and the host swap space.

    Args:
        block_size: tokens per block (the page size).
        num_gpu_blocks: blocks in the device pool.
        num_cpu_blocks: blocks in the host pool (the swap space); 0 turns swapping off.
        watermark: fraction of device blocks kept free at admission (vLLM's default, 1%).
        enable_prefix_caching: share full blocks across requests by their hash.

    Raises:
        ValueError: naming the field, if a value is out of range.
    """

    block_size: int = 16
    num_gpu_blocks: int = 256
    num_cpu_blocks: int = 256
    watermark: float = 0.01
    enable_prefix_caching: bool = False

    def __post_init__(self) -> None:
        _positive_int("block_size", self.block_size)
        _positive_int("num_gpu_blocks", self.num_gpu_blocks)
        if not isinstance(self.num_cpu_blocks, int) or self.num_cpu_blocks < 0:
            raise ValueError(
                f"num_cpu_blocks must be a non-negative int, got {self.num_cpu_blocks!r}"
            )
        if (
            not isinstance(self.watermark, (int, float))
            or not 0.0 <= self.watermark < 1.0
        ):
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark!r}")

    @property
    def watermark_blocks(self) -> int:
        return int(self.watermark * self.num_gpu_blocks)


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's per-step budget and its preemption mode.

    Args:
        max_model_len: the longest sequence (prompt plus output) the model can hold.
        max_num_seqs: the most sequences running at once.
        max_num_batched_tokens: the most tokens one step computes, prefills and decodes together
            (the scheduler's budget for every step). At least max_num_seqs, so that every running
            sequence can always decode. Without chunked prefill, a group whose prefill is larger
            than the whole budget runs alone in its step: the one step that may pass it.
        preemption_mode: "recompute" or "swap" (falls back to recompute when the host pool is full).
        batching: "iteration" (Orca's and vLLM's: the batch is formed anew every step, so a
            waiting request joins as soon as it fits) or "static" (FasterTransformer's: a batch is
            admitted only when the previous one has wholly finished; the experiments' stand-in for
            systems without iteration-level scheduling).
        enable_chunked_prefill: split prompts into chunks that fill what the step's budget leaves
            after the running decodes (Sarathi-Serve's idea, vLLM's default): a long prompt is
            computed across several steps and never stalls the decodes. Needs "iteration".

    Raises:
        ValueError: naming the field, if a value is out of range; naming both, if
            max_num_batched_tokens < max_num_seqs.
    """

    max_model_len: int = 2048
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    preemption_mode: str = "recompute"
    batching: str = "iteration"
    enable_chunked_prefill: bool = False

    def __post_init__(self) -> None:
        _positive_int("max_model_len", self.max_model_len)
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}): each running sequence decodes one token a step"
            )
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(
                f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}"
            )
        if self.batching not in BATCHING_MODES:
            raise ValueError(
                f"batching must be 'iteration' or 'static', got {self.batching!r}"
            )
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ValueError(
                f"enable_chunked_prefill must be a bool, got {self.enable_chunked_prefill!r}"
            )
        if self.enable_chunked_prefill and self.batching != "iteration":
            raise ValueError(
                "enable_chunked_prefill needs batching='iteration': a static batch is "
                "admitted whole"
            )
