"""Batch size: how many requests each allocator runs at once on one KV budget (vLLM paper section 6.2).

OS idea: the degree of multiprogramming, how many processes are resident at once, is bounded by
memory: the less each process wastes, the more fit, and the more work the machine does per unit of
time (OSTEP ch. 13, 21-22). KV counterpart: vLLM paper section 6.2, Fig. 13a: serving ShareGPT on
OPT-13B at 2 requests/s, vLLM batches 2.2x more requests than Orca (Oracle) and 4.3x more than
Orca (Max); Fig. 12: it sustains 1.7x-2.7x the request rate of Orca (Oracle) and 2.7x-8x that of
Orca (Max) at similar latency.

What is measured: the ShareGPT-like workload served on 15,000 token slots (serving.py) by each
allocator at several Poisson arrival rates, for a fixed simulated duration, through the engine's own
loop with steps priced by the cost model (serving.COST_MODEL: OPT-13B on an A100-40GB) and the Orca
ranges placed by buddy allocation; the averages leave out the warm-up. The same requests at every
rate (the workload's seed fixes their lengths; only the arrival times scale). One row per (rate,
allocator):

- mean_batch_size: running requests per step; mean_waiting: arrived requests not running;
- requests_arrived, requests_finished: in the window; throughput_rps: finished per simulated second;
- preemptions: in the window (paged and vAttention preempt by recompute when blocks run out);
- mean_step_s: the window's steps' mean price in seconds (Little's law: a request that never waits
  spends about output_len of them in the system);
- prefill_tokens, recomputed_tokens: prompt tokens computed in the window, and of those the ones
  computed again after a preemption (the cost model charges them as it charges every token);
- allocator, label, rate, kv_slots, window_s.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from tqdm import tqdm

from minipaged.experiments import ExperimentResult, check_run_args
from minipaged.experiments.serving import (
    ALLOCATORS,
    KV_SLOTS,
    LABELS,
    PAPER_LABELS,
    arrived,
    serve,
    sharegpt_load,
)

NAME = "batch-size"
PAPER_RATE = 2.0  # requests/s: Fig. 13a's

PAPER = {
    "section": "6.2",
    "figure": "13a",
    "setup": "OPT-13B on an NVIDIA A100 (40 GB), ShareGPT at 2 requests/s",
    "mean_batch_size": {
        "Orca (Max)": 7.00,
        "Orca (Pow2)": 9.81,
        "Orca (Oracle)": 13.62,
        "vLLM": 30.42,
    },
    "vllm_batch_vs": {"Orca (Oracle)": 2.2, "Orca (Max)": 4.3},
    "sustained_rate_vs_orca_oracle": "1.7x-2.7x (Fig. 12, ShareGPT, three models)",
    "sustained_rate_vs_orca_max": "2.7x-8x",
    "finding": (
        "vLLM's PagedAttention manages the memory efficiently and so batches more requests than Orca: "
        "for OPT-13B on ShareGPT, 2.2x more requests at the same time than Orca (Oracle) and 4.3x "
        "more than Orca (Max); it sustains 1.7x-2.7x higher request rates than Orca (Oracle) and "
        "2.7x-8x higher than Orca (Max) at similar latencies."
    ),
}


def mean_step_s(result) -> float:
    """Seconds a step of the window takes on average: the cost model's prices (or the null step)."""
    return (
        statistics.fmean(r.duration for r in result.records) if result.records else 0.0
    )


@dataclass(frozen=True)
class Scale:
    """How much work one run does; "small" keeps the rows and keys of "full"."""

    rates: tuple[float, ...]  # requests/s
    end: float  # simulated seconds served at each rate
    warmup: float  # seconds left out at the start


SCALES = {
    "small": Scale((1.0, 2.0, 3.0), 150.0, 50.0),
    "full": Scale((0.5, 1.0, 1.5, 2.0, 2.5, 3.0), 1_000.0, 100.0),
}


def run(scale: str = "full", seed: int = 0, progress: bool = True) -> ExperimentResult:
    """Batch size and throughput per allocator at each arrival rate, on one KV budget.

    Args:
        scale: "full" (rates 0.5 to 3 requests/s, 1,000 simulated seconds each, the first 100 left
            out; a few minutes) or "small" (rates 1, 2 and 3, 150 seconds, the first 50 left
            out; a few seconds).
        seed: the workload's lengths and arrival times.
        progress: a tqdm bar over the (rate, allocator) runs.

    Raises:
        ValueError: for a scale other than "small" or "full", or a negative seed.
    """
    check_run_args(scale, seed, SCALES)
    config = SCALES[scale]
    window = config.end - config.warmup
    rows = []
    with tqdm(
        total=len(config.rates) * len(ALLOCATORS), desc=NAME, disable=not progress
    ) as bar:
        for rate in config.rates:
            workload = sharegpt_load(rate, config.end, seed, max(config.rates))
            for allocator in ALLOCATORS:
                result = serve(
                    workload, allocator, config.end, config.warmup, seed=seed
                )
                rows.append(
                    {
                        "allocator": allocator,
                        "label": LABELS[allocator],
                        "rate": rate,
                        "kv_slots": KV_SLOTS,
                        "window_s": window,
                        "mean_batch_size": result.mean_batch_size,
                        "mean_waiting": result.mean_waiting,
                        "requests_arrived": arrived(
                            workload, config.warmup, config.end
                        ),
                        "requests_finished": result.num_finished,
                        "throughput_rps": result.num_finished / window,
                        "mean_step_s": mean_step_s(result),
                        "preemptions": result.num_preemptions,
                        "prefill_tokens": result.prefill_tokens,
                        "recomputed_tokens": result.recomputed_tokens,
                    }
                )
                bar.update(1)
    return ExperimentResult(NAME, rows, dict(PAPER))


def plot(result: ExperimentResult, path) -> None:
    """Two panels: (a) mean batch size at 2 requests/s, ours beside the paper's; (b) throughput
    against the offered rate, per allocator."""
    from minipaged.experiments.plotting import legend, new_figure, savefig

    colors = dict(
        zip(
            ALLOCATORS,
            ["tab:red", "tab:orange", "tab:purple", "tab:gray", "tab:blue"],
            strict=True,
        )
    )
    fig, (bar_ax, rate_ax) = new_figure(
        2, title="Batch size and throughput on one KV budget (cf. Figs. 12-13)"
    )
    rates = sorted({r["rate"] for r in result.rows})
    shown = PAPER_RATE if PAPER_RATE in rates else rates[len(rates) // 2]
    rows = [r for r in result.rows if r["rate"] == shown]
    paper = result.paper.get("mean_batch_size", {})
    x = list(range(len(rows)))
    bar_ax.bar(
        [i - 0.2 for i in x],
        [r["mean_batch_size"] for r in rows],
        0.4,
        color="tab:blue",
        label="measured",
    )
    papers = [paper.get(PAPER_LABELS.get(r["allocator"], r["label"])) for r in rows]
    bar_ax.bar(
        [i + 0.2 for i, v in zip(x, papers, strict=True) if v is not None],
        [v for v in papers if v is not None],
        0.4,
        color="tab:gray",
        label="paper (Fig. 13a)",
    )
    for i, r in enumerate(rows):
        bar_ax.text(
            i - 0.2,
            r["mean_batch_size"],
            f"{r['mean_batch_size']:.1f}",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    bar_ax.set_xticks(x, [r["label"].replace(" (", "\n(") for r in rows], fontsize=8)
    bar_ax.set_ylabel("mean batch size (requests)")
    bar_ax.set_title(f"(a) batch size at {shown:g} requests/s")
    legend(bar_ax)
    for allocator in ALLOCATORS:
        series = sorted(
            (r["rate"], r["throughput_rps"])
            for r in result.rows
            if r["allocator"] == allocator
        )
        rate_ax.plot(
            *zip(*series, strict=True),
            "o-",
            color=colors[allocator],
            label=LABELS[allocator],
        )
    rate_ax.plot(
        rates, rates, ":", color="black", linewidth=1, label="throughput = rate"
    )
    rate_ax.set_xlabel("arrival rate (requests/s)")
    rate_ax.set_ylabel("requests finished per second")
    rate_ax.set_title("(b) throughput against the offered load")
    legend(rate_ax)
    savefig(fig, path)


__all__ = ["PAPER", "SCALES", "mean_step_s", "plot", "run"]
