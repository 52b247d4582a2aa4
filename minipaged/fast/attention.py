"""Paged attention in Triton: one public op, two kernels behind it (mirrors reference/attention.py).

OS idea: the MMU walks the page table on every access; these kernels walk the block table themselves,
a tile of tokens at a time (OSTEP ch. 18-19). KV counterpart: vLLM paper section 5.1, the paged
attention kernel, with its two cases made explicit:

- **decode** rows (q_len = 1) go to fast/decode.py: split-KV (flash-decoding) with the query heads of
  a KV group packed into one tl.dot, so small batches with long contexts still fill the GPU;
- **prefill** rows (q_len > 1: a prompt, a chunk of one, or the new tokens after a cached prefix) go
  to fast/prefill.py: tiles of query rows against the table, with the causal mask.

Sequences with q_len = 0 own no rows and launch nothing. A mixed batch launches both kernels on
disjoint rows of the same output. The split between the two is worked out once from the step's
metadata (`plan_attention`); an engine can reuse the plan for every layer of a step, since all
layers share seq_lens and query_start_loc.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from minipaged.fast.cache_ops import check_runnable, interpreting, launch_device
from minipaged.fast.decode import (
    DECODE_BLOCK_N,
    _decode_split_kernel,
    _merge_splits_kernel,
    num_kv_splits,
)
from minipaged.fast.prefill import PREFILL_BLOCK_M, PREFILL_BLOCK_N, _prefill_kernel
from minipaged.reference.validation import check_paged_attention


@dataclass(frozen=True)
class AttentionPlan:
    """Which sequences take which kernel, and how decode is split; built once per step."""

    decode_seqs: torch.Tensor  # [num_decodes] int32: sequences with q_len == 1
    decode_rows: torch.Tensor  # [num_decodes] int32: their query rows
    prefill_seqs: torch.Tensor  # [num_prefills] int32: sequences with q_len > 1
    max_prefill_q_len: int  # sizes the prefill grid
    num_splits: int  # chunks per decode sequence (1: no split, no merge)
    tokens_per_split: int  # tokens per chunk, a multiple of DECODE_BLOCK_N


def plan_attention(
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    num_kv_heads: int,
    num_splits: int | None = None,
) -> AttentionPlan:
    """Split a step's sequences between the decode and the prefill kernel.

    Args:
        seq_lens: `[num_seqs]` int32, as paged_attention takes it.
        query_start_loc: `[num_seqs + 1]` int32, as paged_attention takes it.
        num_kv_heads: KV heads of the pool (the decode grid has one program per KV head).
        num_splits: chunks per decode sequence; None picks them to fill the device (num_kv_splits).
            Tests pass it to exercise the merge on short sequences. Chunks are whole tiles, so the
            plan may use fewer chunks than asked: never one that lies wholly past the longest decode.
    """
    device = seq_lens.device
    # [num_seqs], one small copy to the host
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).cpu()
    decode_seqs = torch.nonzero(q_lens == 1).flatten()  # [num_decodes]
    prefill_seqs = torch.nonzero(q_lens > 1).flatten()  # [num_prefills]
    max_decode_len = int(seq_lens.cpu()[decode_seqs].max()) if len(decode_seqs) else 1
    if num_splits is None:
        num_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else 1
        )
        num_splits = num_kv_splits(
            len(decode_seqs) * num_kv_heads, max_decode_len, num_sms
        )
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    tokens_per_split = (
        triton.cdiv(triton.cdiv(max_decode_len, num_splits), DECODE_BLOCK_N)
        * DECODE_BLOCK_N
    )
    # rounding up may leave fewer chunks to do
    num_splits = triton.cdiv(max_decode_len, tokens_per_split)
    return AttentionPlan(
        decode_seqs=decode_seqs.to(device=device, dtype=torch.int32),
        decode_rows=query_start_loc[:-1]
        .cpu()[decode_seqs]
        .to(device=device, dtype=torch.int32),
        prefill_seqs=prefill_seqs.to(device=device, dtype=torch.int32),
        max_prefill_q_len=int(q_lens[prefill_seqs].max()) if len(prefill_seqs) else 0,
        num_splits=num_splits,
        tokens_per_split=tokens_per_split,
    )


_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


def _dot_types(dtype: torch.dtype) -> tuple[tl.dtype, str]:
    """The operand type and precision of the kernels' tl.dot for a cache of `dtype`.

    Compiled, tl.dot takes the cache's own type: fp16/bf16 run on the tensor cores with
    fp32 accumulation, fp32 asks for "ieee" (true fp32 products; Triton's default for
    fp32 is tf32, whose 10-bit mantissa would miss the contract's 1e-5). Triton's
    interpreter multiplies bf16 wrongly (triton 3.9: bf16 operands come out as garbage),
    so there bf16 operands go up to fp32 first.
    """
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32, "ieee"
    return _TL_DTYPES[dtype], "ieee" if dtype == torch.float32 else "tf32"


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

    Checks the inputs as the reference does, plans the step (plan_attention), and runs the kernels
    (run_planned).

    Raises:
        ValueError: as the reference, with the same messages; for a non-contiguous pool; and for CPU
            tensors when Triton's interpreter is off.
    """
    check_paged_attention(
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out
    )
    check_runnable(k_cache, "k_cache")
    check_runnable(v_cache, "v_cache")
    plan = plan_attention(seq_lens, query_start_loc, k_cache.shape[2])
    return run_planned(
        plan,
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        out=out,
    )


def run_planned(
    plan: AttentionPlan,
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
    """Launch a plan's kernels; no checks (paged_attention checks, then calls this).

    For callers that check once and attend many times with the same metadata: an
    engine's layers, or a benchmark timing the kernels alone. The kernels take any
    strides for query and out along their first two dimensions; anything else they read
    as flat arrays, so it is made contiguous here.
    """
    given = out
    # a fresh row-major buffer (empty_like would keep odd strides)
    if out is None or out.stride(2) != 1:
        # [num_q_tokens, heads, dim]
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if query.stride(2) != 1:
        query = query.contiguous()
    # the kernels index these as flat arrays (a table row's entries one apart): strided
    # views are copied
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()
    query_start_loc = query_start_loc.contiguous()
    with launch_device(query.device):
        _launch(
            plan,
            query,
            k_cache,
            v_cache,
            out,
            block_tables,
            seq_lens,
            query_start_loc,
            scale,
        )
    # a caller's buffer the kernel could not write directly
    if given is not None and given is not out:
        given.copy_(out)
        return given
    return out


def _launch(
    plan: AttentionPlan,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> None:
    """The decode kernel (and its merge when split), then the prefill kernel, on disjoint rows of out."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot wants every side >= 16
    dot_dtype, precision = _dot_types(query.dtype)
    num_decodes = plan.decode_seqs.numel()
    if num_decodes:
        split = plan.num_splits > 1
        partial_out = partial_lse = out  # unused when not split
        if split:
            partial_out = torch.empty(
                (num_decodes, num_heads, plan.num_splits, head_dim),
                dtype=torch.float32,
                device=query.device,
            )  # [num_decodes, num_heads, num_splits, head_dim]
            partial_lse = torch.empty(
                (num_decodes, num_heads, plan.num_splits),
                dtype=torch.float32,
                device=query.device,
            )  # [num_decodes, num_heads, num_splits]
        _decode_split_kernel[(num_decodes, num_kv_heads, plan.num_splits)](
            query,
            k_cache,
            v_cache,
            out,
            partial_out,
            partial_lse,
            block_tables,
            seq_lens,
            plan.decode_seqs,
            plan.decode_rows,
            query.stride(0),
            query.stride(1),
            out.stride(0),
            out.stride(1),
            block_tables.stride(0),
            num_heads,
            num_kv_heads,
            head_dim,
            float(scale),
            block_size,
            plan.tokens_per_split,
            plan.num_splits,
            GROUP=group,
            BLOCK_H=max(16, triton.next_power_of_2(group)),
            BLOCK_N=DECODE_BLOCK_N,
            BLOCK_D=block_d,
            SPLIT=split,
            DOT_DTYPE=dot_dtype,
            DOT_PRECISION=precision,
        )
        if split:
            _merge_splits_kernel[(num_decodes, num_heads)](
                partial_out,
                partial_lse,
                out,
                plan.decode_rows,
                out.stride(0),
                out.stride(1),
                num_heads,
                head_dim,
                plan.num_splits,
                BLOCK_SPLITS=triton.next_power_of_2(plan.num_splits),
                BLOCK_D=triton.next_power_of_2(head_dim),
            )
    if plan.prefill_seqs.numel():
        # heads on axis 0:
        # the GROUP programs that read one KV head's tiles run side by side
        grid = (
            num_heads,
            triton.cdiv(plan.max_prefill_q_len, PREFILL_BLOCK_M),
            plan.prefill_seqs.numel(),
        )
        _prefill_kernel[grid](
            query,
            k_cache,
            v_cache,
            out,
            block_tables,
            seq_lens,
            query_start_loc,
            plan.prefill_seqs,
            query.stride(0),
            query.stride(1),
            out.stride(0),
            out.stride(1),
            block_tables.stride(0),
            num_kv_heads,
            head_dim,
            float(scale),
            block_size,
            GROUP=group,
            BLOCK_M=PREFILL_BLOCK_M,
            BLOCK_N=PREFILL_BLOCK_N,
            BLOCK_D=block_d,
            DOT_DTYPE=dot_dtype,
            DOT_PRECISION=precision,
        )
