"""Decode attention on a GPU: the Triton paged kernel against the no-paging ideal, in GB/s of K/V read.

OS idea: a load through the page table should cost no more than a load from physical memory; the TLB
and the page walker exist so that paging is free in the common case (OSTEP ch. 19). KV counterpart:
vLLM paper section 5.1 and Fig. 18a: the paged attention kernel reads K/V through the block table,
and the paper measures what that costs against a kernel on contiguous K/V. A decode step reads every
cached key and value once and does little arithmetic, so its floor is memory bandwidth: this script
counts the bytes that must move (K/V read, query read, output written), divides by the median time,
and compares with the device's measured copy bandwidth (one large device-to-device copy, bytes read
plus bytes written).

Methods, side by side at each point (batch x context, 32 query heads, 8 KV heads, head_dim 128,
block size 16, fp16 and bf16):

- triton: minipaged.fast's paged_attention, the public op (input checks, plan, kernels);
- triton-kernel: plan_attention once, then run_planned alone: what an engine pays per layer when a
  step's metadata is built once for all layers;
- reference: minipaged.reference's paged_attention (gather, then attend in fp32); skipped ("-") where
  its fp32 copies of the context would pass --reference-budget-gib;
- sdpa: torch's scaled_dot_product_attention on contiguous K/V `[batch, kv_heads, context, head_dim]`
  with enable_gqa: the no-paging ideal;
- flex-paged: torch's flex_attention on the physical pool, with a BlockMask built straight from the
  block table (KV block = page = 16 tokens), compiled on CUDA; guarded: where it is missing or fails,
  the reason goes into the JSON and the run goes on. It runs last within each point, checked and
  timed after every other method, because a device-side fault (an illegal address, a failed device
  assert) leaves the CUDA context unusable for the rest of the process: after a flex failure the
  script checks that the device still works, and if it does not, it keeps the rows measured so far,
  marks the remaining points "not run" with the reason, and prints the report (rerun those points
  with `--methods` leaving flex-paged out).

Each point's pools hold shuffled physical blocks (a pool after churn, with spare blocks nobody owns)
and fresh random data. Before a method is timed, its output on the first input set is held to an fp32
SDPA oracle (relative error ||out - ref|| / ||ref||): first every method but flex-paged, then those are
timed, then flex-paged is checked and timed. A Triton, reference or SDPA output that misses is a
DisagreementError and the script reports nothing (flex-paged's miss is recorded). Times are medians of
triton.testing.do_bench (which flushes the L2 cache before every call), rotating among several input
sets (distinct pools and queries, at least 256 MiB together where memory allows; dense K/V only where
sdpa is timed, and in the first set, which the oracle reads) so that repeated
calls do not find the data in the cache. A second table times prefill after a cached prefix (512 new
tokens after 1024 or 4096 cached ones) in TFLOP/s, counting only visible (query, key) pairs.

The goal, recorded and not asserted (it is printed with a pass/miss mark per point): triton-kernel at
>= 80% of copy bandwidth for contexts >= 4096, and <= 1.2x sdpa's time. A point where sdpa has no
time (not asked for, or failed) is "n/a" for the goal, not a miss, and is not counted.

Run from the repository root (minipaged must be importable: `pip install -e .` or PYTHONPATH=.):

    python benchmarks/decode_attention.py --json out.json   # the full sweep (never yet run on a GPU)
    python benchmarks/decode_attention.py --dtypes fp16 --batches 8 --contexts 4096 --skip-prefill
    python benchmarks/decode_attention.py --quick           # tiny shapes, CPU and Triton's interpreter
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import bench_common
import torch
import torch.nn.functional as F
from bench_common import DisagreementError, machine, positive, utc_now
from tqdm import tqdm

# minipaged's first import switches Triton to its interpreter where there is no CUDA, before triton loads
# (nothing above imports triton; triton itself is imported inside the functions that need it)
from minipaged.fast import attention as fast_attention
from minipaged.reference import attention as reference_attention

BENCHMARK = "decode_attention"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
METHODS = ("triton", "triton-kernel", "reference", "sdpa", "flex-paged")
# flex-paged is timed for decode only
PREFILL_METHODS = ("triton", "triton-kernel", "reference", "sdpa")
GOAL_METHOD, GOAL_FRACTION, GOAL_CONTEXT, GOAL_X_SDPA = "triton-kernel", 0.8, 4096, 1.2
GOAL = (
    "goal, recorded not asserted: >= 80% of copy bandwidth at ctx >= 4096, <= 1.2x sdpa"
)
# relative error vs fp32
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# rotation sets together exceed this (L2 is 50 MiB on H100/H200) ...
ROTATE_BYTES = 256 << 20
MIN_SETS, MAX_SETS = 4, 256  # ... with at least MIN_SETS of them, at most MAX_SETS
ORACLE_CHUNK_BYTES = 2 << 30  # fp32 temporaries of the oracle, per chunk of sequences
GiB = 1 << 30


@dataclass
class Point:
    """One measured configuration: `batch` sequences of `seq_len` tokens, the last `q_len` of them new."""

    # "decode" (q_len 1) or "prefill" (q_len new tokens after a cached prefix)
    kind: str
    dtype: str
    batch: int
    # tokens each sequence holds after the step: decode's context, or prefix + new
    seq_len: int
    q_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int

    @property
    def blocks_per_seq(self) -> int:
        return -(-self.seq_len // self.block_size)

    @property
    def num_blocks(self) -> int:
        """The pool: every sequence's blocks plus 1/16 spare ones that no table names (stale data)."""
        used = self.batch * self.blocks_per_seq
        return used + max(1, used // 16)

    @property
    def kv_elems(self) -> int:
        """Elements of K (or of V) that the step must read: batch x seq_len x kv_heads x head_dim."""
        return self.batch * self.seq_len * self.num_kv_heads * self.head_dim

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def bytes_moved(self) -> int:
        """The fewest bytes a decode step moves: K and V read once, the query read, the output written."""
        q_elems = self.batch * self.q_len * self.num_heads * self.head_dim
        return (2 * self.kv_elems + 2 * q_elems) * self.itemsize

    @property
    def flops(self) -> int:
        """Prefill FLOPs over the visible (query, key) pairs only: row i of q_len sees seq_len - q_len + i + 1
        keys; each pair costs a multiply-add in Q K^T and one in P V, 4 x head_dim FLOPs per head."""
        pairs = (
            self.q_len * (self.seq_len - self.q_len)
            + self.q_len * (self.q_len + 1) // 2
        )
        return 4 * self.batch * self.num_heads * self.head_dim * pairs

    def set_bytes(self, with_dense: bool) -> int:
        """Device bytes of one input set: pools (with spares), dense K/V for SDPA, query and output."""
        pool = 2 * self.num_blocks * self.block_size * self.num_kv_heads * self.head_dim
        dense = 2 * self.kv_elems if with_dense else 0
        # query, its dense copy, output
        rows = 3 * self.batch * self.q_len * self.num_heads * self.head_dim
        return (pool + dense + rows) * self.itemsize

    def reference_bytes(self) -> int:
        """The reference's temporaries: K/V gathered, copied to fp32, and V once more masked (decode);
        per sequence, fp32 K/V repeated over the query heads and three score matrices (prefill)."""
        if self.kind == "decode":
            return 2 * self.kv_elems * self.itemsize + 3 * self.kv_elems * 4
        group_kv = 2 * self.seq_len * self.num_heads * self.head_dim * 4
        return group_kv + 3 * self.num_heads * self.q_len * self.seq_len * 4

    def label(self) -> str:
        if self.kind == "decode":
            return f"decode {self.dtype} batch={self.batch} ctx={self.seq_len}"
        prefix = self.seq_len - self.q_len
        return (
            f"prefill {self.dtype} batch={self.batch} prefix={prefix} new={self.q_len}"
        )


@dataclass
class Shared:
    """What every input set of a point shares: the step's metadata (one shuffled table) and its plan."""

    # [batch, blocks_per_seq] int32, a random permutation of pool blocks
    block_tables: torch.Tensor
    seq_lens: torch.Tensor  # [batch] int32
    query_start_loc: torch.Tensor  # [batch + 1] int32
    scale: float
    plan: fast_attention.AttentionPlan

    def paged_args(self, s: Inputs) -> tuple:
        """paged_attention's positional arguments for input set `s`, in the contract's order."""
        return (
            s.query,
            s.k_cache,
            s.v_cache,
            self.block_tables,
            self.seq_lens,
            self.query_start_loc,
            self.scale,
        )


@dataclass
class Inputs:
    """One rotation set: its own pools and query (same table), their dense copies, an output buffer."""

    query: torch.Tensor  # [batch * q_len, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    # [batch * q_len, num_heads, head_dim], the Triton methods write here
    out: torch.Tensor
    q_dense: torch.Tensor  # [batch, num_heads, q_len, head_dim]
    # [batch, num_kv_heads, seq_len, head_dim], for SDPA and the oracle
    k_dense: torch.Tensor | None
    v_dense: torch.Tensor | None


class Unavailable(Exception):
    """A method that cannot run at this point; its message is the reason recorded in the report."""


def make_shared(point: Point, gen: torch.Generator, device: torch.device) -> Shared:
    # shuffled: a pool after churn
    perm = torch.randperm(point.num_blocks, generator=gen, device=device)
    tables = perm[: point.batch * point.blocks_per_seq].view(
        point.batch, point.blocks_per_seq
    )
    seq_lens = torch.full(
        (point.batch,), point.seq_len, dtype=torch.int32, device=device
    )
    starts = torch.arange(
        0,
        (point.batch + 1) * point.q_len,
        point.q_len,
        dtype=torch.int32,
        device=device,
    )
    plan = fast_attention.plan_attention(seq_lens, starts, point.num_kv_heads)
    return Shared(tables.to(torch.int32), seq_lens, starts, point.head_dim**-0.5, plan)


def make_inputs(
    point: Point,
    shared: Shared,
    gen: torch.Generator,
    device: torch.device,
    dense: bool,
) -> Inputs:
    """Fresh random pools (stale slots too: never zeros), a query, the dense K/V read through the table."""
    dtype = DTYPES[point.dtype]
    pool_shape = (
        point.num_blocks,
        point.block_size,
        point.num_kv_heads,
        point.head_dim,
    )
    k_cache = torch.randn(pool_shape, generator=gen, device=device, dtype=dtype)
    v_cache = torch.randn(pool_shape, generator=gen, device=device, dtype=dtype)
    rows = point.batch * point.q_len
    query = torch.randn(
        rows, point.num_heads, point.head_dim, generator=gen, device=device, dtype=dtype
    )
    out = torch.empty_like(query)  # [batch * q_len, num_heads, head_dim]
    q_dense = query.view(
        point.batch, point.q_len, point.num_heads, point.head_dim
    ).transpose(1, 2)
    q_dense = q_dense.contiguous()  # [batch, num_heads, q_len, head_dim]

    def read_through_table(cache: torch.Tensor) -> torch.Tensor:
        # [batch, blocks_per_seq * block_size, ...]
        seqs = cache[shared.block_tables.long()].flatten(1, 2)
        # [batch, seq_len, num_kv_heads, head_dim]: no stale tail
        seqs = seqs[:, : point.seq_len]
        # [batch, num_kv_heads, seq_len, head_dim]
        return seqs.transpose(1, 2).contiguous()

    k_dense = read_through_table(k_cache) if dense else None
    v_dense = read_through_table(v_cache) if dense else None
    return Inputs(query, k_cache, v_cache, out, q_dense, k_dense, v_dense)


def as_rows(out: torch.Tensor) -> torch.Tensor:
    """An output as `[batch * q_len, num_heads, head_dim]` rows (SDPA's and flex's come `[b, h, q, d]`)."""
    return out.transpose(1, 2).flatten(0, 1) if out.dim() == 4 else out


# ---- the methods: each factory returns a call on one input set, or raises Unavailable -----------------


def triton_op(
    point: Point, shared: Shared, first: Inputs, args: argparse.Namespace
) -> Callable:
    """The public op: checks, plan, kernels; into the set's output buffer, as a model layer would."""
    return lambda s: fast_attention.paged_attention(*shared.paged_args(s), out=s.out)


def triton_kernel(
    point: Point, shared: Shared, first: Inputs, args: argparse.Namespace
) -> Callable:
    """The kernels alone, on the plan built once for the point (an engine builds one per step)."""
    return lambda s: fast_attention.run_planned(
        shared.plan, *shared.paged_args(s), out=s.out
    )


def reference(
    point: Point, shared: Shared, first: Inputs, args: argparse.Namespace
) -> Callable:
    """The reference backend's op, where its temporaries fit the budget."""
    need = point.reference_bytes()
    if need > args.reference_budget_gib * GiB:
        raise Unavailable(
            f"skipped: its temporaries need about {need / GiB:.1f} GiB "
            f"(> --reference-budget-gib {args.reference_budget_gib:g})"
        )

    return lambda s: reference_attention.paged_attention(*shared.paged_args(s))


def sdpa(
    point: Point, shared: Shared, first: Inputs, args: argparse.Namespace
) -> Callable:
    """The no-paging ideal. Prefill's rows see keys up to their own positions: a causal mask aligned to
    the bottom right (torch's causal_lower_right, which flash attention runs natively), or, where that
    is missing or disagrees with the explicit mask, the explicit boolean mask (slower: no flash)."""
    mask, note = None, None
    if point.q_len > 1:
        # [q_len, seq_len]
        mask, note = causal_mask(point, first.query.device), "mask: boolean"
        q, k, v = first.q_dense, first.k_dense, first.v_dense
        explicit = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=shared.scale, enable_gqa=True
        )
        try:
            from torch.nn.attention.bias import causal_lower_right

            bias = causal_lower_right(point.q_len, point.seq_len)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, scale=shared.scale, enable_gqa=True
            )
            if relative_error(out, explicit.float()) <= TOLERANCE[out.dtype]:
                mask, note = bias, "mask: causal_lower_right"
        # an older torch, or a backend that refuses it: keep the explicit mask
        except Exception:
            pass

    def call(s: Inputs) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            s.q_dense,
            s.k_dense,
            s.v_dense,
            attn_mask=mask,
            scale=shared.scale,
            enable_gqa=True,
        )  # [batch, num_heads, q_len, head_dim]

    call.note = note
    return call


def flex_paged(
    point: Point, shared: Shared, first: Inputs, args: argparse.Namespace
) -> Callable:
    """flex_attention reading the physical pool through a BlockMask built from the block table.

    The pool is one long sequence `[1, kv_heads, num_blocks * block_size, head_dim]` that every batch
    row shares (flex broadcasts K/V over the batch when the mask has the query's batch). Row b's KV
    blocks are its table row: `full_kv_indices` lists the pages it fills, `kv_indices` the partly
    filled last page, whose tail mask_mod hides. The index tensors are as wide as the pool (as flex
    builds its transposed view from them). Eager flex ignores the block lists and evaluates mask_mod
    everywhere, so mask_mod alone must say who owns a page: an inverse table (page -> sequence,
    logical block) that a pool of unshared blocks, like this one, has.
    """
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
    except ImportError as err:
        raise Unavailable(f"not in this torch ({torch.__version__}): {err}") from err
    if point.q_len != 1:
        raise Unavailable("timed for decode only")
    device, bs = first.query.device, point.block_size
    batch, per_seq, pages = point.batch, point.blocks_per_seq, point.num_blocks
    full = point.seq_len // bs  # pages a sequence fills
    partial = per_seq - full  # 0 or 1: the last page, partly filled
    tables = shared.block_tables.to(torch.int32)
    # [b, h, q_blocks, pages]
    full_idx = torch.zeros(batch, 1, 1, pages, dtype=torch.int32, device=device)
    full_idx[:, 0, 0, :full] = tables[:, :full]
    part_idx = torch.zeros_like(full_idx)
    part_idx[:, 0, 0, :partial] = tables[:, full:]
    # page -> sequence (-1: spare)
    owner = torch.full((pages,), -1, dtype=torch.int32, device=device)
    # page -> its logical block
    logical = torch.zeros(pages, dtype=torch.int32, device=device)
    # [batch * blocks_per_seq]
    ids = torch.arange(batch * per_seq, device=device, dtype=torch.int32)
    owner[tables.flatten().long()] = ids // per_seq
    logical[tables.flatten().long()] = ids % per_seq
    seq_lens = shared.seq_lens

    def mask_mod(b, h, q_idx, kv_idx):
        page = kv_idx // bs
        position = logical[page] * bs + kv_idx % bs
        return (owner[page] == b) & (position < seq_lens[b])

    counts = torch.ones(batch, 1, 1, dtype=torch.int32, device=device)
    block_mask = BlockMask.from_kv_blocks(
        # [batch, 1, 1]: the partly filled page, masked by mask_mod
        kv_num_blocks=counts * partial,
        kv_indices=part_idx,
        # [batch, 1, 1]: whole pages, read without mask_mod
        full_kv_num_blocks=counts * full,
        full_kv_indices=full_idx,
        # a Q tile of 128 rows (flex's kernels want >= their BLOCK_M), KV tile = page
        BLOCK_SIZE=(128, bs),
        mask_mod=mask_mod,
        seq_lengths=(1, pages * bs),
    )
    attend = flex_attention
    if device.type in COMPILE_FLEX_ON:
        # a fresh compile for this point's static shapes; no stale guards
        torch._dynamo.reset()
        attend = torch.compile(flex_attention, dynamic=False)

    def call(s: Inputs) -> torch.Tensor:
        kv_shape = (1, pages * bs, point.num_kv_heads, point.head_dim)
        # [1, kv_heads, pages * block_size, head_dim]
        k = s.k_cache.view(kv_shape).transpose(1, 2)
        v = s.v_cache.view(kv_shape).transpose(1, 2)
        return attend(
            s.q_dense, k, v, block_mask=block_mask, scale=shared.scale, enable_gqa=True
        )

    return call


FACTORIES = {
    "triton": triton_op,
    "triton-kernel": triton_kernel,
    "reference": reference,
    "sdpa": sdpa,
    "flex-paged": flex_paged,
}
# eager elsewhere: it materializes the scores, fine for --quick's shapes
COMPILE_FLEX_ON = {"cuda"}
# Errors of torch's own methods are recorded, not raised (an OOM of SDPA's math fallback must not end a
# long run); a wrong answer is a DisagreementError except from flex-paged, torch's feature under trial.
GUARDED = {"flex-paged", "sdpa"}
WRONG_RECORDED = {"flex-paged"}
# runs after every other method of a point: a device-side fault there spoils the rest
LAST = "flex-paged"


def device_works(device: torch.device) -> bool:
    """Does the device still run work? False after a device-side fault (the CUDA context is lost)."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return int(torch.ones(1, device=device).add_(1).item()) == 2
    except Exception:  # the fault itself, or any error it left behind
        return False


# ---- checking and timing ---------------------------------------------------------------------------


def causal_mask(point: Point, device: torch.device) -> torch.Tensor:
    """`[q_len, seq_len]` bool: row i (position seq_len - q_len + i) sees keys at positions <= its own."""
    q_pos = torch.arange(point.seq_len - point.q_len, point.seq_len, device=device)
    return torch.arange(point.seq_len, device=device)[None, :] <= q_pos[:, None]


def oracle(point: Point, shared: Shared, s: Inputs) -> torch.Tensor:
    """fp32 SDPA over the dense K/V, a few sequences at a time; `[batch * q_len, num_heads, head_dim]`."""
    mask = causal_mask(point, s.query.device) if point.q_len > 1 else None
    per_seq = (
        4
        * point.seq_len
        * (2 * point.num_heads * point.head_dim + point.num_heads * point.q_len)
    )
    chunk = max(1, ORACLE_CHUNK_BYTES // per_seq)
    outs = []
    for b in range(0, point.batch, chunk):
        q, k, v = (t[b : b + chunk].float() for t in (s.q_dense, s.k_dense, s.v_dense))
        outs.append(
            F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=shared.scale, enable_gqa=True
            )
        )
    return as_rows(torch.cat(outs))


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out.float() - expected).norm() / expected.norm())


def median_us(
    fn: Callable[[], object], device: torch.device, args: argparse.Namespace
) -> float:
    """Median microseconds per call: do_bench on CUDA (L2 flushed before each call), perf_counter on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return (
            do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
            * 1e3
        )
    fn()  # warm-up (the interpreter's first call of a kernel is slower)
    times = []
    for _ in range(args.cpu_runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def copy_bandwidth(device: torch.device, args: argparse.Namespace) -> dict:
    """The device's copy bandwidth: one large dst.copy_(src), bytes read plus bytes written."""
    n = args.copy_mib << 20
    # random bytes, not zeros
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src), device, args)
    if not torch.equal(dst, src):
        raise DisagreementError("the copy-bandwidth copy came out wrong")
    return {"bytes": 2 * n, "time_us": us, "gbps": 2 * n / us / 1e3}


def num_sets(point: Point, device: torch.device, budget: int, dense: bool) -> int:
    """Input sets to rotate among: enough to exceed ROTATE_BYTES (on CUDA), within the memory budget.

    Every set holds pools, query and output; dense K/V only when `dense` (SDPA is timed), except the
    first set, which always has them: the oracle reads them.
    """
    first, size = point.set_bytes(True), point.set_bytes(dense)
    if budget < first:
        return 0
    want = (
        min(MAX_SETS, max(MIN_SETS, math.ceil(ROTATE_BYTES / size)))
        if device.type == "cuda"
        else 2
    )
    return min(want, 1 + (budget - first) // size)


def run_point(
    point: Point,
    methods: Sequence[str],
    device: torch.device,
    gen: torch.Generator,
    args,
    state,
) -> dict:
    """Check every method against the oracle on the first set, then time each; one row of the report."""
    row = new_row(point)
    dense = "sdpa" in methods
    count = num_sets(point, device, state["budget"], dense)
    if count < 1:
        row["skipped"] = (
            f"one input set needs {point.set_bytes(True) / GiB:.1f} GiB (> --memory-gib)"
        )
        return row
    shared = make_shared(point, gen, device)
    sets = [
        make_inputs(point, shared, gen, device, dense=dense or i == 0)
        for i in range(count)
    ]
    row["sets"] = count
    expected = oracle(point, shared, sets[0])
    # the others checked then timed; then flex-paged, checked then timed
    for group in run_groups(methods):
        calls = {}
        for name in group:
            checked = check_method(
                name, point, shared, sets[0], expected, device, args, state, row
            )
            if state.get("fault"):
                break
            if checked is not None:
                calls[name] = checked
        for name, (call, error) in calls.items():
            if state.get("fault"):
                break
            rotation = itertools.cycle(sets)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    us = median_us(
                        lambda call=call, rotation=rotation: call(next(rotation)),
                        device,
                        args,
                    )
            except Exception as err:
                if name not in GUARDED:
                    raise
                row["methods"][name] = {"skipped": failure(err)}
                check_device(device, name, point, state)
                continue
            row["methods"][name] = {"time_us": us, "rel_error": error}
            if getattr(call, "note", None):
                row["methods"][name]["note"] = call.note
    for name in methods:  # what a device fault left unchecked or untimed
        row["methods"].setdefault(name, {"skipped": f"not run: {state.get('fault')}"})
    # the order asked for
    row["methods"] = {name: row["methods"][name] for name in methods}
    add_rates(row, point, state["copy_gbps"])
    return row


def run_groups(methods: Sequence[str]) -> list[list[str]]:
    """The methods in the order they run: every other one (checked, then timed), then flex-paged."""
    return [[m for m in methods if m != LAST], [m for m in methods if m == LAST]]


def check_method(
    name: str,
    point: Point,
    shared: Shared,
    first: Inputs,
    expected: torch.Tensor,
    device,
    args,
    state,
    row,
) -> tuple[Callable, float] | None:
    """Build a method and hold its first output to the oracle: (call, relative error), or None with the
    reason in `row` (unavailable, a guarded failure, a recorded wrong answer). Raises DisagreementError
    for a wrong answer of a method whose answers must be right."""
    try:
        if (
            name == "flex-paged"
            and state["flex_compile_s"] > args.flex_compile_budget_s
        ):
            raise Unavailable(
                f"skipped: flex compiles took over --flex-compile-budget-s {args.flex_compile_budget_s:g}"
            )
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # eager flex and CPU SDPA say what they fall back to
                warnings.simplefilter("ignore")
                call = FACTORIES[name](point, shared, first, args)
                # poisoned: an element the method does not write fails
                first.out.fill_(float("nan"))
                out = as_rows(call(first))  # the first call: it compiles
            if device.type == "cuda":
                torch.cuda.synchronize()
        finally:
            if name == "flex-paged":
                state["flex_compile_s"] += time.perf_counter() - start
        error = relative_error(out, expected)
    except Unavailable as why:
        row["methods"][name] = {"skipped": str(why)}
        return None
    except Exception as err:
        if name not in GUARDED:
            raise
        row["methods"][name] = {"skipped": failure(err)}
        check_device(device, name, point, state)
        return None
    tol = TOLERANCE[DTYPES[point.dtype]]
    if not error <= tol:  # NaN fails too
        message = (
            f"{point.label()}: {name} disagrees with the fp32 oracle "
            f"(relative error {error:.1e} > {tol})"
        )
        if name in WRONG_RECORDED:
            row["methods"][name] = {"skipped": f"failed: {message}"}
            return None
        raise DisagreementError(f"{message}; refusing to time a wrong computation")
    return call, error


def check_device(device: torch.device, name: str, point: Point, state: dict) -> None:
    """After a guarded method failed: if the device no longer works, record why; the sweep stops."""
    if state.get("fault") is None and not device_works(device):
        state["fault"] = (
            f"the device stopped working after {name} failed at {point.label()}; "
            f"rerun these points with --methods leaving {name} out"
        )


def failure(err: Exception) -> str:
    """The reason recorded for a guarded method that raised: its type and first line."""
    return f"failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"


def add_rates(row: dict, point: Point, copy_gbps: float) -> None:
    """GB/s and the fraction of copy bandwidth (decode) or TFLOP/s (prefill), and each time over sdpa's."""
    sdpa_us = row["methods"].get("sdpa", {}).get("time_us")
    for m in row["methods"].values():
        if "time_us" not in m:
            continue
        if point.kind == "decode":
            m["gbps"] = point.bytes_moved / m["time_us"] / 1e3
            m["copy_fraction"] = m["gbps"] / copy_gbps
        else:
            m["tflops"] = point.flops / m["time_us"] / 1e6
        m["x_sdpa"] = m["time_us"] / sdpa_us if sdpa_us else None
    if point.kind == "decode" and point.seq_len >= GOAL_CONTEXT:
        row["goal"] = {
            name: goal_mark(m)
            for name, m in row["methods"].items()
            if name.startswith("triton")
        }


def goal_mark(m: dict) -> str:
    """The goal's mark: pass, miss bw, miss sdpa or miss bw+sdpa; n/a without a time, or without sdpa's."""
    if "time_us" not in m or m.get("x_sdpa") is None:
        return "n/a"
    misses = []
    if m["copy_fraction"] < GOAL_FRACTION:
        misses.append("bw")
    if m["x_sdpa"] > GOAL_X_SDPA:
        misses.append("sdpa")
    return "pass" if not misses else "miss " + "+".join(misses)


def new_row(point: Point) -> dict:
    """A report row for `point`, no method run yet."""
    row = {"dtype": point.dtype, "batch": point.batch}
    if point.kind == "decode":
        row |= {"context": point.seq_len, "bytes": point.bytes_moved}
    else:
        row |= {
            "prefix": point.seq_len - point.q_len,
            "new_tokens": point.q_len,
            "flops": point.flops,
        }
    return row | {"sets": 0, "methods": {}}


def not_run(point: Point, reason: str) -> dict:
    """The row of a point the sweep could not reach."""
    return new_row(point) | {"skipped": f"not run: {reason}"}


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"device": "cpu (Triton interpreter)"}
    props = torch.cuda.get_device_properties(device)
    return {
        "device": torch.cuda.get_device_name(device),
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / GiB, 1),
    }


def run(args: argparse.Namespace, command: str = "") -> dict:
    """Every point of the sweep, checked then timed; the report that the table and the JSON show."""
    import triton

    date = utc_now()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    total = (
        torch.cuda.get_device_properties(device).total_memory
        if device.type == "cuda"
        else 8 * GiB
    )
    memory_gib = args.memory_gib if args.memory_gib is not None else 0.45 * total / GiB
    shape = {
        k: getattr(args, k)
        for k in ("num_heads", "num_kv_heads", "head_dim", "block_size")
    }
    points = [
        Point("decode", dtype, batch, ctx, 1, **shape)
        for dtype in args.dtypes
        for batch in args.batches
        for ctx in args.contexts
    ]
    if not args.skip_prefill:
        points += [
            Point(
                "prefill",
                dtype,
                batch,
                prefix + args.new_tokens,
                args.new_tokens,
                **shape,
            )
            for dtype in args.dtypes
            for batch in args.prefill_batches
            for prefix in args.prefixes
        ]
    with torch.no_grad():
        copy = copy_bandwidth(device, args)
        state = {
            "copy_gbps": copy["gbps"],
            "budget": int(memory_gib * GiB),
            "flex_compile_s": 0.0,
        }
        rows = {"decode": [], "prefill": []}
        for point in tqdm(
            points, desc="points", file=sys.stderr, disable=args.no_progress
        ):
            # the device is gone: keep what was measured, say why the rest is not
            if state.get("fault"):
                rows[point.kind].append(not_run(point, state["fault"]))
                continue
            methods = [
                m
                for m in args.methods
                if point.kind == "decode" or m in PREFILL_METHODS
            ]
            rows[point.kind].append(run_point(point, methods, device, gen, args, state))
            if device.type == "cuda" and not state.get("fault"):
                # the next point's sets may need the memory this one held
                torch.cuda.empty_cache()
    judged = [
        r for r in rows["decode"] if r.get("goal", {}).get(GOAL_METHOD, "n/a") != "n/a"
    ]
    return {
        "benchmark": BENCHMARK,
        "command": command,
        "machine": machine(),
        **device_info(device),
        "date": date,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "config": {
            **shape,
            "dtypes": list(args.dtypes),
            "methods": list(args.methods),
            "timer": "triton.testing.do_bench median (L2 flushed before each call), inputs rotated"
            if device.type == "cuda"
            else f"time.perf_counter median of {args.cpu_runs} runs after a warm-up",
            "warmup_ms": args.warmup_ms,
            "rep_ms": args.rep_ms,
            "memory_gib": round(memory_gib, 1),
            "reference_budget_gib": args.reference_budget_gib,
            "flex_compiled": device.type in COMPILE_FLEX_ON,
            "flex_compile_s": round(state["flex_compile_s"], 1),
            "tolerance": {name: TOLERANCE[DTYPES[name]] for name in args.dtypes},
            "seed": args.seed,
        },
        "copy_bandwidth": copy,
        "goal": {
            "text": GOAL,
            "method": GOAL_METHOD,
            "min_copy_fraction": GOAL_FRACTION,
            "min_context": GOAL_CONTEXT,
            "max_x_sdpa": GOAL_X_SDPA,
            "points": len(judged),
            "met": sum(r["goal"][GOAL_METHOD] == "pass" for r in judged),
        },
        "device_fault": state.get("fault"),
        "json": args.json,
        **rows,
    }


# ---- the report --------------------------------------------------------------------------------------


def _cell(m: dict | None, key: str, fmt: str) -> str:
    value = (m or {}).get(key)
    return "-" if value is None else format(value, fmt)


def format_table(report: dict) -> str:
    """Header lines, then per dtype a decode table and a prefill table, the goal line, skip reasons."""
    c, copy = report["config"], report["copy_bandwidth"]
    lines = [
        f"command: {report['command']}",
        f"device: {report['device']}; machine: {report['machine']}",
        f"torch {report['torch']}, triton {report['triton']}, python {report['python']}, {report['date']}",
        f"{c['num_heads']} query heads, {c['num_kv_heads']} KV heads, head_dim {c['head_dim']}, "
        f"block size {c['block_size']}; timer: {c['timer']}",
        f"copy bandwidth: {copy['gbps']:.0f} GB/s ({copy['bytes'] / 2**20:.0f} MiB read + written "
        f"in {copy['time_us']:.1f} us)",
    ]
    notes = {}
    for dtype in c["dtypes"]:
        decode = [r for r in report["decode"] if r["dtype"] == dtype]
        if decode:
            methods = [m for m in c["methods"] if m in METHODS]
            lines += [
                "",
                f"decode, {dtype}: median us per call; GB/s, % of copy bandwidth and x sdpa of {GOAL_METHOD}",
            ]
            header = f"{'batch':>5} {'ctx':>6} " + " ".join(f"{m:>13}" for m in methods)
            lines.append(header + f" {'GB/s':>7} {'%copy':>6} {'x sdpa':>7}  goal")
            for r in decode:
                cells = [_cell(r["methods"].get(m), "time_us", ".1f") for m in methods]
                k = r["methods"].get(GOAL_METHOD)
                fraction = _cell(k, "copy_fraction", ".1%").rstrip("%")
                lines.append(
                    f"{r['batch']:>5} {r['context']:>6} "
                    + " ".join(f"{x:>13}" for x in cells)
                    + f" {_cell(k, 'gbps', '.0f'):>7} {fraction:>6} {_cell(k, 'x_sdpa', '.2f'):>7}"
                    + f"  {r.get('goal', {}).get(GOAL_METHOD, '')}"
                )
                collect_notes(r, notes)
        prefill = [r for r in report["prefill"] if r["dtype"] == dtype]
        if prefill:
            methods = [m for m in c["methods"] if m in PREFILL_METHODS]
            lines += [
                "",
                f"prefill after a cached prefix, {dtype}: us; TFLOP/s, x sdpa of {GOAL_METHOD}",
            ]
            lines.append(
                f"{'batch':>5} {'prefix':>6} {'new':>5} "
                + " ".join(f"{m:>13}" for m in methods)
                + f" {'TFLOP/s':>8} {'x sdpa':>7}"
            )
            for r in prefill:
                cells = [_cell(r["methods"].get(m), "time_us", ".1f") for m in methods]
                k = r["methods"].get(GOAL_METHOD)
                lines.append(
                    f"{r['batch']:>5} {r['prefix']:>6} {r['new_tokens']:>5} "
                    + " ".join(f"{x:>13}" for x in cells)
                    + f" {_cell(k, 'tflops', '.1f'):>8} {_cell(k, 'x_sdpa', '.2f'):>7}"
                )
                collect_notes(r, notes)
    g = report["goal"]
    lines += ["", f"{GOAL} ({g['method']}): met at {g['met']} of {g['points']} points"]
    if report.get("device_fault"):
        lines.append(f"stopped early: {report['device_fault']}")
    lines += [f"- {reason}: {', '.join(where)}" for reason, where in notes.items()]
    lines.append(
        f"full report: {report['json']}"
        if report["json"]
        else "full report: not written (--json '')"
    )
    return "\n".join(lines)


def collect_notes(row: dict, notes: dict[str, list[str]]) -> None:
    """Group the reasons for '-' cells: reason -> the points it applies to."""
    where = f"{row['dtype']} b{row['batch']} " + (
        f"ctx {row['context']}" if "context" in row else f"prefix {row['prefix']}"
    )
    if "skipped" in row:
        notes.setdefault(f"point skipped: {row['skipped']}", []).append(where)
    for name, m in row["methods"].items():
        if "skipped" in m:
            notes.setdefault(f"{name} {m['skipped']}", []).append(where)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes (on a CPU: through Triton's interpreter)",
    )
    parser.add_argument(
        "--dtypes", nargs="+", choices=list(DTYPES), default=["fp16", "bf16"]
    )
    parser.add_argument(
        "--batches",
        nargs="+",
        type=positive,
        help="decode batch sizes (default 1 8 64 256)",
    )
    parser.add_argument(
        "--contexts",
        nargs="+",
        type=positive,
        help="decode contexts (default 128 1024 4096 16384)",
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--prefill-batches",
        nargs="+",
        type=positive,
        help="prefill batch sizes (default 1 8)",
    )
    parser.add_argument(
        "--prefixes",
        nargs="+",
        type=positive,
        help="cached prefix lengths (default 1024 4096)",
    )
    parser.add_argument(
        "--new-tokens", type=positive, help="new tokens after the prefix (default 512)"
    )
    parser.add_argument(
        "--skip-prefill", action="store_true", help="decode points only"
    )
    parser.add_argument("--num-heads", type=positive)
    parser.add_argument("--num-kv-heads", type=positive)
    parser.add_argument("--head-dim", type=positive)
    parser.add_argument("--block-size", type=positive, default=16)
    parser.add_argument(
        "--warmup-ms",
        type=positive,
        default=25,
        help="do_bench warm-up, ms (default 25)",
    )
    parser.add_argument(
        "--rep-ms",
        type=positive,
        default=100,
        help="do_bench repetition time, ms (default 100)",
    )
    parser.add_argument(
        "--cpu-runs",
        type=positive,
        default=3,
        help="timed runs per method on CPU (default 3)",
    )
    parser.add_argument(
        "--copy-mib",
        type=positive,
        help="copy-bandwidth buffer, MiB (default 1024; --quick 64)",
    )
    parser.add_argument(
        "--memory-gib",
        type=float,
        help="device memory for input sets (default 45%% of the GPU's)",
    )
    parser.add_argument(
        "--reference-budget-gib",
        type=float,
        default=8.0,
        help="skip the reference past this",
    )
    parser.add_argument(
        "--flex-compile-budget-s",
        type=float,
        default=240.0,
        help="stop timing flex-paged after this much compiling",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="the full report (default $OUT/decode_attention.json or ./)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar on stderr"
    )
    args = parser.parse_args(argv)
    full = {
        "batches": [1, 8, 64, 256],
        "contexts": [128, 1024, 4096, 16384],
        "prefill_batches": [1, 8],
        "prefixes": [1024, 4096],
        "new_tokens": 512,
        "num_heads": 32,
        "num_kv_heads": 8,
        "head_dim": 128,
        "copy_mib": 1024,
    }
    quick = {
        "batches": [1, 2],
        "contexts": [16, 48],
        "prefill_batches": [1, 2],
        "prefixes": [16],
        "new_tokens": 16,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 32,
        "copy_mib": 64,
    }
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.quick and not torch.cuda.is_available():
        parser.error(
            "no CUDA device: the full sweep needs a GPU; --quick runs tiny shapes on the CPU"
        )
    if args.num_heads % args.num_kv_heads:
        parser.error("--num-heads must be a multiple of --num-kv-heads")
    if args.json is None:
        args.json = os.path.join(os.environ.get("OUT", "."), "decode_attention.json")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the tables, write the JSON; on a wrong answer report nothing and return 1."""
    return bench_common.main("decode_attention.py", argv, parse_args, run, format_table)


if __name__ == "__main__":
    raise SystemExit(main())
