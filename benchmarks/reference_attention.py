"""What paging costs in the reference backend: its paged_attention against dense SDPA, on CPU.

OS idea: address translation is not free; a load through the page table costs a walk that a load from
physical memory does not, and the MMU's TLB exists to hide it (OSTEP ch. 19). KV counterpart: the
reference backend (minipaged/reference/attention.py) translates by copying: for every sequence, on
every call, `gather_kv` walks the block table and copies the whole context into contiguous K/V, then
`attend` computes attention in float32 on the copy. The no-paging ideal is one batched call of torch's
`scaled_dot_product_attention` on K/V already laid out as `[batch, num_kv_heads, context, head_dim]`.

For each case (mode, batch, context) this script builds the same K/V both ways (pools with shuffled
block tables, and dense tensors), checks once that the two outputs agree (minipaged.testing.tolerance)
and refuses to report otherwise, then times with torch.utils.benchmark (median of blocked_autorange):

- reference: the backend's paged_attention (input checks, per-sequence gather + attend, output writes);
- SDPA: the dense ideal;
- gather: gather_kv over all sequences alone (the copy of the context, and its Python loop);
- attend: attend over all sequences on already gathered K/V (the math, and its Python loop).

The reference allocates megabytes of temporaries per sequence and call. glibc's malloc by default hands
large freed buffers back to the OS and adjusts its thresholds as it goes, so whether a call pays page
faults on fresh memory changes from run to run, and the reference's times with it. The script fixes
glibc's thresholds with mallopt (where there is a glibc) so that runs repeat; --default-malloc keeps
the defaults. Buffers over 32 MiB (prefill's score matrices at long contexts) are still mapped fresh on
every call, as they would be in any run.

Run from the repository root (minipaged must be importable: `pip install -e .` or PYTHONPATH=.):

    python benchmarks/reference_attention.py                      # the default sweep, about a minute
    python benchmarks/reference_attention.py --modes decode --batch-sizes 1 16 --json out.json
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import bench_common
import torch
import torch.nn.functional as F
from bench_common import DisagreementError, machine, positive, utc_now
from torch.utils.benchmark import Timer
from tqdm import tqdm

from minipaged.backend import get_backend
from minipaged.reference.attention import attend, gather_kv
from minipaged.testing import tolerance

BENCHMARK = "reference_attention"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ROW_KEYS = (
    "mode",
    "batch",
    "context",
    "reference_ms",
    "sdpa_ms",
    "ratio",
    "gather_ms",
    "attend_ms",
)


@dataclass
class Case:
    """One benchmark case: the same K/V as paged pools (for the reference) and dense (for SDPA)."""

    mode: str  # "decode" (q_len 1) or "prefill" (q_len = context)
    batch: int
    context: int
    paged_args: tuple  # paged_attention's positional arguments, in the contract's order
    q_dense: torch.Tensor  # [batch, num_heads, q_len, head_dim]
    k_dense: torch.Tensor  # [batch, num_kv_heads, context, head_dim]
    v_dense: torch.Tensor  # [batch, num_kv_heads, context, head_dim]

    @property
    def scale(self) -> float:
        return self.paged_args[6]


def make_case(
    gen: torch.Generator,
    mode: str,
    batch: int,
    context: int,
    *,
    num_heads: int = 8,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
) -> Case:
    """Random pools and shuffled block tables, and the same K/V read back through them as dense tensors."""
    q_len = 1 if mode == "decode" else context
    blocks_per_seq = -(-context // block_size)  # ceil
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    # [num_blocks, block_size, num_kv_heads, head_dim]
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    # every sequence's blocks scattered over the pool
    perm = torch.randperm(num_blocks, generator=gen)
    # [batch, blocks_per_seq]
    block_tables = perm.view(batch, blocks_per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)  # [batch]
    # [batch + 1]
    query_start_loc = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32)
    # [batch * q_len, ...]
    query = torch.randn(batch * q_len, num_heads, head_dim, generator=gen).to(dtype)

    # the pool read through the tables, laid out densely
    def dense(cache: torch.Tensor) -> torch.Tensor:
        # [batch, context, kv_heads, dim]
        rows = cache[block_tables.long()].flatten(1, 2)[:, :context]
        # [batch, num_kv_heads, context, head_dim]
        return rows.transpose(1, 2).contiguous()

    q_dense = query.view(batch, q_len, num_heads, head_dim).transpose(1, 2).contiguous()
    args = (
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        head_dim**-0.5,
    )
    return Case(mode, batch, context, args, q_dense, dense(k_cache), dense(v_cache))


def sdpa(case: Case) -> torch.Tensor:
    """The no-paging ideal: one batched SDPA call, `[batch, num_heads, q_len, head_dim]`."""
    return F.scaled_dot_product_attention(
        case.q_dense,
        case.k_dense,
        case.v_dense,
        # q_len = context: the causal mask of a whole prompt
        is_causal=case.mode == "prefill",
        scale=case.scale,
        enable_gqa=True,
    )


def gather_all(case: Case) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The reference's copy of the context alone: gather_kv for every sequence, as paged_attention does."""
    _, k_cache, v_cache, block_tables, seq_lens, _, _ = case.paged_args
    return [
        gather_kv(k_cache, v_cache, block_tables[b], n)
        for b, n in enumerate(seq_lens.tolist())
    ]


def attend_all(
    case: Case, gathered: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> list[torch.Tensor]:
    """The reference's math alone: attend for every sequence on already gathered K/V."""
    query, starts = case.paged_args[0], case.paged_args[5].tolist()
    return [
        attend(query[starts[b] : starts[b + 1]], keys, values, case.scale)
        for b, (keys, values) in enumerate(gathered)
    ]


def check_case(case: Case, paged_attention: Callable[..., torch.Tensor]) -> None:
    """Raise DisagreementError unless the reference's output equals SDPA's (and the gather the dense K/V)."""
    tol = tolerance(case.paged_args[0].dtype)
    # [batch * q_len, num_heads, head_dim]
    expected = sdpa(case).transpose(1, 2).flatten(0, 1)
    try:
        torch.testing.assert_close(paged_attention(*case.paged_args), expected, **tol)
        for b, (keys, values) in enumerate(gather_all(case)):
            torch.testing.assert_close(
                keys, case.k_dense[b].transpose(0, 1), rtol=0, atol=0
            )
            torch.testing.assert_close(
                values, case.v_dense[b].transpose(0, 1), rtol=0, atol=0
            )
    except AssertionError as err:
        raise DisagreementError(
            f"{case.mode} batch={case.batch} context={case.context}: the reference disagrees with SDPA; "
            f"refusing to time a wrong computation.\n{err}"
        ) from err


def median_ms(fn: Callable[[], object], threads: int, min_run_time: float) -> float:
    """The median time of `fn()` in milliseconds (torch.utils.benchmark, `threads` intra-op threads)."""
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def time_case(
    case: Case,
    paged_attention: Callable[..., torch.Tensor],
    threads: int,
    min_run_time: float,
) -> dict:
    """One row of the table: the four timings of a case, checked first."""
    check_case(case, paged_attention)
    gathered = gather_all(case)
    reference_ms = median_ms(
        lambda: paged_attention(*case.paged_args), threads, min_run_time
    )
    sdpa_ms = median_ms(lambda: sdpa(case), threads, min_run_time)
    return {
        "mode": case.mode,
        "batch": case.batch,
        "context": case.context,
        "reference_ms": reference_ms,
        "sdpa_ms": sdpa_ms,
        "ratio": reference_ms / sdpa_ms,
        "gather_ms": median_ms(lambda: gather_all(case), threads, min_run_time),
        "attend_ms": median_ms(
            lambda: attend_all(case, gathered), threads, min_run_time
        ),
    }


def steady_malloc() -> str:
    """Fix glibc's malloc thresholds so freed buffers stay mapped between calls; say what was done.

    M_MMAP_THRESHOLD (-3) set to its maximum, 32 MiB, stops the threshold from moving as buffers come
    and go; M_TRIM_THRESHOLD (-1) at 1 GiB stops the heap from being given back after each call.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return "default (no glibc mallopt here)"
    if mallopt(-3, 32 << 20) and mallopt(-1, 1 << 30):
        return "glibc mallopt: mmap threshold 32 MiB, trim threshold 1 GiB"
    return "default (mallopt refused)"


def run(args: argparse.Namespace, command: str = "") -> dict:
    """Every case of the sweep, checked then timed; the report that the table and the JSON show."""
    date = utc_now()
    gen = torch.Generator().manual_seed(args.seed)
    paged_attention = get_backend("reference").paged_attention
    cases = [
        (mode, batch, context)
        for mode in args.modes
        for batch in args.batch_sizes
        for context in args.contexts
    ]
    malloc = "default" if args.default_malloc else steady_malloc()
    rows = []
    previous_threads = torch.get_num_threads()
    # for the checks too; every Timer sets the same count
    torch.set_num_threads(args.threads)
    try:
        for mode, batch, context in tqdm(
            cases, desc="cases", file=sys.stderr, disable=args.no_progress
        ):
            case = make_case(
                gen,
                mode,
                batch,
                context,
                num_heads=args.num_heads,
                num_kv_heads=args.num_kv_heads,
                head_dim=args.head_dim,
                block_size=args.block_size,
                dtype=DTYPES[args.dtype],
            )
            rows.append(
                time_case(case, paged_attention, args.threads, args.min_run_time)
            )
    finally:
        # a caller (a test) keeps its own setting
        torch.set_num_threads(previous_threads)
    return {
        "benchmark": BENCHMARK,
        "command": command,
        "machine": machine(),
        "date": date,
        "torch": torch.__version__,
        "threads": args.threads,
        "malloc": malloc,
        "config": {
            "num_heads": args.num_heads,
            "num_kv_heads": args.num_kv_heads,
            "head_dim": args.head_dim,
            "block_size": args.block_size,
            "dtype": args.dtype,
            "min_run_time": args.min_run_time,
            "seed": args.seed,
        },
        "rows": rows,
    }


def format_table(report: dict) -> str:
    """The report as header lines and a Markdown table (they paste into docs/kernels/reference-cost.md)."""
    c = report["config"]
    lines = [
        f"command: {report['command']}",
        f"machine: {report['machine']}; torch {report['torch']}; threads {report['threads']}; "
        f"date {report['date']}; malloc {report['malloc']}",
        f"num_heads {c['num_heads']}, num_kv_heads {c['num_kv_heads']}, head_dim {c['head_dim']}, "
        f"block_size {c['block_size']}, {c['dtype']}; median of blocked_autorange "
        f"(min_run_time {c['min_run_time']} s)",
        "",
        "| mode | batch | context | reference ms | SDPA ms | ratio | gather ms | attend ms |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['mode']} | {r['batch']} | {r['context']} | {r['reference_ms']:.3f} | {r['sdpa_ms']:.3f} "
            f"| {r['ratio']:.1f} | {r['gather_ms']:.3f} | {r['attend_ms']:.3f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["decode", "prefill"],
        default=["decode", "prefill"],
    )
    parser.add_argument("--batch-sizes", nargs="+", type=positive, default=[1, 4, 16])
    parser.add_argument(
        "--contexts", nargs="+", type=positive, default=[128, 512, 2048]
    )
    parser.add_argument("--num-heads", type=positive, default=8)
    parser.add_argument("--num-kv-heads", type=positive, default=2)
    parser.add_argument("--head-dim", type=positive, default=64)
    parser.add_argument("--block-size", type=positive, default=16)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument(
        "--threads",
        type=positive,
        default=1,
        help="torch intra-op threads for every timing (default 1: the work, not how well it parallelizes)",
    )
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=0.2,
        help="seconds per blocked_autorange (default 0.2)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's malloc thresholds (see the docstring)",
    )
    parser.add_argument(
        "--json", metavar="PATH", help="also write the report as JSON to PATH"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar on stderr"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON; on a wrong answer report nothing and return 1."""
    return bench_common.main(
        "reference_attention.py", argv, parse_args, run, format_table
    )


if __name__ == "__main__":
    raise SystemExit(main())
