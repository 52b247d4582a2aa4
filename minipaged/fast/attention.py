"""Paged attention as a Triton kernel (mirrors reference/attention.py's paged_attention_blockwise).

One program computes one query row for one query head: it walks its sequence's block table, loads
one block of keys at a time, keeps a running maximum, denominator and output (the online softmax),
and loads only the rows at or before its own position, so stale rows (and the -1 padding of the
table) are never read. This is the simplest correct version, held to the reference by the contract
tests; the faster variants the Kernels docs describe (split-KV decode, GQA packing) come beside it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minipaged.fast.cache_ops import check_runnable
from minipaged.reference.validation import check_paged_attention


@triton.jit
def _paged_attention_kernel(
    query_ptr,  # [num_q_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache_ptr,  # the same
    out_ptr,  # [num_q_tokens, num_heads, head_dim], written
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    seq_of_row_ptr,  # [num_q_tokens] int32: the sequence each query row belongs to
    pos_of_row_ptr,  # [num_q_tokens] int32: the row's position in its sequence
    stride_qt,  # elements between two query rows
    stride_qh,  # elements between two query heads
    stride_ot,  # elements between two output rows
    stride_oh,  # elements between two output heads
    stride_bt,  # elements between two block-table rows
    num_kv_heads,  # KV heads of the pool
    group,  # query heads per KV head (GQA/MQA)
    head_dim,  # elements of one head
    scale,  # softmax scale
    block_size,  # tokens per KV block
    BLOCK_S: tl.constexpr,  # block_size rounded up to a power of two (tl.arange needs one)
    BLOCK_D: tl.constexpr,  # head_dim rounded up to a power of two
):
    row = tl.program_id(0)  # one query row ...
    head = tl.program_id(1)  # ... and one query head per program
    kv_head = head // group  # the KV head this query head reads
    seq = tl.load(seq_of_row_ptr + row)
    pos = tl.load(pos_of_row_ptr + row)  # this row sees positions 0 .. pos (causal)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim  # lanes past head_dim do nothing
    q = tl.load(query_ptr + row * stride_qt + head * stride_qh + offs_d, mask=mask_d, other=0.0).to(
        tl.float32
    )
    offs_s = tl.arange(0, BLOCK_S)  # the rows of one block (lanes past block_size masked below)
    row_stride = num_kv_heads * head_dim  # elements of one token row of the pool
    m = float("-inf")  # running maximum of the scores
    denom = 0.0  # running sum of exp(score - m)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)  # running sum of exp(score - m) * v
    for j in range(0, pos // block_size + 1):  # the blocks holding positions 0 .. pos
        block = tl.load(block_tables_ptr + seq * stride_bt + j).to(tl.int64)  # the page-table walk
        # rows past this row's position (the future, or stale) and lanes past the block: not read
        mask_s = (offs_s < block_size) & (j * block_size + offs_s <= pos)
        rows = block * block_size + offs_s  # their slots
        ptrs = rows[:, None] * row_stride + kv_head * head_dim + offs_d[None, :]  # [BLOCK_S, BLOCK_D]
        mask = mask_s[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)  # never reads a masked row
        s = tl.sum(k * q[None, :], axis=1) * scale  # [BLOCK_S] scores
        s = tl.where(mask_s, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))  # block 0 holds position 0, so m is finite from here on
        alpha = tl.exp(m - m_new)  # rescales what was accumulated to the new maximum
        p = tl.exp(s - m_new)  # [BLOCK_S]
        v = tl.load(v_cache_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
        denom = denom * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    out = acc / denom
    tl.store(
        out_ptr + row * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d
    )


def paged_attention(
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
    """Causal paged attention of each sequence's last q_len tokens (mirrors the reference's).

    Raises:
        ValueError: as the reference, with the same messages; and for a non-contiguous pool.
        RuntimeError: for CPU tensors when Triton's interpreter is off.
    """
    check_paged_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out)
    check_runnable(k_cache, "k_cache")
    check_runnable(v_cache, "v_cache")
    given = out
    out = torch.empty_like(query) if out is None or out.stride(2) != 1 else out  # [num_q_tokens, heads, dim]
    num_q_tokens, num_heads, head_dim = query.shape
    if num_q_tokens == 0:
        return out if given is None else given
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()  # [num_seqs]
    seq_of_row = torch.repeat_interleave(
        torch.arange(len(q_lens), device=query.device), q_lens
    )  # [num_q_tokens]
    row_in_seq = torch.arange(num_q_tokens, device=query.device) - query_start_loc[:-1].long()[seq_of_row]
    pos_of_row = seq_lens.long()[seq_of_row] - q_lens[seq_of_row] + row_in_seq  # the row's position
    if query.stride(2) != 1:
        query = query.contiguous()
    num_kv_heads = k_cache.shape[2]
    _paged_attention_kernel[(num_q_tokens, num_heads)](
        query,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_of_row.to(torch.int32),
        pos_of_row.to(torch.int32),
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        num_kv_heads,
        num_heads // num_kv_heads,
        head_dim,
        float(scale),
        k_cache.shape[1],
        BLOCK_S=triton.next_power_of_2(k_cache.shape[1]),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
    if given is not None and given is not out:  # a caller's buffer the kernel could not write directly
        given.copy_(out)
        return given
    return out
