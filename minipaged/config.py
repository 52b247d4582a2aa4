"""Sizes of the KV cache: how many bytes a token and a block take.

OS idea: before paging anything, know the page size and what a process's memory costs (OSTEP ch. 13).
KV counterpart: vLLM paper section 3: every token keeps one key and one value vector per layer and per
KV head, so the cache grows by the same number of bytes with each token of each sequence. (The
engine's CacheConfig / SchedulerConfig / EngineConfig arrive with the engine.)
"""

from __future__ import annotations


def kv_cache_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
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
    return block_size * kv_cache_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype_bytes)
