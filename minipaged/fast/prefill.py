"""Prefill attention as a Triton kernel: a tile of query rows against the whole table, causally.

OS idea: the same page-table walk as decode (fast/decode.py), now for a run of new tokens at once,
like a process touching a range of its pages in one sweep. KV counterpart: vLLM paper section 5.1;
the tiling is FlashAttention's (Dao et al. 2022), with its keys and values read through the table.

A prefill sequence b computes its last q_len tokens, at positions seq_len - q_len .. seq_len - 1.
Their own K/V were stored by write_kv just before, so the cached prefix (prefix caching, a swapped-in
or a chunked prompt) and the new tokens sit in the same pool and are read by the same walk: the kernel
never needs to tell them apart. One program takes BLOCK_M consecutive query rows of one sequence
and one query head; it walks the table in tiles of BLOCK_N tokens up to the last position its rows can
see, and masks each score by causality: row i sees position j when j <= pos_i. The softmax is online
(Eq. 4), in fp32.

Under GQA each query head has its own program and reads its KV head's tiles. The grid puts the heads
on its first axis, so the GROUP programs of one KV head are launched side by side and their re-reads
of the same tiles can come from the GPU's L2 cache rather than memory (likely, not measured here).
Packing the group into the rows of one tile, as the decode kernel does, is left as an exercise:
prefill is bound by arithmetic, not by reading K/V.
"""

from __future__ import annotations

import triton
import triton.language as tl

PREFILL_BLOCK_M = 32  # query rows per program
PREFILL_BLOCK_N = 32  # tokens per tile of the walk


@triton.jit
def _prefill_kernel(
    query_ptr,  # [num_q_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache_ptr,  # the same
    out_ptr,  # [num_q_tokens, num_heads, head_dim], written
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    seq_lens_ptr,  # [num_seqs] int32
    # [num_seqs + 1] int32: sequence b owns rows query_start_loc[b] .. [b+1] - 1
    query_start_loc_ptr,
    prefill_seqs_ptr,  # [num_prefills] int32: the sequences with q_len > 1
    stride_qt,  # elements between two query rows
    stride_qh,  # elements between two query heads
    stride_ot,  # elements between two output rows
    stride_oh,  # elements between two output heads
    stride_bt,  # elements between two block-table rows
    num_kv_heads,  # KV heads of the pool
    head_dim,  # elements of one head
    scale,  # softmax scale
    block_size,  # tokens per KV block
    GROUP: tl.constexpr,  # query heads per KV head (GQA/MQA)
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # tokens per tile of the walk
    BLOCK_D: tl.constexpr,  # head_dim rounded up to a power of two, at least 16
    # the operands' type in tl.dot: the cache's (fp32 when interpreting bf16)
    DOT_DTYPE: tl.constexpr,
    # "ieee" for fp32 operands (exact products, not tf32), else unused
    DOT_PRECISION: tl.constexpr,
):
    # one query head (axis 0: a KV group's programs are neighbours) ...
    head = tl.program_id(0)
    tile_m = tl.program_id(1)  # ... one tile of BLOCK_M query rows ...
    # ... of one prefill sequence per program
    seq = tl.load(prefill_seqs_ptr + tl.program_id(2))
    kv_head = head // GROUP  # the KV head this query head reads
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    # the grid is sized for the longest prefill; shorter ones stop here
    if tile_m * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)

    # row indices within the sequence's q_len rows
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < q_len  # rows past q_len belong to no one: not stored
    # their positions: the last q_len tokens of the sequence
    pos_m = seq_len - q_len + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim  # lanes past head_dim: loaded as 0, never stored
    rows = q_start + offs_m  # [BLOCK_M] rows of query and out
    q_ptrs = query_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    # [BLOCK_M, BLOCK_D]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)
    row_stride = num_kv_heads * head_dim  # elements of one token row of the pool

    # Task 4.2 writes the rest of this kernel: the walk and the online softmax of the
    # decode kernel (task 4.1, the same addresses and the same fp32 m_i, l_i, acc),
    # now with BLOCK_M query rows in place of BLOCK_H heads, and the causal mask:
    # row i (position pos_m[i]) sees positions 0 .. pos_m[i], and nothing else gets
    # weight. Read no position that no row of this tile can see: nothing past the
    # last row's position, nothing at or past seq_len (stale, maybe NaN). Every row
    # sees position 0, so none is left without a score. Rows past q_len (mask_m
    # False) are computed like the others and never stored. The result: acc / l_i,
    # in out's dtype (out_ptr.dtype.element_ty), at out[rows[i], head, :] (strides
    # stride_ot, stride_oh), for the real rows (mask_m) and lanes (mask_d) only.
    # BEGIN SOLUTION 4.2
    # this tile's last real row sees positions 0 .. its own, so no later token is ever
    # read
    # one past the last visible position
    last = tl.minimum(seq_len, seq_len - q_len + (tile_m + 1) * BLOCK_M)
    # running max of each row's scores
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp(score - m_i)
    # running sum of exp(score - m_i) * v
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for tile in range(0, last, BLOCK_N):
        offs_n = tile + tl.arange(0, BLOCK_N)  # token positions of this tile
        # positions past the tile's reach (future, stale) are not read
        mask_n = offs_n < last
        # the page-table walk, one entry per token:
        # logical block -> physical block -> slot
        blocks = tl.load(
            block_tables_ptr + seq * stride_bt + offs_n // block_size,
            mask=mask_n,
            other=0,
        )
        slots = blocks.to(tl.int64) * block_size + offs_n % block_size  # [BLOCK_N]
        # [BLOCK_N, BLOCK_D]
        kv_offs = slots[:, None] * row_stride + kv_head * head_dim + offs_d[None, :]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        # [BLOCK_N, BLOCK_D]
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        # [BLOCK_M, BLOCK_N], fp32
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        # row i sees position j when j <= pos_i
        causal = offs_n[None, :] <= pos_m[:, None]
        s = tl.where(causal & mask_n[None, :], s, float("-inf"))
        # finite from the first tile on: every row sees position 0 there
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)  # rescales what was accumulated to the new maximum
        p = tl.exp(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
        # [BLOCK_N, BLOCK_D]
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(
            p.to(DOT_DTYPE), v, input_precision=DOT_PRECISION
        )
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    out = acc / l_i[:, None]  # [BLOCK_M, BLOCK_D]
    o_ptrs = out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(
        o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :]
    )
    # END SOLUTION
