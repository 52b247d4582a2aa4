"""Paged attention: reading a sequence's keys and values through its block table.

OS idea: a load from virtual memory goes through the page table to whichever frames hold the pages,
scattered anywhere in physical memory; the process never sees the scatter (OSTEP ch. 18-20). KV
counterpart: vLLM paper section 4.1, "PagedAttention": a sequence's K/V live in blocks spread over the
pool, and the attention kernel walks the block table to find them. Eq. 4 of the paper computes the
attention block by block, A_ij = exp(q_i^T K_j / sqrt(d)) / sum_t exp(q_i^T K_t 1 / sqrt(d)),
o_i = sum_j V_j A_ij^T, where K_j and V_j are the j-th blocks of keys and values and 1 sums a
block's scores.

Three functions compute the same thing here, an oracle chain from plainest to closest to a kernel:

- `dense_attention`: torch's SDPA over contiguous K/V; no paging at all. The oracle.
- `paged_attention`: the reference backend's op. Gather each sequence's blocks into contiguous K/V
  (one page-table walk), then attend. Simple and obviously right; it pays for a copy of the context.
  Its decode rows (q_len 1, most rows of a serving step) go through `decode_attention`, the same
  gather done for the whole batch at once, so a step does not loop over its sequences in Python.
- `paged_attention_blockwise`: visit the blocks one at a time with an online softmax, never building
  the contiguous copy: Eq. 4 with its denominator accumulated as it goes. The Triton kernel does this.

Every query row attends causally: a sequence's q_len rows are its last q_len tokens, at positions
`seq_len - q_len ... seq_len - 1`, so decode (q_len 1), prefill (q_len = seq_len), chunked prefill and
prefill after a prefix-cache hit are one and the same call. Softmax and accumulation run in float32
whatever the cache dtype. Nothing at or past seq_len is ever read: a reused block's stale rows
(even NaN) cannot leak into the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from minipaged.reference.validation import check_paged_attention


def gather_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk one sequence's block table and copy its keys and values into contiguous tensors.

    Args:
        k_cache: `[num_blocks, block_size, num_kv_heads, head_dim]`.
        v_cache: the same shape.
        block_table: `[max_blocks]` int32, the sequence's row of block_tables (padding -1 after its blocks).
        seq_len: tokens the sequence holds; only its first ceil(seq_len / block_size) blocks are read.

    Returns:
        keys, values: `[seq_len, num_kv_heads, head_dim]` each, token `pos` in row `pos`.
    """
    # BEGIN SOLUTION 2.2
    block_size = k_cache.shape[1]
    num_blocks = -(-seq_len // block_size)  # ceil: the last block may be partly filled
    # [num_blocks_of_seq]: the page-table walk
    block_ids = block_table[:num_blocks].long()
    # [seq_len, num_kv_heads, head_dim]: no stale tail
    keys = k_cache[block_ids].flatten(0, 1)[:seq_len]
    # [seq_len, num_kv_heads, head_dim]
    values = v_cache[block_ids].flatten(0, 1)[:seq_len]
    return keys, values
    # END SOLUTION


def attend(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of a sequence's last q_len tokens over its seq_len contiguous keys and values.

    Query row i sits at position `seq_len - q_len + i` and sees keys at positions <= its own. Under
    GQA/MQA each KV head serves `num_heads // num_kv_heads` consecutive query heads.

    Args:
        query: `[q_len, num_heads, head_dim]`.
        keys: `[seq_len, num_kv_heads, head_dim]`.
        values: `[seq_len, num_kv_heads, head_dim]`.
        scale: multiplies the scores (usually 1 / sqrt(head_dim); the model says which).

    Returns:
        `[q_len, num_heads, head_dim]` in float32.
    """
    # BEGIN SOLUTION 2.2
    q_len, num_heads, _ = query.shape
    seq_len, num_kv_heads, _ = keys.shape
    # query heads per KV head (1: MHA, num_heads: MQA)
    group = num_heads // num_kv_heads
    # [seq_len, num_heads, head_dim]
    keys = keys.float().repeat_interleave(group, dim=1)
    # [seq_len, num_heads, head_dim]
    values = values.float().repeat_interleave(group, dim=1)
    # [num_heads, q_len, seq_len]
    scores = torch.einsum("qhd,khd->hqk", query.float(), keys) * scale
    # [q_len]: the query rows' positions
    q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)  # q_len rows
    k_pos = torch.arange(seq_len, device=query.device)  # [seq_len]
    # causal
    scores = scores.masked_fill(
        k_pos[None, None, :] > q_pos[None, :, None], float("-inf")
    )
    probs = scores.softmax(dim=-1)  # [num_heads, q_len, seq_len], float32
    return torch.einsum("hqk,khd->qhd", probs, values)  # [q_len, num_heads, head_dim]
    # END SOLUTION


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
    """Attention for a batch of sequences whose K/V live in paged pools (the reference backend's op).

    Sequence b owns query rows `query_start_loc[b]:query_start_loc[b + 1]`: its last q_len tokens.
    For each sequence: gather its blocks into contiguous K/V (`gather_kv`), then attend causally
    (`attend`). The batch is "varlen": sequences of any lengths are packed one after another, with
    no padding tokens.

    Args:
        query: `[num_q_tokens, num_heads, head_dim]`, the same dtype as the caches.
        k_cache: `[num_blocks, block_size, num_kv_heads, head_dim]`; fp32, fp16 or bf16.
        v_cache: the same shape and dtype.
        block_tables: `[num_seqs, max_blocks]` int32, padded with -1.
        seq_lens: `[num_seqs]` int32, tokens in each sequence including this step's.
        query_start_loc: `[num_seqs + 1]` int32, the cumulative sum of the q_lens, starting at 0.
        scale: the softmax scale.
        out: optional `[num_q_tokens, num_heads, head_dim]` buffer to write into (and return).

    Returns:
        `[num_q_tokens, num_heads, head_dim]` in the query's dtype.

    Raises:
        ValueError: if an argument has the wrong shape, dtype or device, or its values break the
            contract (block ids outside the pool, seq_lens past the table, q_len > seq_len, ...).
    """
    check_paged_attention(
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out
    )
    # [num_q_tokens, num_heads, head_dim]
    out = torch.empty_like(query) if out is None else out
    starts = query_start_loc.tolist()
    decodes = [b for b in range(len(starts) - 1) if starts[b + 1] - starts[b] == 1]
    # the fast path: every decode row of the batch in one go, no Python loop
    if len(decodes) > 1:
        index = torch.tensor(decodes, device=query.device)  # [num_decodes]
        rows = query_start_loc[index].long()  # each decode's one query row
        tables, lens = block_tables[index], seq_lens[index]
        out[rows] = decode_attention(
            query[rows], k_cache, v_cache, tables, lens, scale
        ).to(out.dtype)
    for b, seq_len in enumerate(seq_lens.tolist()):
        start, end = starts[b], starts[b + 1]  # this sequence's query rows
        if start == end:
            continue  # no query rows this step
        if len(decodes) > 1 and end - start == 1:
            continue  # a decode, done above
        # [seq_len, kv_heads, dim]
        keys, values = gather_kv(k_cache, v_cache, block_tables[b], seq_len)
        out[start:end] = attend(query[start:end], keys, values, scale).to(out.dtype)
    return out


def decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query row per sequence (decode), the whole batch at once: one gather, one masked softmax.

    The gather of `gather_kv`, done for every sequence together: each table is read up to the
    longest sequence's blocks, so shorter ones read past their end (padding -1 reads block 0). Those
    positions are masked out of the softmax and zeroed in V, so whatever they hold, NaN included,
    cannot reach the result. GQA without copies: for each KV head, its group of query heads is
    one small matrix, multiplied with that head's keys and values as strided views (`torch.bmm`;
    an einsum over all heads at once copied the keys into another layout first, twice as slow).

    Args:
        query: `[num_seqs, num_heads, head_dim]`, sequence b's newest token.
        k_cache: `[num_blocks, block_size, num_kv_heads, head_dim]`.
        v_cache: the same shape.
        block_tables: `[num_seqs, max_blocks]` int32.
        seq_lens: `[num_seqs]` int32, each >= 1.
        scale: the softmax scale.

    Returns:
        `[num_seqs, num_heads, head_dim]` in float32.
    """
    # BEGIN SOLUTION 2.2
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_len = int(seq_lens.max())
    # [num_seqs, blocks_read]
    blocks = block_tables[:, : -(-max_len // block_size)].long().clamp(min=0)
    # [num_seqs, max_len]
    valid = torch.arange(max_len, device=query.device)[None, :] < seq_lens[:, None]
    # [num_seqs, max_len, num_kv_heads, head_dim]
    keys = k_cache[blocks].flatten(1, 2)[:, :max_len].float()
    values = v_cache[blocks].flatten(1, 2)[:, :max_len].float()
    # a stale NaN times probability 0 is NaN (in place: `values` is the gather's copy, not the cache)
    values = values.masked_fill_(~valid[:, :, None, None], 0.0)
    # [b, kv, group, d]
    q = query.float().view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = []
    for kv in range(num_kv_heads):  # its group of query heads reads its keys and values
        # [num_seqs, group, max_len]: a batched matrix product of strided views
        scores = torch.bmm(q[:, kv], keys[:, :, kv].transpose(1, 2)) * scale
        # past seq_len: not this sequence's
        scores = scores.masked_fill_(~valid[:, None, :], float("-inf"))
        probs = scores.softmax(dim=-1)
        # [num_seqs, group, head_dim]
        out.append(torch.bmm(probs, values[:, :, kv]))
    # [num_seqs, num_kv_heads, group, head_dim]
    return torch.stack(out, dim=1).reshape(num_seqs, num_heads, head_dim)
    # END SOLUTION


def paged_attention_blockwise(
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
    """The same result as `paged_attention`, one block at a time, with no contiguous copy of K/V.

    This is the paper's Eq. 4 computed the way a kernel computes it: the softmax denominator is not
    known until the last block, so keep a running maximum `m` of the scores, a running sum `denom` of
    `exp(score - m)` and a running output `acc`; when a block raises the maximum, rescale what was
    accumulated by `exp(m_old - m_new)` (the "online softmax" of FlashAttention). At the end,
    `acc / denom` is exactly softmax(scores) @ V. Arguments, result and errors as `paged_attention`.
    """
    check_paged_attention(
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out
    )
    out = torch.empty_like(query) if out is None else out
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        start, end = starts[b], starts[b + 1]
        if start < end:
            acc = _attend_blockwise(
                query[start:end], k_cache, v_cache, block_tables[b], seq_len, scale
            )
            out[start:end] = acc.to(out.dtype)
    return out


def _attend_blockwise(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    scale: float,
) -> torch.Tensor:
    """One sequence's causal attention, visiting its blocks in order; `[q_len, num_heads, head_dim]` fp32."""
    # BEGIN SOLUTION 2.3
    q_len, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    q = query.float().transpose(0, 1)  # [num_heads, q_len, head_dim]
    q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)  # [q_len]
    # running max of the scores
    m = torch.full((num_heads, q_len), float("-inf"), device=query.device)
    # running sum of exp(score - m) (FA's "l")
    denom = torch.zeros(num_heads, q_len, device=query.device)
    # running sum of exp(score - m) * v
    acc = torch.zeros(num_heads, q_len, head_dim, device=query.device)
    for j in range(-(-seq_len // block_size)):  # logical block j of the sequence
        block = int(block_table[j])  # its physical block: one page-table lookup
        # [n]
        k_pos = torch.arange(
            j * block_size, min((j + 1) * block_size, seq_len), device=query.device
        )
        # rows of this block that hold tokens (fewer in a partly filled last block)
        n = k_pos.numel()
        k = (
            k_cache[block, :n].float().repeat_interleave(group, dim=1).transpose(0, 1)
        )  # [num_heads, n, head_dim]
        v = (
            v_cache[block, :n].float().repeat_interleave(group, dim=1).transpose(0, 1)
        )  # [num_heads, n, head_dim]
        s = (q @ k.transpose(1, 2)) * scale  # [num_heads, q_len, n]
        # causal
        s = s.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        # Block 0 holds position 0, which every query row sees, so m is finite from the
        # first block on.
        m_new = torch.maximum(m, s.amax(dim=-1))  # [num_heads, q_len]
        # rescales the old sums to the new maximum (0 on the first block)
        alpha = torch.exp(m - m_new)
        p = torch.exp(s - m_new[..., None])  # [num_heads, q_len, n]
        denom = denom * alpha + p.sum(dim=-1)
        acc = acc * alpha[..., None] + p @ v  # [num_heads, q_len, head_dim]
        m = m_new
    return (acc / denom[..., None]).transpose(0, 1)  # [q_len, num_heads, head_dim]
    # END SOLUTION


def dense_attention(
    query: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The oracle: torch's scaled_dot_product_attention over each sequence's contiguous K/V.

    No block table, no pool: what attention would be without paging. Tests lay the same K/V out both
    ways and hold every paged implementation to this.

    Args:
        query: `[num_q_tokens, num_heads, head_dim]`.
        keys: one `[seq_len_b, num_kv_heads, head_dim]` tensor per sequence.
        values: likewise.
        query_start_loc: `[num_seqs + 1]` int32, as in `paged_attention`.
        scale: the softmax scale.

    Returns:
        `[num_q_tokens, num_heads, head_dim]` in the query's dtype, computed in float32.

    Raises:
        ValueError: if keys, values and query_start_loc disagree on the number of sequences.
    """
    if not len(keys) == len(values) == query_start_loc.numel() - 1:
        raise ValueError(
            f"keys and values must hold one tensor per sequence ({query_start_loc.numel() - 1} from "
            f"query_start_loc), got {len(keys)} and {len(values)}"
        )
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for b, (k, v) in enumerate(zip(keys, values, strict=True)):
        start, end = starts[b], starts[b + 1]
        if start == end:
            continue
        q_len, seq_len = end - start, k.shape[0]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)  # [q_len]
        # [q_len, seq_len]
        visible = torch.arange(seq_len, device=query.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(
            query[start:end].float().transpose(0, 1),  # [num_heads, q_len, head_dim]
            k.float().transpose(0, 1),  # [num_kv_heads, seq_len, head_dim]
            v.float().transpose(0, 1),
            attn_mask=visible,
            scale=scale,
            enable_gqa=True,
        )  # [num_heads, q_len, head_dim]
        out[start:end] = o.transpose(0, 1).to(query.dtype)
    return out
