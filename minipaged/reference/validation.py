"""Input checks of the kernel contract, shared by every backend.

OS idea: the kernel never trusts an address a process hands it: a system call checks that a buffer
lies inside the caller's mapped memory before touching it, and answers EFAULT rather than corrupting
another process (OSTEP ch. 6, "limited direct execution"). KV counterpart: a block id outside the pool
or a seq_len past the block table's capacity would make a kernel read or write someone else's KV
blocks, silently. So each op checks its arguments first and raises a ValueError that names the
argument and what was expected. The Triton launchers call these same functions, so both backends
refuse exactly the same inputs with exactly the same messages.

The layout checked here is the contract in backend.py:

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot = block_table[pos // block_size] * block_size + pos % block_size
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tensor(name: str, value: object, ndim: int, what: str) -> torch.Tensor:
    """`value` must be a tensor with `ndim` dimensions (`what` spells the expected shape)."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor {what}, got {type(value).__name__}"
        )
    if value.dim() != ndim:
        raise ValueError(f"{name} must have shape {what}, got {tuple(value.shape)}")
    return value


def _dtype(
    name: str, tensor: torch.Tensor, expected: torch.dtype | tuple[torch.dtype, ...]
) -> None:
    allowed = expected if isinstance(expected, tuple) else (expected,)
    if tensor.dtype not in allowed:
        names = " or ".join(str(d) for d in allowed)
        raise ValueError(f"{name} must have dtype {names}, got {tensor.dtype}")


def _device(name: str, tensor: torch.Tensor, device: torch.device, where: str) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} must be on {where} ({device}), got {tensor.device}")


def check_cache_pair(
    k_cache: object, v_cache: object, k_name: str = "k_cache", v_name: str = "v_cache"
) -> None:
    """Check one layer's pools: 4-D, the same shape, dtype and device, a floating dtype of the contract."""
    what = "[num_blocks, block_size, num_kv_heads, head_dim]"
    k = _tensor(k_name, k_cache, 4, what)
    v = _tensor(v_name, v_cache, 4, what)
    _dtype(k_name, k, CACHE_DTYPES)
    if v.shape != k.shape:
        raise ValueError(
            f"{v_name} must have the shape of {k_name} {tuple(k.shape)}, got {tuple(v.shape)}"
        )
    _dtype(v_name, v, k.dtype)
    _device(v_name, v, k.device, f"the device of {k_name}")


def check_block_mapping(
    block_mapping: object,
    num_src_blocks: int,
    num_dst_blocks: int,
    device: torch.device,
    where: str,
    same_pool: bool = False,
) -> torch.Tensor:
    """Check a `[n, 2]` int64 (src, dst) mapping: ids inside both pools, each dst written once.

    A dst named twice, or (within one pool, `same_pool`) a dst that is also a src, would make the
    result depend on the order in which the pairs are copied; copy-on-write and swapping never
    produce either.
    """
    mapping = _tensor(
        "block_mapping", block_mapping, 2, "[n, 2] of (src, dst) block ids"
    )
    if mapping.shape[1] != 2:
        raise ValueError(
            f"block_mapping must have shape [n, 2] of (src, dst) block ids, got {tuple(mapping.shape)}"
        )
    _dtype("block_mapping", mapping, torch.int64)
    _device("block_mapping", mapping, device, where)
    src, dst = mapping[:, 0], mapping[:, 1]
    if mapping.shape[0] and (src.min() < 0 or src.max() >= num_src_blocks):
        raise ValueError(
            f"block_mapping sources must be block ids in [0, {num_src_blocks}), got {src.tolist()}"
        )
    if mapping.shape[0] and (dst.min() < 0 or dst.max() >= num_dst_blocks):
        raise ValueError(
            f"block_mapping destinations must be block ids in [0, {num_dst_blocks}), got {dst.tolist()}"
        )
    if dst.unique().numel() != dst.numel():
        raise ValueError(
            f"block_mapping must name each destination block once, got {dst.tolist()}"
        )
    if same_pool and torch.isin(dst, src).any():
        raise ValueError(
            f"block_mapping must not copy into a block it copies from, got {mapping.tolist()}"
        )
    return mapping


def check_copy_blocks(
    k_caches: object, v_caches: object, block_mapping: object
) -> None:
    """Check copy_blocks' arguments: one (K, V) pool pair per layer, all with the same number of
    blocks on one device, and a mapping within one pool (see check_block_mapping)."""
    if not isinstance(k_caches, (list, tuple)) or not isinstance(
        v_caches, (list, tuple)
    ):
        raise ValueError(
            f"k_caches and v_caches must be lists of per-layer pools, got "
            f"{type(k_caches).__name__} and {type(v_caches).__name__}"
        )
    if not k_caches or len(k_caches) != len(v_caches):
        raise ValueError(
            f"k_caches and v_caches must list the same number (>= 1) of layers, "
            f"got {len(k_caches)} and {len(v_caches)}"
        )
    for layer, (k_cache, v_cache) in enumerate(zip(k_caches, v_caches, strict=True)):
        check_cache_pair(k_cache, v_cache, f"k_caches[{layer}]", f"v_caches[{layer}]")
        if (
            k_cache.shape[0] != k_caches[0].shape[0]
            or k_cache.device != k_caches[0].device
        ):
            raise ValueError(
                f"k_caches[{layer}] must have k_caches[0]'s {k_caches[0].shape[0]} blocks on "
                f"{k_caches[0].device}, got {k_cache.shape[0]} on {k_cache.device}"
            )
    num_blocks, device = k_caches[0].shape[0], k_caches[0].device
    where = "the device of k_caches[0]"
    check_block_mapping(
        block_mapping, num_blocks, num_blocks, device, where, same_pool=True
    )


def check_swap_blocks(src: object, dst: object, block_mapping: object) -> None:
    """Check swap_blocks' arguments: two pools holding the same kind of block, and a mapping on the CPU."""
    check_cache_pair(src, src, "src", "src")
    check_cache_pair(dst, dst, "dst", "dst")
    # checked just above
    assert isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)
    if src.dtype != dst.dtype or src.shape[1:] != dst.shape[1:]:
        raise ValueError(
            f"dst must hold blocks like src ({src.dtype}, block shape {tuple(src.shape[1:])}), "
            f"got {dst.dtype}, block shape {tuple(dst.shape[1:])}"
        )
    check_block_mapping(
        block_mapping, src.shape[0], dst.shape[0], torch.device("cpu"), "the CPU"
    )


def check_write_kv(
    key: object, value: object, k_cache: object, v_cache: object, slot_mapping: object
) -> None:
    """Check write_kv's arguments (see backend.KVBackend.write_kv); raise ValueError on the first bad one."""
    check_cache_pair(k_cache, v_cache)
    assert isinstance(k_cache, torch.Tensor)  # for the type checker: checked just above
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    what = f"[num_tokens, num_kv_heads={num_kv_heads}, head_dim={head_dim}]"
    for name, tensor in (("key", key), ("value", value)):
        tensor = _tensor(name, tensor, 3, what)
        if tuple(tensor.shape[1:]) != (num_kv_heads, head_dim):
            raise ValueError(
                f"{name} must have shape {what} to match k_cache, got {tuple(tensor.shape)}"
            )
        _dtype(name, tensor, k_cache.dtype)
        _device(name, tensor, k_cache.device, "the device of k_cache")
    assert isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor)
    if value.shape != key.shape:
        raise ValueError(
            f"value must have the shape of key {tuple(key.shape)}, got {tuple(value.shape)}"
        )
    slots = _tensor("slot_mapping", slot_mapping, 1, f"[num_tokens={key.shape[0]}]")
    if slots.shape[0] != key.shape[0]:
        raise ValueError(
            f"slot_mapping must have shape [num_tokens={key.shape[0]}], got {tuple(slots.shape)}"
        )
    _dtype("slot_mapping", slots, torch.int64)
    _device("slot_mapping", slots, k_cache.device, "the device of k_cache")
    num_slots = num_blocks * block_size
    if slots.numel() and (slots.min() < -1 or slots.max() >= num_slots):
        raise ValueError(
            f"slot_mapping must hold -1 (skip) or slots in [0, {num_slots}), got {slots.tolist()}"
        )
    written = slots[slots >= 0]
    if written.unique().numel() != written.numel():
        raise ValueError(
            f"slot_mapping must not name a slot twice, got {slots.tolist()}"
        )


def check_paged_attention(
    query: object,
    k_cache: object,
    v_cache: object,
    block_tables: object,
    seq_lens: object,
    query_start_loc: object,
    scale: object,
    out: object = None,
) -> None:
    """Check paged_attention's arguments (see backend.KVBackend.paged_attention).

    Beyond shapes, dtypes and devices, the values: every block a sequence reads lies in the pool,
    seq_lens fit in their table, query_start_loc starts at 0, never decreases and ends at
    num_q_tokens, and no sequence asks for more query rows than it has tokens.
    """
    check_cache_pair(k_cache, v_cache)
    assert isinstance(k_cache, torch.Tensor)
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    device = k_cache.device
    what = f"[num_q_tokens, num_heads, head_dim={head_dim}]"
    q = _tensor("query", query, 3, what)
    if q.shape[2] != head_dim:
        raise ValueError(
            f"query must have shape {what} to match k_cache, got {tuple(q.shape)}"
        )
    if q.shape[1] == 0 or q.shape[1] % num_kv_heads:
        raise ValueError(
            f"query's num_heads must be a positive multiple of num_kv_heads={num_kv_heads}, got {q.shape[1]}"
        )
    _dtype("query", q, k_cache.dtype)
    _device("query", q, device, "the device of k_cache")

    tables = _tensor("block_tables", block_tables, 2, "[num_seqs, max_blocks]")
    num_seqs, max_blocks = tables.shape
    _dtype("block_tables", tables, torch.int32)
    _device("block_tables", tables, device, "the device of k_cache")
    lens = _tensor("seq_lens", seq_lens, 1, f"[num_seqs={num_seqs}]")
    if lens.shape[0] != num_seqs:
        raise ValueError(
            f"seq_lens must have shape [num_seqs={num_seqs}], got {tuple(lens.shape)}"
        )
    _dtype("seq_lens", lens, torch.int32)
    _device("seq_lens", lens, device, "the device of k_cache")
    starts = _tensor(
        "query_start_loc", query_start_loc, 1, f"[num_seqs + 1 = {num_seqs + 1}]"
    )
    if starts.shape[0] != num_seqs + 1:
        raise ValueError(
            f"query_start_loc must have shape [num_seqs + 1 = {num_seqs + 1}], got {tuple(starts.shape)}"
        )
    _dtype("query_start_loc", starts, torch.int32)
    _device("query_start_loc", starts, device, "the device of k_cache")
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    if out is not None:
        o = _tensor("out", out, 3, f"{tuple(q.shape)} like query")
        if o.shape != q.shape:
            raise ValueError(
                f"out must have the shape of query {tuple(q.shape)}, got {tuple(o.shape)}"
            )
        _dtype("out", o, q.dtype)
        _device("out", o, device, "the device of k_cache")

    # The values: one trip to the host for the small metadata tensors.
    lens_list: Sequence[int] = lens.tolist()
    starts_list: Sequence[int] = starts.tolist()
    capacity = max_blocks * block_size
    if any(n < 0 or n > capacity for n in lens_list):
        raise ValueError(
            f"seq_lens must be in [0, {capacity}] (max_blocks={max_blocks} x block_size={block_size}), "
            f"got {lens_list}"
        )
    if starts_list[0] != 0 or starts_list[-1] != q.shape[0]:
        raise ValueError(
            f"query_start_loc must start at 0 and end at num_q_tokens={q.shape[0]}, got {starts_list}"
        )
    q_lens = [end - start for start, end in itertools.pairwise(starts_list)]
    if any(n < 0 for n in q_lens):
        raise ValueError(f"query_start_loc must be non-decreasing, got {starts_list}")
    for seq, (q_len, seq_len) in enumerate(zip(q_lens, lens_list, strict=True)):
        if q_len > seq_len:
            raise ValueError(
                f"query_start_loc gives sequence {seq} q_len={q_len} query rows but seq_lens[{seq}]="
                f"{seq_len}: q_len must be <= seq_len"
            )
    # Only the blocks that hold a sequence's tokens are read; the padding after them may be anything.
    needed = (
        torch.arange(max_blocks, device=device)[None, :]
        < ((lens + block_size - 1) // block_size)[:, None]
    )
    used = tables[needed]  # [total blocks read]
    if used.numel() and (used.min() < 0 or used.max() >= num_blocks):
        bad = sorted({int(b) for b in used.tolist() if not 0 <= b < num_blocks})
        raise ValueError(
            f"block_tables must name blocks in [0, {num_blocks}) for every block a sequence reads, got {bad}"
        )
