"""Decode attention as Triton kernels: split-KV (flash-decoding) with the query heads of a KV group packed.

OS idea: a page-table walk per access is the MMU's job; here one program walks a slice of one
sequence's block table, and many programs walk different slices at once, like several cores
scanning disjoint ranges of one process's pages. KV counterpart: vLLM paper section 5.1 (the paged
attention kernel), plus two ideas vLLM took up later: flash-decoding's split-KV (Dao et al. 2023)
and packing the query heads of one KV head together (GQA).

A decode step has one query row per sequence. Two problems make the simplest kernel (one program per
row and head) slow on a GPU, and each has its fix here:

1. **Too few programs.** Batch 1 with 8 KV heads is 8 programs on a chip of 132 multiprocessors.
   Split-KV: cut the sequence into `num_splits` chunks of `tokens_per_split` tokens, one program per
   (sequence, KV head, chunk). Each program computes softmax attention over its chunk alone and
   writes the chunk's output, normalized, plus its log-sum-exp (lse = m + log(l)); a second kernel,
   `_merge_splits_kernel`, combines them: out = sum_c exp(lse_c - lse) * out_c with
   lse = log(sum_c exp(lse_c)). This is the online softmax of Eq. 4 taken one step further: chunks
   can be merged in any order, because each carries its own maximum and denominator.
2. **Re-reading K/V per query head, and no matrix units.** Under GQA, the `group` query heads of one
   KV head read the same keys and values. One program takes all of them: its queries are a
   `[BLOCK_H, head_dim]` tile (the group, padded to 16 rows), so the scores are one `tl.dot` with a
   `[BLOCK_N, head_dim]` tile of keys, and each K/V element is loaded once per chunk, not once per
   query head.

When one chunk per sequence is enough (a big batch already fills the chip), the split kernel writes
the output itself and the merge is skipped (`SPLIT=False`).
"""

from __future__ import annotations

import triton
import triton.language as tl

# tokens per tile of the walk: 64 keys of 128 fp16 elements = 16 KiB per tile
DECODE_BLOCK_N = 64
# below this a chunk is too short to pay for its share of the merge
MIN_TOKENS_PER_SPLIT = 256


@triton.jit
def _decode_split_kernel(
    # [num_q_tokens, num_heads, head_dim]; row decode_rows[d] is decode d's query
    query_ptr,
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache_ptr,  # the same
    out_ptr,  # [num_q_tokens, num_heads, head_dim]: written here when SPLIT is False
    # [num_decodes, num_heads, num_splits, head_dim] fp32: each chunk's output (SPLIT)
    partial_out_ptr,
    # [num_decodes, num_heads, num_splits] fp32: each chunk's log-sum-exp (SPLIT)
    partial_lse_ptr,
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    seq_lens_ptr,  # [num_seqs] int32
    decode_seqs_ptr,  # [num_decodes] int32: the sequence of decode d
    decode_rows_ptr,  # [num_decodes] int32: its query row
    stride_qt,  # elements between two query rows
    stride_qh,  # elements between two query heads
    stride_ot,  # elements between two output rows
    stride_oh,  # elements between two output heads
    stride_bt,  # elements between two block-table rows
    num_heads,  # query heads
    num_kv_heads,  # KV heads of the pool
    head_dim,  # elements of one head
    scale,  # softmax scale
    block_size,  # tokens per KV block
    tokens_per_split,  # tokens of one chunk, a multiple of BLOCK_N
    num_splits,  # chunks per sequence
    GROUP: tl.constexpr,  # query heads per KV head (GQA/MQA), packed into one program
    # GROUP rounded up to a power of two, at least 16 (tl.dot's smallest tile)
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,  # tokens per tile of the walk
    BLOCK_D: tl.constexpr,  # head_dim rounded up to a power of two, at least 16
    # write partial results for the merge (True) or the output directly (False)
    SPLIT: tl.constexpr,
    # the operands' type in tl.dot: the cache's (fp32 when interpreting bf16)
    DOT_DTYPE: tl.constexpr,
    # "ieee" for fp32 operands (exact products, not tf32), else unused
    DOT_PRECISION: tl.constexpr,
):
    decode = tl.program_id(0)  # one decode (sequence) ...
    # ... one KV head and the GROUP query heads that read it ...
    kv_head = tl.program_id(1)
    split = tl.program_id(2)  # ... and one chunk of the sequence's tokens
    seq = tl.load(decode_seqs_ptr + decode)
    row = tl.load(decode_rows_ptr + decode)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * tokens_per_split  # this chunk's tokens: start .. end - 1
    # the decode row sees every stored token
    end = tl.minimum(start + tokens_per_split, seq_len)

    # the query heads of this KV group, padded to BLOCK_H
    offs_h = tl.arange(0, BLOCK_H)
    # head h reads KV head h // GROUP, so a group is consecutive
    heads = kv_head * GROUP + offs_h
    mask_h = offs_h < GROUP  # padding rows: loaded as 0, never stored
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim  # lanes past head_dim: loaded as 0, never stored
    q_ptrs = query_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    # [BLOCK_H, BLOCK_D]
    q = tl.load(q_ptrs, mask=mask_h[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)

    row_stride = num_kv_heads * head_dim  # elements of one token row of the pool

    # Task 4.1 writes the rest of this kernel: the walk, the online softmax, the result.
    # - The walk: positions start .. end - 1, in tiles of BLOCK_N positions. Position
    #   p lives in physical block block_tables[seq, p // block_size] (table rows are
    #   stride_bt entries apart), at slot block * block_size + p % block_size (int64:
    #   a pool may hold more than 2**31 elements); kv_head's part of that slot's row
    #   starts slot * row_stride + kv_head * head_dim elements into k_cache (v_cache
    #   alike). Never read a position at or past `end`: its table entry may be the
    #   -1 padding and its K/V stale (NaN). A position not read gets no weight.
    # - The online softmax, in fp32, per query head of the tile: m_i [BLOCK_H] the
    #   running max of the scores (times `scale`), l_i [BLOCK_H] the running sum of
    #   exp(score - m_i), acc [BLOCK_H, BLOCK_D] the running sum of
    #   exp(score - m_i) * v. Both products are tl.dot, with operands .to(DOT_DTYPE)
    #   and input_precision=DOT_PRECISION.
    # - The result, for the real heads (mask_h) and lanes (mask_d) only:
    #   SPLIT: the chunk's softmax output acc / l_i (fp32) at partial_out[decode, h,
    #   split, :] and its log-sum-exp m_i + log(l_i) at partial_lse[decode, h, split]
    #   (both contiguous: flat index (decode * num_heads + h) * num_splits + split).
    #   A chunk that saw no position (start >= seq_len) stores 0 and -inf, which
    #   _merge_splits_kernel below weighs 0.
    #   Not SPLIT: acc / l_i in out's dtype (out_ptr.dtype.element_ty) at
    #   out[row, h, :] (strides stride_ot, stride_oh).
    # BEGIN SOLUTION 4.1
    # running max of each head's scores
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)  # running sum of exp(score - m_i)
    # running sum of exp(score - m_i) * v
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for tile in range(start, end, BLOCK_N):
        offs_n = tile + tl.arange(0, BLOCK_N)  # the token positions of this tile
        # positions past the chunk (or past seq_len: stale or future) are not read
        mask_n = offs_n < end
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
        # [BLOCK_H, BLOCK_N], fp32
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        # unread positions get no weight
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # finite: every tile holds at least one position
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)  # rescales what was accumulated to the new maximum
        p = tl.exp(s - m_new[:, None])  # [BLOCK_H, BLOCK_N]
        # [BLOCK_N, BLOCK_D]
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(
            p.to(DOT_DTYPE), v, input_precision=DOT_PRECISION
        )
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    # [BLOCK_H, BLOCK_D]: what is stored, the real heads' real lanes
    mask_out = mask_h[:, None] & mask_d[None, :]
    if SPLIT:
        # A chunk past seq_len saw no token: l_i = 0,
        # so it writes out 0 and lse = -inf (weight 0).
        empty = l_i == 0.0
        # [BLOCK_H, BLOCK_D] this chunk's softmax output
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        # [BLOCK_H]
        lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
        # [BLOCK_H]: index of (decode, head, split)
        part = (decode * num_heads + heads) * num_splits + split
        tl.store(
            partial_out_ptr + part[:, None] * head_dim + offs_d[None, :],
            out,
            mask=mask_out,
        )
        tl.store(partial_lse_ptr + part, lse, mask=mask_h)
    else:
        # seq_len >= 1, so every real head saw at least one token
        out = acc / l_i[:, None]
        o_ptrs = (
            out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        )
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_out)
    # END SOLUTION


@triton.jit
def _merge_splits_kernel(
    partial_out_ptr,  # [num_decodes, num_heads, num_splits, head_dim] fp32
    partial_lse_ptr,  # [num_decodes, num_heads, num_splits] fp32
    out_ptr,  # [num_q_tokens, num_heads, head_dim], written
    decode_rows_ptr,  # [num_decodes] int32: the output row of decode d
    stride_ot,  # elements between two output rows
    stride_oh,  # elements between two output heads
    num_heads,  # query heads
    head_dim,  # elements of one head
    num_splits,  # chunks per sequence
    BLOCK_SPLITS: tl.constexpr,  # num_splits rounded up to a power of two
    BLOCK_D: tl.constexpr,  # head_dim rounded up to a power of two
):
    decode = tl.program_id(0)  # one decode ...
    head = tl.program_id(1)  # ... and one query head per program
    offs_c = tl.arange(0, BLOCK_SPLITS)
    mask_c = offs_c < num_splits  # lanes past num_splits: lse -inf, weight 0
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim  # lanes past head_dim: loaded as 0, never stored
    part = (decode * num_heads + head) * num_splits + offs_c  # [BLOCK_SPLITS]
    # [BLOCK_SPLITS]
    lse = tl.load(partial_lse_ptr + part, mask=mask_c, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)  # finite: chunk 0 always holds token 0
    # [BLOCK_SPLITS]: each chunk's share of the denominator, rescaled
    weight = tl.exp(lse - lse_max)
    outs = tl.load(
        partial_out_ptr + part[:, None] * head_dim + offs_d[None, :],
        mask=mask_c[:, None] & mask_d[None, :],
        other=0.0,
    )  # [BLOCK_SPLITS, BLOCK_D]
    out = tl.sum(weight[:, None] * outs, axis=0) / tl.sum(weight, axis=0)  # [BLOCK_D]
    row = tl.load(decode_rows_ptr + decode)
    tl.store(
        out_ptr + row * stride_ot + head * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=mask_d,
    )


def num_kv_splits(num_programs: int, max_seq_len: int, num_sms: int) -> int:
    """How many chunks to cut each sequence into, so that the grid fills the chip.

    Without splitting there are `num_programs` = decodes x KV heads programs. When that is fewer
    than two per multiprocessor, each sequence is cut into enough chunks to reach two per
    multiprocessor, but never into chunks shorter than MIN_TOKENS_PER_SPLIT tokens.
    """
    wanted = triton.cdiv(2 * num_sms, max(num_programs, 1))
    useful = triton.cdiv(max_seq_len, MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful))
