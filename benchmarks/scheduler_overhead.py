"""What the CPU-side policy costs per step: the scheduler and the block manager with a null model.

OS idea: a scheduler's own overhead (the context switch, the run-queue scan) is time no process gets
to run, so kernels keep it small and flat as the number of processes grows (OSTEP ch. 6-7; Linux's
O(1) and CFS schedulers). KV counterpart: vLLM paper section 4.5 and its section 6 discussion of
overheads: the engine decides every iteration who runs and which blocks each sequence writes into,
and on a fast GPU that CPU time can rival the model step itself.

This script plays the engine's part with no model at all: after each `Scheduler.schedule()` it marks
every scheduled sequence's tokens computed, appends a dummy token, and finishes a sequence at its
max_tokens (freeing its blocks), exactly as LLM.step does around the model. With N single-sequence
requests admitted at once (a prefill step) and enough blocks that nobody is preempted, it times the
steady state: decode steps with all N sequences running. It reports microseconds per scheduled
sequence per step for:

- step: schedule() plus the engine's part (the figure the goal is about);
- schedule: schedule() alone;
- admission: the schedule() of the step that admits all N requests, per request (untimed
  before 2026-12-03, when it was found to grow as N * N);
- device_stats: BlockManager.device_stats(), the device pool's figures, which the engine also
  reads once a step for its StepStats (LLM._record), so it is overhead the engine pays on top;
- memory_stats: the full snapshot (every sequence, both pools) that docs and experiments read.

On a shared machine one measurement moves with the load, so it runs in rounds (`--rounds`, 5 by
default): each round measures every N once, the order rotated by one from round to round, and the
table gives each figure's median over the rounds with the step's spread (min-max).

The goal (stated, not asserted): a step at 1024 sequences costs at most twice the peer's,
nano-vllm's, PEER_US_PER_SEQ_STEP. nano-vllm is on no registry this machine reaches, so its
figure is the one recorded in issue 18 (PEER_HOW says how it was taken), not run here.
`--profile` adds the functions where a step's time goes (cProfile) at the largest N.

To compare with an older checkout, run this script with that checkout first on PYTHONPATH; one
older than 2026-12-03 has no device_stats, and its column reads n/a.

Run from the repository root (minipaged must be importable: `pip install -e .` or PYTHONPATH=.):

    python benchmarks/scheduler_overhead.py                       # N = 1, 64, 1024; a few seconds
    python benchmarks/scheduler_overhead.py --num-seqs 1024 --prefix-caching --profile
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import bench_common
import torch
from bench_common import machine, positive, rotated, utc_now
from tqdm import tqdm

from minipaged.config import SchedulerConfig
from minipaged.reference.block_manager import BlockManager
from minipaged.reference.block_table import num_blocks_for
from minipaged.reference.scheduler import Scheduler, SchedulerOutput
from minipaged.sequence import Sequence as Seq
from minipaged.sequence import SequenceGroup, SequenceStatus

BENCHMARK = "scheduler_overhead"
PEER = "nano-vllm"
# microseconds per sequence-step at GOAL_SEQS sequences
PEER_US_PER_SEQ_STEP = 0.96
PEER_HOW = (
    "issue 18's record: nano-vllm at commit bb823b3, its scheduler and block manager driven "
    "the same way with a null model, measured side by side with minipaged's in one process, "
    "the order rotated, on this 2-core machine"
)
GOAL_RATIO = 2.0  # at most this many times the peer's cost
GOAL_SEQS = 1024
ROW_KEYS = (
    "num_seqs",
    "steps",
    "rounds",
    "step_us_per_seq",
    "step_us_min",
    "step_us_max",
    "schedule_us_per_seq",
    "admit_us_per_seq",
    "device_stats_us_per_seq",
    "memory_stats_us_per_seq",
)
DUMMY_TOKEN = 3


class NullEngine:
    """The scheduler and the block manager, driven as LLM.step drives them, with no model.

    Args:
        num_seqs: single-sequence requests, all queued at once.
        prompt_len: tokens in each prompt.
        max_tokens: tokens each sequence generates before it finishes.
        block_size: tokens per block.
        enable_prefix_caching: hash full blocks as they fill (the prompts differ, so nothing is shared).
        num_waiting: more requests queued behind them, which max_num_seqs keeps waiting while
            the first num_seqs run: a server at capacity, whose every step checks its queue.
    """

    def __init__(
        self,
        num_seqs: int,
        prompt_len: int,
        max_tokens: int,
        block_size: int = 16,
        enable_prefix_caching: bool = False,
        num_waiting: int = 0,
    ) -> None:
        blocks_per_seq = num_blocks_for(prompt_len + max_tokens, block_size)
        # enough: nobody is ever preempted
        num_gpu_blocks = num_seqs * blocks_per_seq + 1
        num_gpu_blocks += -(-num_gpu_blocks // 99)  # room for the 1% watermark too
        self.manager = BlockManager(
            block_size,
            num_gpu_blocks,
            0,
            watermark=0.01,
            enable_prefix_caching=enable_prefix_caching,
        )
        config = SchedulerConfig(
            max_model_len=prompt_len + max_tokens,
            max_num_seqs=num_seqs,
            max_num_batched_tokens=max(num_seqs * prompt_len, prompt_len + max_tokens),
        )
        self.scheduler = Scheduler(config, self.manager)
        self.max_tokens = max_tokens
        for i in range(num_seqs + num_waiting):
            # distinct prompts
            prompt = [1] + [3 + (i * 7919 + j) % 256 for j in range(prompt_len - 1)]
            self.scheduler.add(SequenceGroup(str(i), [Seq(prompt)]))

    def after_model(self, out: SchedulerOutput) -> None:
        """The engine's part after the model step: tokens computed, a dummy token sampled, finish."""
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed_tokens = item.seq_len
            seq.append_token_id(DUMMY_TOKEN)
            if len(seq.output_token_ids) >= self.max_tokens:
                seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
                self.manager.free(seq)
                # only a sequence that finishes can finish its group
                if item.group.is_finished():
                    self.scheduler.finish(item.group)

    def step(self) -> SchedulerOutput:
        out = self.scheduler.schedule()
        self.after_model(out)
        return out


def steady_engine(
    num_seqs: int,
    prompt_len: int,
    steps: int,
    warmup: int,
    block_size: int,
    prefix: bool,
    num_waiting: int = 0,
):
    """A NullEngine with every sequence admitted (one prefill step) and `warmup` decode steps
    done, and the seconds that admission step's schedule() took."""
    engine = NullEngine(
        num_seqs, prompt_len, warmup + 2 * steps + 2, block_size, prefix, num_waiting
    )
    start = time.perf_counter()
    out = engine.scheduler.schedule()
    admit_s = time.perf_counter() - start
    engine.after_model(out)
    if len(out.scheduled) != num_seqs:
        raise RuntimeError(
            f"the prefill step admitted {len(out.scheduled)} of {num_seqs} sequences"
        )
    for _ in range(warmup):
        engine.step()
    return engine, admit_s


def time_steps(fn: Callable[[], object], steps: int) -> float:
    """Seconds per call of fn(), over `steps` calls, with the garbage collector paused."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - start) / steps
    finally:
        gc.enable()


def measure(num_seqs: int, args: argparse.Namespace) -> dict:
    """One measurement: microseconds per sequence-step for a step, schedule() alone,
    device_stats() and memory_stats()."""
    engine, admit_s = steady_engine(
        num_seqs,
        args.prompt_len,
        args.steps,
        args.warmup,
        args.block_size,
        args.prefix_caching,
        args.waiting,
    )
    # each step's output is checked as it comes and let go, as the engine lets it go:
    # fifty steps' outputs kept alive would slow the allocator the timing measures
    not_decodes = []

    def step_checked() -> None:
        out = engine.step()
        if (
            len(out.scheduled) != num_seqs
            or out.preempted
            or out.num_batched_tokens != num_seqs
        ):
            not_decodes.append(out)

    step_s = time_steps(step_checked, args.steps)
    if not_decodes:
        raise RuntimeError(
            "a timed step was not a decode step of every sequence (preemption or a finish)"
        )
    # schedule() alone: the engine's part runs untimed between calls, so each call sees a decode step
    schedule_s = 0.0
    gc.collect()
    gc.disable()
    try:
        for _ in range(args.steps):
            start = time.perf_counter()
            out = engine.scheduler.schedule()
            schedule_s += time.perf_counter() - start
            engine.after_model(out)
    finally:
        gc.enable()
    # an older checkout (before 2026-12-03) has no device_stats: its engine read memory_stats
    device_stats = getattr(engine.manager, "device_stats", None)
    device_s = time_steps(device_stats, args.steps) if device_stats else None
    stats_s = time_steps(engine.manager.memory_stats, args.steps)
    per_seq = 1e6 / num_seqs
    return {
        "step": step_s * per_seq,
        "schedule": schedule_s / args.steps * per_seq,
        "admit": admit_s * per_seq,
        "device_stats": device_s * per_seq if device_s is not None else None,
        "memory_stats": stats_s * per_seq,
    }


def summarize(num_seqs: int, rounds: list[dict], steps: int) -> dict:
    """One row of the table: each figure's median over the rounds, and the step's spread."""
    step = [r["step"] for r in rounds]
    return {
        "num_seqs": num_seqs,
        "steps": steps,
        "rounds": len(rounds),
        "step_us_per_seq": statistics.median(step),
        "step_us_min": min(step),
        "step_us_max": max(step),
        "schedule_us_per_seq": statistics.median(r["schedule"] for r in rounds),
        "admit_us_per_seq": statistics.median(r["admit"] for r in rounds),
        "device_stats_us_per_seq": None
        if rounds[0]["device_stats"] is None
        else statistics.median(r["device_stats"] for r in rounds),
        "memory_stats_us_per_seq": statistics.median(r["memory_stats"] for r in rounds),
    }


def profile(num_seqs: int, args: argparse.Namespace, top: int = 15) -> dict:
    """Where a steady-state step's time goes (cProfile, sorted by own time), at `num_seqs` sequences."""
    engine, _ = steady_engine(
        num_seqs,
        args.prompt_len,
        args.steps,
        args.warmup,
        args.block_size,
        args.prefix_caching,
        args.waiting,
    )
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        engine.step()
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (path, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        rows.append(
            {
                "function": f"{os.path.relpath(path) if path.startswith('/') else path}:{line}({name})",
                "calls_per_step": ncalls / args.steps,
                "own_us_per_step": tottime / args.steps * 1e6,
                "cumulative_us_per_step": cumtime / args.steps * 1e6,
            }
        )
    rows.sort(key=lambda r: r["own_us_per_step"], reverse=True)
    return {
        "num_seqs": num_seqs,
        # Python and builtin calls a sequence's share of a step makes: what the time is made of
        "calls_per_seq_step": stats.total_calls / args.steps / num_seqs,
        "top": rows[:top],
    }


def run(args: argparse.Namespace, command: str = "") -> dict:
    """Every N of the sweep, measured; the report that the table and the JSON show."""
    date = utc_now()
    order = [(r, n) for r in range(args.rounds) for n in rotated(args.num_seqs, r)]
    measured: dict[int, list[dict]] = {n: [] for n in args.num_seqs}
    for _, n in tqdm(
        order, desc="measurements", file=sys.stderr, disable=args.no_progress
    ):
        measured[n].append(measure(n, args))
    rows = [summarize(n, measured[n], args.steps) for n in args.num_seqs]
    goal_row = next((r for r in rows if r["num_seqs"] == GOAL_SEQS), None)
    return {
        "benchmark": BENCHMARK,
        "command": command,
        "machine": machine(),
        "date": date,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "config": {
            "prompt_len": args.prompt_len,
            "block_size": args.block_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "prefix_caching": args.prefix_caching,
            "waiting": args.waiting,
            "rounds": args.rounds,
        },
        "rows": rows,
        "goal": goal(goal_row),
        "profile": profile(max(args.num_seqs), args) if args.profile else None,
    }


def goal(row: dict | None) -> dict:
    """The verdict at GOAL_SEQS sequences: the median step over the peer's recorded figure."""
    verdict = {
        "goal": f"at most {GOAL_RATIO:g}x {PEER}'s {PEER_US_PER_SEQ_STEP} us per "
        f"sequence-step at {GOAL_SEQS} sequences",
        "peer": PEER,
        "peer_us": PEER_US_PER_SEQ_STEP,
        "peer_how": PEER_HOW,
        "value_us": None,
        "ratio": None,
        "met": None,
    }
    if row is not None:
        verdict["value_us"] = row["step_us_per_seq"]
        verdict["ratio"] = row["step_us_per_seq"] / PEER_US_PER_SEQ_STEP
        verdict["ratio_min"] = row["step_us_min"] / PEER_US_PER_SEQ_STEP
        verdict["ratio_max"] = row["step_us_max"] / PEER_US_PER_SEQ_STEP
        verdict["met"] = verdict["ratio"] <= GOAL_RATIO
    return verdict


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_table(report: dict) -> str:
    """The report as header lines and a Markdown table (they paste into docs/engine/benchmarks.md)."""
    c = report["config"]
    lines = [
        f"command: {report['command']}",
        f"machine: {report['machine']}; Python {report['python']}; torch {report['torch']}; "
        f"date {report['date']}",
        f"null model; prompts of {c['prompt_len']} tokens, block size {c['block_size']}, prefix caching "
        f"{'on' if c['prefix_caching'] else 'off'}; {c['waiting']} more request(s) waiting; "
        f"mean over {c['steps']} decode steps after {c['warmup']}; "
        f"median of {c['rounds']} round(s), the order of N rotated each round",
        "",
        "| sequences | step us/seq (min-max) | schedule() us/seq | admission us/seq "
        "| device_stats() us/seq | memory_stats() us/seq |",
        "|--:|--:|--:|--:|--:|--:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['num_seqs']} | {r['step_us_per_seq']:.2f} ({r['step_us_min']:.2f}-"
            f"{r['step_us_max']:.2f}) | {r['schedule_us_per_seq']:.2f} "
            f"| {r['admit_us_per_seq']:.2f} "
            f"| {_us(r['device_stats_us_per_seq'])} | {r['memory_stats_us_per_seq']:.2f} |"
        )
    verdict = report["goal"]
    if verdict["value_us"] is not None:
        met = "met" if verdict["met"] else "not met"
        lines += [
            "",
            f"goal (stated, not asserted): {verdict['goal']}: {verdict['value_us']:.2f} us, "
            f"{verdict['ratio']:.2f}x (rounds {verdict['ratio_min']:.2f}-"
            f"{verdict['ratio_max']:.2f}x) ({met})",
            f"peer figure: {verdict['peer_how']}",
        ]
    if report["profile"]:
        p = report["profile"]
        lines += [
            "",
            f"profile: one steady step at {p['num_seqs']} sequences (cProfile, so slower than above); "
            f"{p['calls_per_seq_step']:.1f} calls per sequence-step; by own time:",
            "",
            "| function | calls/step | own us/step | cumulative us/step |",
            "|---|--:|--:|--:|",
        ]
        for r in p["top"]:
            lines.append(
                f"| `{r['function']}` | {r['calls_per_step']:.0f} | {r['own_us_per_step']:.0f} "
                f"| {r['cumulative_us_per_step']:.0f} |"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-seqs", nargs="+", type=positive, default=[1, 64, 1024])
    parser.add_argument("--prompt-len", type=positive, default=16)
    parser.add_argument("--block-size", type=positive, default=16)
    parser.add_argument(
        "--steps", type=positive, default=50, help="timed decode steps (default 50)"
    )
    parser.add_argument(
        "--warmup", type=int, default=5, help="decode steps before timing (default 5)"
    )
    parser.add_argument(
        "--rounds",
        type=positive,
        default=5,
        help="rounds; each measures every N once, the order rotated by one each round "
        "(default 5)",
    )
    parser.add_argument(
        "--prefix-caching", action="store_true", help="hash full blocks as they fill"
    )
    parser.add_argument(
        "--waiting",
        type=int,
        default=0,
        help="requests queued behind the N that max_num_seqs keeps waiting: a server at "
        "capacity (default 0)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile a step at the largest N"
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
        "scheduler_overhead.py", argv, parse_args, run, format_table
    )


if __name__ == "__main__":
    raise SystemExit(main())
