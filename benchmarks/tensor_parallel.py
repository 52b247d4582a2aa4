"""What tensor parallelism sends per step, where rank 0's step time goes, and what each rank holds.

OS idea: one memory manager over several memory banks: it decides alone where every page lives and
tells each bank only what to do with its part, so the decisions are made once and the messages are
small (OSTEP ch. 18-19; a NUMA kernel's single page table). KV counterpart: vLLM paper section 4.6
(Fig. 5): one scheduler and one KV cache manager, on rank 0, broadcast each step's inputs (the
tokens, the block tables, the slot mapping) to every worker; each worker holds its share of the KV
heads in the same blocks, and runs its shard of the model, which Megatron-LM splits so that it
all-reduces twice a layer (after the attention and after the MLP).

The script runs one fixed greedy workload through `LLM(model, tensor_parallel_size=N)` for each N
of `--sizes` (default 1 2): `--num-requests` prompts of random token ids in [3, 259) with lengths
drawn evenly from `--prompt-lens` (a seeded torch.Generator), each generating `--max-tokens`
tokens (greedy, ignore_eos), in one `generate` call after an untimed warm-up. It reports:

- per N: steps, the mean step time (StepStats.duration: from schedule() to the logits, sampling
  left out) over all steps, prefill-containing steps and decode-only steps (num_prefill_tokens ==
  0), the wall time of the call, and the device KV pool of each rank (its KV heads and bytes);
- per N > 1 and kind of step: what rank 0 saw (`llm.runner.last_step`, collected by a step
  observer): bytes of step inputs broadcast and the milliseconds it took, all-reduce calls, bytes
  all-reduced and milliseconds all-reducing, each the mean and the max per step, and the share of
  the step time spent in the two. An all-reduce's time includes waiting for the slowest rank.

Correct before fast: every N's tokens must equal the first size's, request by request; otherwise
the script prints the error, reports nothing and exits with status 1.

On a machine with fewer cores than N x threads the ranks share cores, and on CPU the collectives go
through gloo over TCP on this machine: there, TP > 1 is expected to be slower than TP = 1. The
bytes per step and the pool bytes per rank do not depend on the machine.

Run from the repository root (minipaged must be importable: `pip install -e .` or PYTHONPATH=.):

    python benchmarks/tensor_parallel.py                      # small-llama, N = 1, 2: ~20 s
    python benchmarks/tensor_parallel.py --model tiny-llama --num-requests 4 --json tp.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import bench_common
import torch
from bench_common import DisagreementError, machine, positive, utc_now
from tqdm import tqdm

from minipaged import LLM, SamplingParams
from minipaged.distributed.runner import describe_pools
from minipaged.presets import BYTE_OFFSET, VOCAB_SIZE

BENCHMARK = "tensor_parallel"
KINDS = (
    "prefill",
    "decode",
)  # steps with prefill tokens (and maybe decodes), decode-only steps
ROW_KEYS = (
    "tp",
    "steps",
    "prefill_steps",
    "decode_steps",
    "step_ms",
    "prefill_step_ms",
    "decode_step_ms",
    "wall_s",
    "kv_heads_per_rank",
    "kv_pool_bytes_per_rank",
)
COMM_KEYS = (
    "tp",
    "kind",
    "steps",
    "broadcast_bytes",
    "broadcast_ms",
    "allreduce_calls",
    "allreduce_bytes",
    "allreduce_ms",
    "step_ms",
    "broadcast_share",
    "allreduce_share",
)


@dataclass
class StepRecord:
    """One engine step: its time and kind (StepStats), and what rank 0 sent (None at N = 1)."""

    duration_s: float
    num_prefill_tokens: int
    comm: object  # minipaged.distributed.runner.StepComm | None


def make_prompts(
    num_requests: int, prompt_lens: tuple[int, int], seed: int
) -> list[list[int]]:
    """Prompts of random byte-tokenizer ids [3, 259), lengths uniform in prompt_lens (both ends)."""
    gen = torch.Generator().manual_seed(seed)
    low, high = prompt_lens
    lengths = torch.randint(low, high + 1, (num_requests,), generator=gen).tolist()
    return [
        torch.randint(BYTE_OFFSET, VOCAB_SIZE, (n,), generator=gen).tolist()
        for n in lengths
    ]


def pools(llm: LLM) -> list[dict]:
    """Every rank's device KV pool: {"rank", "kv_heads", "shape", "bytes"}, rank 0 first."""
    if llm.tensor_parallel_size > 1:
        return llm.runner.pools()
    return [describe_pools(llm.runner, 0)]


def generate(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Each prompt's greedy tokens, from one generate call."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]
    outputs = llm.generate(requests, params, use_tqdm=False)
    return [out.outputs[0].token_ids for out in outputs]


def run_size(
    tp: int, args: argparse.Namespace, prompts: list[list[int]], num_blocks: int
) -> tuple[list[list[int]], list[StepRecord], float, list[dict]]:
    """The workload at tensor_parallel_size=tp: (tokens, per-step records, wall s, pools)."""
    with LLM(
        args.model,
        tensor_parallel_size=tp,
        block_size=args.block_size,
        num_gpu_blocks=num_blocks,
        seed=args.seed,
    ) as llm:
        # first calls pay one-off costs (allocations, the group's first collectives)
        generate(llm, make_prompts(2, (4, 8), seed=12345), 2)
        records: list[StepRecord] = []

        def observe(llm: LLM, out: object) -> None:
            stats = llm.step_stats[-1]
            comm = llm.runner.last_step if tp > 1 else None
            records.append(StepRecord(stats.duration, stats.num_prefill_tokens, comm))

        llm.step_observers.append(observe)
        start = time.perf_counter()
        tokens = generate(llm, prompts, args.max_tokens)
        wall = time.perf_counter() - start
        llm.step_observers.remove(observe)
        return tokens, records, wall, pools(llm)


def check_same(tp: int, tokens: list[list[int]], first: int, expected) -> None:
    """Raise DisagreementError naming the first request whose tokens differ."""
    for i, (got, want) in enumerate(zip(tokens, expected, strict=True)):
        if got != want:
            pairs = enumerate(zip(got, want, strict=False))
            j = next((j for j, (a, b) in pairs if a != b), min(len(got), len(want)))
            raise DisagreementError(
                f"request {i}: tensor_parallel_size={tp} and {first} differ from token {j} on; "
                f"refusing to report.\nTP={tp}: {got}\nTP={first}: {want}"
            )


def mean_ms(values: list[float]) -> float | None:
    return 1e3 * sum(values) / len(values) if values else None


def kind_of(record: StepRecord) -> str:
    return "prefill" if record.num_prefill_tokens > 0 else "decode"


def comm_row(tp: int, kind: str, records: list[StepRecord]) -> dict:
    """Mean and max per step of what rank 0 sent and how long it took, over `records`."""
    comms = [r.comm for r in records]

    def stat(name: str, scale: float = 1.0) -> dict:
        values = [scale * getattr(c, name) for c in comms]
        return {"mean": sum(values) / len(values), "max": max(values)}

    step_s = sum(r.duration_s for r in records)
    return {
        "tp": tp,
        "kind": kind,
        "steps": len(records),
        "broadcast_bytes": stat("broadcast_bytes"),
        "broadcast_ms": stat("broadcast_s", 1e3),
        "allreduce_calls": stat("allreduce_calls"),
        "allreduce_bytes": stat("allreduce_bytes"),
        "allreduce_ms": stat("allreduce_s", 1e3),
        "step_ms": 1e3 * step_s / len(records),
        "broadcast_share": sum(c.broadcast_s for c in comms) / step_s,
        "allreduce_share": sum(c.allreduce_s for c in comms) / step_s,
    }


def run(args: argparse.Namespace, command: str = "") -> dict:
    """Every size of --sizes on the same workload, checked against the first; the report."""
    date = utc_now()
    prompts = make_prompts(args.num_requests, tuple(args.prompt_lens), args.seed)
    num_blocks = args.num_gpu_blocks
    if (
        num_blocks is None
    ):  # every request at once, and the 1% watermark: nobody preempts
        num_blocks = sum(
            -(-(len(p) + args.max_tokens) // args.block_size) for p in prompts
        )
        num_blocks += -(-num_blocks // 99)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # rank 0's; each worker runs on 1 thread
    rows, comm_rows, pool_rows, expected = [], [], [], None
    try:
        for tp in tqdm(
            args.sizes, desc="sizes", file=sys.stderr, disable=args.no_progress
        ):
            tokens, records, wall, rank_pools = run_size(tp, args, prompts, num_blocks)
            if expected is None:
                expected = tokens
            else:
                check_same(tp, tokens, args.sizes[0], expected)
            by_kind = {k: [r for r in records if kind_of(r) == k] for k in KINDS}
            rows.append(
                {
                    "tp": tp,
                    "steps": len(records),
                    "prefill_steps": len(by_kind["prefill"]),
                    "decode_steps": len(by_kind["decode"]),
                    "step_ms": mean_ms([r.duration_s for r in records]),
                    "prefill_step_ms": mean_ms(
                        [r.duration_s for r in by_kind["prefill"]]
                    ),
                    "decode_step_ms": mean_ms(
                        [r.duration_s for r in by_kind["decode"]]
                    ),
                    "wall_s": wall,
                    "kv_heads_per_rank": rank_pools[0]["kv_heads"],
                    "kv_pool_bytes_per_rank": rank_pools[0]["bytes"],
                }
            )
            pool_rows += [{"tp": tp} | p for p in rank_pools]
            if tp > 1:
                comm_rows += [
                    comm_row(tp, kind, by_kind[kind]) for kind in KINDS if by_kind[kind]
                ]
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "benchmark": BENCHMARK,
        "command": command,
        "machine": machine(),
        "date": date,
        "torch": torch.__version__,
        "threads": args.threads,
        "config": {
            "model": args.model,
            "sizes": args.sizes,
            "num_requests": args.num_requests,
            "prompt_lens": [min(map(len, prompts)), max(map(len, prompts))],
            "max_tokens": args.max_tokens,
            "block_size": args.block_size,
            "num_blocks": num_blocks,
            "seed": args.seed,
        },
        "checked": len(args.sizes) > 1,
        "rows": rows,
        "comm": comm_rows,
        "pools": pool_rows,
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(report: dict) -> str:
    """The report as header lines and three Markdown tables."""
    c = report["config"]
    sizes = c["sizes"]
    checked = (
        f"every size's tokens == TP={sizes[0]}'s, request by request"
        if report["checked"]
        else "one size only: nothing to compare"
    )
    lines = [
        f"command: {report['command']}",
        f"machine: {report['machine']}; torch {report['torch']}; threads {report['threads']} "
        f"(rank 0; each worker 1); date {report['date']}",
        f"workload: {c['model']}, {c['num_requests']} requests, prompts {c['prompt_lens'][0]}-"
        f"{c['prompt_lens'][1]} tokens, {c['max_tokens']} tokens out each, greedy, ignore_eos; "
        f"block size {c['block_size']}, {c['num_blocks']} blocks; gloo on CPU",
        f"checked: {checked}",
        "",
        "| TP | steps (prefill + decode-only) | step ms | prefill step ms | decode step ms "
        "| wall s | KV heads per rank | KV pool MiB per rank |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['tp']} | {r['steps']} ({r['prefill_steps']} + {r['decode_steps']}) "
            f"| {_ms(r['step_ms'])} | {_ms(r['prefill_step_ms'])} | {_ms(r['decode_step_ms'])} "
            f"| {r['wall_s']:.2f} | {r['kv_heads_per_rank']} "
            f"| {r['kv_pool_bytes_per_rank'] / 2**20:.2f} |"
        )
    if report["comm"]:
        lines += [
            "",
            "per step, seen from rank 0: mean (max)",
            "",
            "| TP | steps | n | broadcast KiB | broadcast ms | all-reduces | all-reduced KiB "
            "| all-reduce ms | step ms | broadcast share | all-reduce share |",
            "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in report["comm"]:

            def pair(key: str, scale: float = 1.0, fmt: str = ".2f", r=r) -> str:
                s = r[key]
                return f"{s['mean'] * scale:{fmt}} ({s['max'] * scale:{fmt}})"

            lines.append(
                f"| {r['tp']} | {r['kind']} | {r['steps']} | {pair('broadcast_bytes', 2**-10, '.1f')} "
                f"| {pair('broadcast_ms')} | {pair('allreduce_calls', fmt='.0f')} "
                f"| {pair('allreduce_bytes', 2**-10, '.1f')} | {pair('allreduce_ms')} "
                f"| {r['step_ms']:.2f} | {r['broadcast_share']:.1%} | {r['allreduce_share']:.1%} |"
            )
    lines += [
        "",
        "| TP | rank | KV heads | one layer's K pool | KV pool bytes (K and V, all layers) |",
        "|--:|--:|--:|---|--:|",
    ]
    for p in report["pools"]:
        lines.append(
            f"| {p['tp']} | {p['rank']} | {p['kv_heads']} | {p['shape']} | {p['bytes']:,} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="small-llama",
        help="a preset or a local checkpoint directory",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=positive,
        default=[1, 2],
        help="tensor_parallel_size values, each checked against the first (default 1 2)",
    )
    parser.add_argument("--num-requests", type=positive, default=16)
    parser.add_argument(
        "--prompt-lens",
        nargs=2,
        type=positive,
        default=[16, 128],
        metavar=("MIN", "MAX"),
        help="(default 16 128)",
    )
    parser.add_argument(
        "--max-tokens", type=positive, default=32, help="tokens out per request"
    )
    parser.add_argument("--block-size", type=positive, default=16)
    parser.add_argument(
        "--num-gpu-blocks",
        type=positive,
        default=None,
        help="blocks in each rank's pool (default: enough for every request at once)",
    )
    parser.add_argument(
        "--threads",
        type=positive,
        default=1,
        help="rank 0's torch intra-op threads (default 1; the workers always use 1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", metavar="PATH", help="also write the report as JSON to PATH"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar on stderr"
    )
    args = parser.parse_args(argv)
    low, high = args.prompt_lens
    if low > high:
        parser.error(f"--prompt-lens must be MIN <= MAX, got {low} {high}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the tables, write the JSON; on a wrong answer report nothing and return 1."""
    return bench_common.main("tensor_parallel.py", argv, parse_args, run, format_table)


if __name__ == "__main__":
    raise SystemExit(main())
