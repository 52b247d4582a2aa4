"""Sharing: the memory that parallel sampling and beam search save by sharing blocks (section 6.3).

OS idea: fork() shares the parent's frames with the child, copy-on-write, so a tree of processes
that run the same code holds one copy of what they have in common; a frame is copied only when one
of them writes it (OSTEP ch. 5, 23). KV counterpart: vLLM paper sections 4.4 and 6.3, Fig. 15: the n
samples of a request share its prompt's blocks, and the beams of a beam search share their common
history, which is long since beams descend from few ancestors; the paper saves 6.1%-9.8% of the
blocks with parallel sampling and 37.6%-55.2% with beam search on Alpaca (16.2%-30.5% and
44.3%-66.3% on ShareGPT).

What is measured: the Alpaca-like and the ShareGPT-like workloads (minipaged.workloads), each request
sampling n = 2, 4, 6 sequences or beam searching with width 2, 4, 6, served with paged allocation
(the real BlockManager: fork, copy-on-write, free) on 15,000 token slots, through the engine's own
loop with steps priced by the cost model (serving.py). Beam search runs the engine's real beam step
over the simulated runner's seeded null-policy scores (experiments/simulated_runner.py): each step
keeps the W best of the beams' candidates by cumulative log-probability, forks a beam chosen twice
and frees one not chosen. At every step, the blocks the sequences' block tables would hold without
sharing are the sum of the tables' lengths; the blocks held are those in use; the saving is their
difference over the former, Fig. 15's "blocks saved by sharing divided by the total blocks without
sharing", averaged over the steps of a window that leaves out the warm-up. One row per (workload,
mode, width):

- saving: that average; saving_of_totals: the window's blocks saved over its blocks without
  sharing, summed over steps (the long steps of a crowded pool weigh more);
- mean_blocks_used, mean_blocks_unshared: blocks held, and blocks the tables would hold unshared;
- mean_batch_size, mean_seqs: requests and sequences running; max_seqs: the most sequences a step
  of the window ran (never above the scheduler's max_num_seqs, 256); mean_waiting: requests arrived
  and not running; mean_step_s: the mean priced step, in seconds; cow_copies: blocks copied on write
  (whole run); preemptions (in the window);
- prompt_block_share: what the workload's lengths let n samples share (prompt_block_share below); the
  rule of thumb for parallel sampling is (n - 1) / n times it;
- workload, mode ("parallel" or "beam"), width, rate, kv_slots, window_s.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from tqdm import tqdm

from minipaged.experiments import ExperimentResult, check_run_args
from minipaged.experiments.batch_size import mean_step_s
from minipaged.experiments.serving import BLOCK_SIZE, KV_SLOTS, serve
from minipaged.workloads import (
    alpaca_like,
    sharegpt_like,
    with_beam_search,
    with_parallel_sampling,
)

NAME = "sharing"
WIDTHS = (2, 4, 6)
MODES = {"parallel": with_parallel_sampling, "beam": with_beam_search}
# Requests/s, so that most runs wait: Alpaca-like is about what paged serves with n = 2 samples;
# ShareGPT-like is batch-size's 2 requests/s, past what paged serves with samples at any width.
WORKLOADS = {"alpaca-like": (alpaca_like, 30.0), "sharegpt-like": (sharegpt_like, 2.0)}

PAPER = {
    "section": "6.3",
    "figure": "15",
    "setup": "OPT-13B on an NVIDIA A100 (40 GB); n = 2, 4, 6 samples, beam widths 2, 4, 6",
    "saving_percent": {
        "alpaca": {"parallel": [6.1, 9.8], "beam": [37.6, 55.2]},
        "sharegpt": {"parallel": [16.2, 30.5], "beam": [44.3, 66.3]},
    },
    "finding": (
        "Memory saving, computed as the blocks saved by sharing divided by the blocks without "
        "sharing: 6.1% - 9.8% with parallel sampling and 37.6% - 55.2% with beam search on Alpaca; "
        "16.2% - 30.5% and 44.3% - 66.3% on ShareGPT. Beam search shares more, and vLLM's gain over "
        "Orca (Oracle) on OPT-13B and Alpaca grows from 1.3x with basic sampling to 2.3x with beam "
        "search of width 6."
    ),
}


@dataclass(frozen=True)
class Scale:
    """How much work one run does; "small" keeps the rows and keys of "full"."""

    end: dict[str, float]  # simulated seconds served, per workload
    warmup: dict[str, float]  # seconds left out at the start, per workload


SCALES = {
    "small": Scale(
        {"alpaca-like": 15.0, "sharegpt-like": 45.0},
        {"alpaca-like": 5.0, "sharegpt-like": 15.0},
    ),
    "full": Scale(
        {"alpaca-like": 120.0, "sharegpt-like": 300.0},
        {"alpaca-like": 20.0, "sharegpt-like": 50.0},
    ),
}


def _blocks_up_to(num_tokens: int, block_size: int) -> int:
    """sum of ceil(l / block_size) for l = 1 .. num_tokens, in closed form."""
    q, r = divmod(num_tokens, block_size)
    return block_size * q * (q + 1) // 2 + r * (q + 1)


def prompt_block_share(workload, block_size: int = BLOCK_SIZE) -> float:
    """The prompt's full blocks over all the blocks of one sequence, both summed over every step of
    every request: the share of its blocks that a sample can share with its siblings.

    A sequence of prompt p and output o holds ceil((p + t) / block_size) blocks at its step t = 0 ..
    o - 1, of which the p // block_size full prompt blocks are shared (the partial last prompt block
    is copied on the first write). Summing blocks, not ratios, weighs long sequences as the pool
    does; with n samples, (n - 1) / n of the shared blocks are saved. Nothing is simulated.
    """
    shared = sum((r.prompt_len // block_size) * r.output_len for r in workload)
    held = sum(
        _blocks_up_to(r.prompt_len + r.output_len - 1, block_size)
        - _blocks_up_to(r.prompt_len - 1, block_size)
        for r in workload
    )
    return shared / held


def row(
    workload: str, mode: str, width: int, rate: float, window_s: float, result
) -> dict:
    """One row: what sharing saved over a window of one run."""
    records = [r for r in result.records if r.blocks_used]
    unshared = [r.blocks_used + r.blocks_saved_by_sharing for r in records]
    saved = sum(r.blocks_saved_by_sharing for r in records)
    return {
        "workload": workload,
        "mode": mode,
        "width": width,
        "rate": rate,
        "kv_slots": KV_SLOTS,
        "window_s": window_s,
        "saving": result.mean_sharing_saving,
        "saving_of_totals": saved / sum(unshared) if unshared else 0.0,
        "mean_blocks_used": statistics.fmean(r.blocks_used for r in records)
        if records
        else 0.0,
        "mean_blocks_unshared": statistics.fmean(unshared) if unshared else 0.0,
        "mean_batch_size": result.mean_batch_size,
        "mean_seqs": statistics.fmean(r.num_seqs for r in result.records)
        if result.records
        else 0.0,
        "max_seqs": max((r.num_seqs for r in result.records), default=0),
        "mean_waiting": result.mean_waiting,
        "mean_step_s": mean_step_s(result),
        "cow_copies": result.cow_copies,
        "preemptions": result.num_preemptions,
    }


def run(scale: str = "full", seed: int = 0, progress: bool = True) -> ExperimentResult:
    """Blocks saved by sharing, parallel sampling and beam search of widths 2, 4, 6 (Fig. 15).

    Args:
        scale: "full" (Alpaca-like at 30 requests/s for 120 simulated seconds, ShareGPT-like at 2
            requests/s for 300; several minutes) or "small" (15 and 45 seconds; under a minute).
        seed: the workloads' lengths and arrival times, and the null policy's scores.
        progress: a tqdm bar over the runs.

    Raises:
        ValueError: for a scale other than "small" or "full", or a negative seed.
    """
    check_run_args(scale, seed, SCALES)
    config = SCALES[scale]
    rows = []
    total = len(WORKLOADS) * len(MODES) * len(WIDTHS)
    with tqdm(total=total, desc=NAME, disable=not progress) as bar:
        for name, (make, rate) in WORKLOADS.items():
            end, warmup = config.end[name], config.warmup[name]
            # arrivals outlast the run
            base = make(int(rate * end * 1.2) + 20, rate=rate, seed=seed)
            share = prompt_block_share(base)
            for mode, widen in MODES.items():
                for width in WIDTHS:
                    result = serve(widen(base, width), "paged", end, warmup, seed=seed)
                    rows.append(row(name, mode, width, rate, end - warmup, result))
                    rows[-1]["prompt_block_share"] = share
                    bar.update(1)
    return ExperimentResult(NAME, rows, dict(PAPER))


def plot(result: ExperimentResult, path) -> None:
    """One panel per workload: the saving against the width, with the paper's ranges shaded."""
    from minipaged.experiments.plotting import legend, new_figure, savefig

    colors = {"parallel": "tab:blue", "beam": "tab:orange"}
    workloads = list(dict.fromkeys(r["workload"] for r in result.rows))
    title = "Memory saved by sharing blocks (cf. Fig. 15)"
    fig, axes = new_figure(len(workloads), title=title)
    paper = result.paper.get("saving_percent", {})
    for ax, workload in zip(axes, workloads, strict=True):
        ranges = paper.get(workload.removesuffix("-like"), {})
        for mode, color in colors.items():
            rows = sorted(
                (
                    r
                    for r in result.rows
                    if r["workload"] == workload and r["mode"] == mode
                ),
                key=lambda r: r["width"],
            )
            name = "parallel sampling" if mode == "parallel" else "beam search"
            ax.plot(
                [r["width"] for r in rows],
                [100 * r["saving"] for r in rows],
                "o-",
                color=color,
                label=name,
            )
            if mode in ranges:
                low, high = ranges[mode]
                ax.axhspan(
                    low,
                    high,
                    color=color,
                    alpha=0.15,
                    label=f"paper: {name}, its range",
                )
        ax.set_xticks(list(WIDTHS))
        ax.set_xlabel("samples n, or beam width")
        ax.set_ylim(0, 100)
        ax.set_ylabel("blocks saved (% of blocks unshared)")
        ax.set_title(workload)
    # the same four entries in every panel: said once, beside them
    legend(axes[-1], outside=True)
    savefig(fig, path)


__all__ = ["PAPER", "SCALES", "plot", "prompt_block_share", "run"]
