"""write_kv, copy_blocks and swap_blocks as Triton kernels (mirrors reference/cache_ops.py).

Each launcher runs the reference's input checks first (reference/validation.py), so both backends
refuse the same inputs with the same messages, then launches one program per token (write_kv) or per
block (copy, gather, scatter). A block of the pool is `block_size * num_kv_heads * head_dim`
consecutive elements in a contiguous pool, so moving a block is moving one flat row.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from minipaged.reference.validation import (
    check_copy_blocks,
    check_swap_blocks,
    check_write_kv,
)

COPY_TILE = 1024  # elements one program moves per loop iteration


def interpreting() -> bool:
    """Is Triton's interpreter on (so kernels can run on CPU tensors)?"""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_runnable(tensor: torch.Tensor, name: str) -> None:
    """CUDA tensors run compiled, CPU ones interpreted; pools must be contiguous."""
    if tensor.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{name} must be on a CUDA device for the Triton backend, got "
            f"{tensor.device}: Triton runs CPU tensors only through its interpreter, "
            "which is off; move the tensors to 'cuda', or set TRITON_INTERPRET=1 "
            "before triton (or minipaged) is imported"
        )
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous for the Triton backend")


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` the current CUDA device around a launch (a no-op off CUDA).

    Triton launches a kernel on the *current* CUDA device, not on the device of its tensors: a pool on
    cuda:1 while cuda:0 is current would be read by a kernel running on cuda:0. Every launcher wraps
    its launches in this, as torch's own ops do.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@triton.jit
def _write_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim], the step's new keys (any strides)
    # [num_tokens, num_kv_heads, head_dim], the step's new values (any strides)
    value_ptr,
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache_ptr,  # the same
    slot_mapping_ptr,  # [num_tokens] int64; -1 marks a padding token to skip
    stride_kt,  # elements between two tokens in key
    stride_kh,  # elements between two heads in key
    stride_vt,  # elements between two tokens in value
    stride_vh,  # elements between two heads in value
    num_kv_heads,  # heads of one token's row
    head_dim,  # elements of one head
    # num_kv_heads rounded up to a power of two (tl.arange needs one)
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,  # head_dim rounded up to a power of two
):
    token = tl.program_id(0)  # one program stores one token's K and V rows
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:  # padding: nothing to store
        return
    offs_h = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    offs_d = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    # the lanes past the row do nothing
    mask = (offs_h < num_kv_heads) & (offs_d < head_dim)
    # a slot is one token row of the pool
    row = slot * num_kv_heads * head_dim + offs_h * head_dim + offs_d
    key = tl.load(key_ptr + token * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
    tl.store(k_cache_ptr + row, key, mask=mask)
    value = tl.load(
        value_ptr + token * stride_vt + offs_h * stride_vh + offs_d, mask=mask
    )
    tl.store(v_cache_ptr + row, value, mask=mask)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store each token's K/V at its slot; slot -1 skips. Mirrors reference.cache_ops.write_kv."""
    check_write_kv(key, value, k_cache, v_cache, slot_mapping)
    check_runnable(k_cache, "k_cache")
    check_runnable(v_cache, "v_cache")
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    # the kernel reads a head's elements consecutively
    if key.stride(2) != 1 or value.stride(2) != 1:
        key, value = key.contiguous(), value.contiguous()
    # the kernel reads it as a flat array (a view may be strided)
    slot_mapping = slot_mapping.contiguous()
    with launch_device(k_cache.device):
        _write_kv_kernel[(num_tokens,)](
            key,
            value,
            k_cache,
            v_cache,
            slot_mapping,
            key.stride(0),
            key.stride(1),
            value.stride(0),
            value.stride(1),
            num_kv_heads,
            head_dim,
            BLOCK_H=triton.next_power_of_2(num_kv_heads),
            BLOCK_D=triton.next_power_of_2(head_dim),
        )


@triton.jit
def _copy_rows_kernel(
    # [num_src_rows, row_size], contiguous: a row is one block of a pool (or of a
    # staging buffer)
    src_ptr,
    dst_ptr,  # [num_dst_rows, row_size], contiguous
    src_rows_ptr,  # [n] int64: the row of src each program reads
    dst_rows_ptr,  # [n] int64: the row of dst it writes
    row_size,  # elements of one row (block_size * num_kv_heads * head_dim)
    TILE: tl.constexpr,  # elements moved per loop iteration
):
    pair = tl.program_id(0)  # one program moves one whole block
    src_row = tl.load(src_rows_ptr + pair)
    dst_row = tl.load(dst_rows_ptr + pair)
    for start in range(0, row_size, TILE):
        offs = start + tl.arange(0, TILE)
        mask = offs < row_size  # the last tile may run past the row
        data = tl.load(src_ptr + src_row * row_size + offs, mask=mask)
        tl.store(dst_ptr + dst_row * row_size + offs, data, mask=mask)


def _copy_rows(
    src: torch.Tensor, dst: torch.Tensor, src_rows: torch.Tensor, dst_rows: torch.Tensor
) -> None:
    """dst[dst_rows[i]] = src[src_rows[i]] for every i, in one launch.

    Rows are whole blocks.
    """
    if src_rows.numel() == 0:
        return
    # the host side of a swap on a GPU machine
    if src.device.type == "cpu" and not interpreting():
        dst[dst_rows] = src[src_rows]
        return
    row_size = src[0].numel()
    # the kernel reads them as flat arrays
    src_rows, dst_rows = src_rows.contiguous(), dst_rows.contiguous()
    with launch_device(src.device):
        _copy_rows_kernel[(src_rows.numel(),)](
            src, dst, src_rows, dst_rows, row_size, TILE=COPY_TILE
        )


@triton.jit
def _copy_blocks_kernel(
    # [2 * num_layers] int64: the address of every layer's k_cache, then every v_cache
    cache_ptrs_ptr,
    block_mapping_ptr,  # [n, 2] int64, contiguous: (src, dst) block pairs
    block_numel,  # elements of one block (block_size * num_kv_heads * head_dim)
    # the pools' element type (their addresses arrive as plain integers)
    DTYPE: tl.constexpr,
    TILE: tl.constexpr,  # elements moved per loop iteration
):
    # one (src, dst) pair (axis 0: CUDA allows 2**31 - 1 there, 65,535 on axis 1) ...
    pair = tl.program_id(0)
    cache = tl.program_id(1)  # ... in one pool (one layer's K or V) per program
    # an integer made a pointer again
    pool = tl.load(cache_ptrs_ptr + cache).to(tl.pointer_type(DTYPE))
    src = tl.load(block_mapping_ptr + 2 * pair)
    dst = tl.load(block_mapping_ptr + 2 * pair + 1)
    for start in range(0, block_numel, TILE):
        offs = start + tl.arange(0, TILE)
        mask = offs < block_numel  # the last tile may run past the block
        data = tl.load(pool + src * block_numel + offs, mask=mask)
        tl.store(pool + dst * block_numel + offs, data, mask=mask)


_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


def copy_blocks(
    k_caches: Sequence[torch.Tensor],
    v_caches: Sequence[torch.Tensor],
    block_mapping: torch.Tensor,
) -> None:
    """Copy whole blocks src -> dst in every layer (copy-on-write). Mirrors reference.cache_ops.copy_blocks.

    One launch for everything, the paper's fused block copy (section 5.1): a step's copy-on-writes
    are many small copies (one block, every layer, K and V), and one launch each would cost more in
    launch overhead than in copying. The kernel gets the pools as a table of addresses, one program
    per (pair, pool), like vLLM's copy_blocks kernel. (Pools of different dtypes or block shapes,
    which no model has, take one launch per kind.)
    """
    check_copy_blocks(k_caches, v_caches, block_mapping)
    pools = [*k_caches, *v_caches]
    for cache in pools:
        check_runnable(cache, "k_caches and v_caches")
    if block_mapping.shape[0] == 0:
        return
    # layers of one model share a kind: one launch in practice
    kinds: dict[tuple, list[torch.Tensor]] = {}
    for pool in pools:
        kinds.setdefault((pool.dtype, pool[0].numel()), []).append(pool)
    mapping = block_mapping.contiguous()  # [n, 2]
    for (dtype, block_numel), same in kinds.items():
        cache_ptrs = torch.tensor(
            [pool.data_ptr() for pool in same], dtype=torch.int64, device=same[0].device
        )  # [number of pools]
        with launch_device(same[0].device):
            _copy_blocks_kernel[(mapping.shape[0], len(same))](
                cache_ptrs,
                mapping,
                block_numel,
                DTYPE=_TL_DTYPES[dtype],
                TILE=COPY_TILE,
            )


def swap_blocks(
    src: torch.Tensor, dst: torch.Tensor, block_mapping: torch.Tensor
) -> None:
    """Move whole blocks between pools on any devices. Mirrors reference.cache_ops.swap_blocks.

    A kernel gathers the blocks to move into one contiguous staging buffer on src's device, the
    buffer crosses to dst's device in one transfer, and a kernel scatters it into dst: one transfer,
    not one per block (the paper's section 7.3: many small copies waste the bus's bandwidth).
    """
    check_swap_blocks(src, dst, block_mapping)
    for pool, name in ((src, "src"), (dst, "dst")):
        if not pool.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the Triton backend")
    n = block_mapping.shape[0]
    if n == 0:
        return
    # Host memory on the way to or from a GPU is pinned (page-locked), so the GPU's copy
    # engine reads or writes it directly, without the driver's extra pass through its
    # own pinned buffer.
    pinned = src.device.type == "cpu" and dst.device.type == "cuda"
    staging = torch.empty(
        (n, *src.shape[1:]), dtype=src.dtype, device=src.device, pin_memory=pinned
    )  # [n, block_size, num_kv_heads, head_dim]
    order = torch.arange(n, device=src.device)
    _copy_rows(src, staging, block_mapping[:, 0].to(src.device), order)  # gather
    if src.device.type == "cuda" and dst.device.type == "cpu":
        host = torch.empty(staging.shape, dtype=staging.dtype, pin_memory=True)
        staging = host.copy_(staging)  # the one transfer, into pinned memory
    else:
        staging = staging.to(dst.device)  # the one transfer
    # scatter
    _copy_rows(staging, dst, order.to(dst.device), block_mapping[:, 1].to(dst.device))
