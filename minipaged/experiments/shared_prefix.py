"""Shared prefix: the blocks and the prefill that prefix caching saves (vLLM paper section 6.4).

OS idea: a shared library is mapped once, read-only, into every process that uses it, and the page
cache keeps a file's pages after the last process closes it, so the next one finds them in memory
(OSTEP ch. 22-23). KV counterpart: vLLM paper sections 4.4 and 6.4, Fig. 16: translation requests
start with the same few-shot prompt, a 1-shot prefix of 80 tokens or a 5-shot prefix of 341; vLLM
keeps the prefix's blocks once and maps them into every request's block table, reaching 1.67x
(1-shot) and 3.58x (5-shot) the throughput of Orca (Oracle). minipaged finds the blocks by their
chained hashes (automatic prefix caching, reference/prefix_cache.py) rather than by a declared prefix.

What is measured: requests of minipaged.workloads.shared_prefix (the prefix, then a sentence of
about 32 tokens; about 32 output tokens: our assumption, the paper gives no lengths), all arriving at
once (the most each system can serve), on 15,000 token slots (serving.py; LLaMA-13B keeps 800 KB a
token like OPT-13B), until every request has finished, through the engine's own loop with the null
model's fixed step (simulator.STEP_TIME, 40 ms whatever the batch: throughput is then what memory
allows). For each prefix length, three systems: Orca (Oracle), its ranges placed by buddy
allocation as in the paper, paged without prefix caching, paged with it. One row each:

- throughput_rps: requests / simulated seconds; throughput_vs_orca_oracle: that over Orca (Oracle)'s;
- mean_batch_size; peak_blocks, mean_blocks: KV memory held (token states, reservations, internal
  fragmentation) in blocks of 16 slots; blocks_per_request: mean_blocks / mean_batch_size;
- prefill_tokens: prompt tokens computed, recomputations included, cached ones not;
  prefill_tokens_per_request; prefix_hit_rate: full prompt blocks found cached / looked up;
- prefix_len, allocator, label, prefix_caching, requests, kv_slots, steps, duration_s, preemptions;
- part: "memory".

The throughput part (Fig. 16 itself): normalized latency against request rate (latency.py, the
sweep of the serving experiment), each step priced by the cost model of LLaMA-13B on an A100-40GB,
on that cost model's KV pool, kv_cache_tokens(0.9) = 15,409 slots (vLLM's own sizing rule, as
latency.setup sizes OPT's; 2.7% more than the memory part's 15,000, which keeps the null model's
pool). For each prefix length, two systems: vLLM (paged, prefix caching on) and Orca (Oracle). The
requests arriving in [0, window) at each rate of the grid are served to completion. Rows:

- part "rate", one per point: prefix_len, system, workload, rate (requests/s), normalized_latency
  (s/token), throughput (requests finished per simulated second), mean_batch_size;
- part "max_rate", one per system and prefix: prefix_len, system, workload, max_rate (the highest
  rate of the grid before the first at latency.THRESHOLD), max_rate_vs_orca_oracle (Orca (Oracle)'s
  own is 1.0; None if Orca (Oracle) sustains no rate of the grid) and paper_vs_orca_oracle (Fig. 16).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from tqdm import tqdm

from minipaged.experiments import ExperimentResult, check_run_args
from minipaged.experiments import latency as lat
from minipaged.experiments.cost_model import CostModel
from minipaged.experiments.serving import BLOCK_SIZE, KV_SLOTS, MAX_MODEL_LEN
from minipaged.experiments.simulator import STEP_TIME, simulate
from minipaged.workloads import shared_prefix

NAME = "shared-prefix"
PREFIX_LENS = (80, 341)  # the paper's 1-shot and 5-shot prefixes (Fig. 16)
SYSTEMS = (  # (allocator, prefix caching, label)
    ("orca-oracle", False, "Orca (Oracle)"),
    ("paged", False, "paged, no prefix caching"),
    ("paged", True, "paged + prefix caching"),
)

# the throughput part: name in the rows -> (allocator, more settings of simulate)
RATE_SYSTEMS = {
    "Orca (Oracle)": ("orca-oracle", {}),
    "vLLM": ("paged", {"enable_prefix_caching": True}),
}
MODEL, GPU = "llama-13b", "A100-40GB"  # the paper's section 6.4 setup
# The E24 series (resistor values, about 10% apart) from 10 to 300 requests/s: a max_rate, so a
# ratio, is known to about 10% wherever the knee falls; each sweep stops once past latency.CAP.
E24 = (1.0, 1.1, 1.2, 1.3, 1.5, 1.6, 1.8, 2.0, 2.2, 2.4, 2.7, 3.0, 3.3, 3.6, 3.9, 4.3, 4.7, 5.1, 5.6, 6.2,
       6.8, 7.5, 8.2, 9.1)  # fmt: skip
FULL_RATES = tuple(round(v * 10**k) for k in (1, 2) for v in E24 if v * 10**k <= 300)

PAPER = {
    "section": "6.4",
    "figure": "16",
    "setup": "LLaMA-13B on an NVIDIA A100 (40 GB), WMT16 English-to-German translation behind a shared "
    "1-shot (80 tokens) or 5-shot (341 tokens) prefix",
    "throughput_vs_orca_oracle": {"80": 1.67, "341": 3.58},
    "finding": (
        "vLLM achieves 1.67x higher throughput than Orca (Oracle) when the one-shot prefix is shared, "
        "and 3.58x when the five-shot prefix is shared: the longer the shared prefix, the more memory "
        "and computation sharing saves."
    ),
}


@dataclass(frozen=True)
class Scale:
    """How much work one run does; "small" keeps the rows and keys of "full"."""

    num_requests: int  # per prefix length, the memory part
    window: float  # simulated seconds of arrivals at each rate, the throughput part
    rates: tuple[float, ...]  # requests/s, ascending, the throughput part


SCALES = {
    "small": Scale(300, 2.0, (10.0, 20.0, 40.0, 80.0, 160.0, 320.0)),
    "full": Scale(4_000, 20.0, tuple(float(r) for r in FULL_RATES)),
}


def row(prefix_len: int, allocator: str, caching: bool, label: str, result) -> dict:
    """One row: throughput, memory and prefill of one system on one prefix length."""
    breakdowns = [r.breakdown for r in result.records]
    held = [
        (b.token_states + b.reserved + b.internal_fragmentation) / BLOCK_SIZE
        for b in breakdowns
    ]
    mean_blocks = statistics.fmean(held) if held else 0.0
    return {
        "part": "memory",
        "prefix_len": prefix_len,
        "allocator": allocator,
        "label": label,
        "prefix_caching": caching,
        "requests": result.num_requests,
        "kv_slots": KV_SLOTS,
        "steps": result.steps,
        "duration_s": result.duration,
        "throughput_rps": result.throughput,
        # filled in by run, once Orca (Oracle)'s is known
        "throughput_vs_orca_oracle": math.nan,
        "mean_batch_size": result.mean_batch_size,
        "peak_blocks": max(held, default=0.0),
        "mean_blocks": mean_blocks,
        "blocks_per_request": mean_blocks / result.mean_batch_size
        if result.records
        else 0.0,
        "prefill_tokens": result.prefill_tokens,
        "prefill_tokens_per_request": result.prefill_tokens / result.num_requests,
        "prefix_hit_rate": result.prefix_hit_rate,
        "preemptions": result.num_preemptions,
    }


def run(scale: str = "full", seed: int = 0, progress: bool = True) -> ExperimentResult:
    """Orca (Oracle) and paged with and without prefix caching, behind 80- and 341-token prefixes:
    the memory part, then the throughput part (vLLM and Orca (Oracle), latency against rate).

    Args:
        scale: "full" (4,000 requests per prefix length; 20 s of arrivals at each of the E24 rates
            from 10 to 300 requests/s; about a minute and a half) or "small" (300; 2 s at 10, 20,
            40, 80, 160 and 320; a few seconds).
        seed: the workload's lengths.
        progress: a tqdm bar over the runs.

    Raises:
        ValueError: for a scale other than "small" or "full", or a negative seed.
    """
    check_run_args(scale, seed, SCALES)
    config = SCALES[scale]
    rows = []
    with tqdm(
        total=len(PREFIX_LENS) * len(SYSTEMS), desc=NAME, disable=not progress
    ) as bar:
        for prefix_len in PREFIX_LENS:
            workload = shared_prefix(
                config.num_requests, prefix_len, seed=seed, max_model_len=MAX_MODEL_LEN
            )
            for allocator, caching, label in SYSTEMS:
                result = simulate(
                    workload,
                    allocator,
                    kv_slots=KV_SLOTS,
                    block_size=BLOCK_SIZE,
                    max_model_len=MAX_MODEL_LEN,
                    enable_prefix_caching=caching,
                    # the null model: throughput follows the batch alone
                    step_time=STEP_TIME,
                    seed=seed,
                )
                rows.append(row(prefix_len, allocator, caching, label, result))
                bar.update(1)
            oracle = rows[-len(SYSTEMS)]["throughput_rps"]
            for r in rows[-len(SYSTEMS) :]:
                r["throughput_vs_orca_oracle"] = r["throughput_rps"] / oracle
    cost = CostModel(MODEL, GPU)
    kv_slots = cost.kv_cache_tokens()
    rows += rate_rows(config, cost, kv_slots, seed, progress)
    settings = {
        "scale": scale,
        "seed": seed,
        "model": MODEL,
        "gpu": GPU,
        "kv_slots": kv_slots,
        "threshold": lat.THRESHOLD,
        "cap": lat.CAP,
        "window_s": config.window,
    }
    return ExperimentResult(NAME, rows, dict(PAPER), settings)


def rate_rows(
    config: Scale, cost: CostModel, kv_slots: int, seed: int, progress: bool
) -> list[dict]:
    """The throughput part: latency.sweep per prefix and system, then a max_rate row for each."""
    num = lat.num_requests(max(config.rates), config.window)
    curves, prefix_of = {}, {}
    for prefix_len in PREFIX_LENS:

        def make(n, rate, prefix_len=prefix_len):
            return shared_prefix(
                n, prefix_len, rate=rate, seed=seed, max_model_len=lat.MAX_MODEL_LEN
            )

        def requests_at(rate, make=make):
            return lat.arrivals(make, rate, config.window, num)

        curves[f"{prefix_len}-token prefix"] = requests_at
        prefix_of[f"{prefix_len}-token prefix"] = prefix_len
    rates = dict.fromkeys(curves, config.rates)
    sweeps = lat.sweep_all(
        curves, rates, RATE_SYSTEMS, cost, kv_slots, seed, f"{NAME} rates", progress
    )
    points = [
        {"part": "rate", "prefix_len": prefix_of[p["workload"]], **p} for p in sweeps
    ]
    rows = list(points)
    for summary in lat.summaries(points):
        prefix_len = next(
            p["prefix_len"] for p in points if p["workload"] == summary["workload"]
        )
        rows.append({"part": "max_rate", "prefix_len": prefix_len, **summary})
    for r in rows[len(points) :]:
        oracle = next(s["max_rate"] for s in rows[len(points) :]
                      if s["prefix_len"] == r["prefix_len"] and s["system"] == "Orca (Oracle)")  # fmt: skip
        r["max_rate_vs_orca_oracle"] = r["max_rate"] / oracle if oracle else None
        r["paper_vs_orca_oracle"] = (
            PAPER["throughput_vs_orca_oracle"][str(r["prefix_len"])]
            if r["system"] == "vLLM"
            else 1.0
        )
    return rows


def plot(result: ExperimentResult, path) -> None:
    """Three panels per prefix length: throughput over Orca (Oracle)'s (with the paper's vLLM), KV
    blocks held per running request, prefill tokens computed per request; then one panel per prefix
    of normalized latency against request rate (Fig. 16's own), with each system's max_rate."""
    from minipaged.experiments.plotting import legend, new_figure, savefig

    colors = dict(
        zip(
            (s[2] for s in SYSTEMS), ("tab:purple", "tab:gray", "tab:blue"), strict=True
        )
    )
    memory = [r for r in result.rows if r.get("part", "memory") == "memory"]
    points, summaries = lat.split(
        [r for r in result.rows if r.get("part") in ("rate", "max_rate")]
    )
    prefix_lens = sorted({r["prefix_len"] for r in memory})
    title = "Shared prefix: what prefix caching saves, and the rate it sustains (cf. Fig. 16)"
    fig, axes = new_figure(
        3 + (len(prefix_lens) if points else 0), title=title, panel_size=(3.6, 3.4)
    )
    panels = [
        (
            "throughput_vs_orca_oracle",
            "throughput / Orca (Oracle)'s",
            "(a) throughput, all at once",
        ),
        (
            "blocks_per_request",
            "KV blocks per running request",
            "(b) memory per request",
        ),
        (
            "prefill_tokens_per_request",
            "prompt tokens computed per request",
            "(c) prefill",
        ),
    ]
    width = 0.8 / len(SYSTEMS)
    for ax, (key, ylabel, name) in zip(axes, panels, strict=False):
        for k, (_, _, label) in enumerate(SYSTEMS):
            values = [
                next(
                    r[key]
                    for r in memory
                    if r["prefix_len"] == p and r["label"] == label
                )
                for p in prefix_lens
            ]
            xs = [
                i + (k - (len(SYSTEMS) - 1) / 2) * width
                for i in range(len(prefix_lens))
            ]
            ax.bar(xs, values, width, color=colors[label], label=label)
        ax.set_xticks(
            range(len(prefix_lens)), [f"{p}-token prefix" for p in prefix_lens]
        )
        ax.set_ylabel(ylabel)
        ax.set_title(name)
    paper = result.paper.get("throughput_vs_orca_oracle", {})
    # the paper's vLLM shares the prefix: beside our last bar
    last = (len(SYSTEMS) - 1) / 2 * width
    marks = [
        (i + last, paper[str(p)]) for i, p in enumerate(prefix_lens) if str(p) in paper
    ]
    axes[0].plot(
        [x for x, _ in marks], [v for _, v in marks], "kD", label="paper: vLLM"
    )
    legend(axes[0])
    line_colors = {"Orca (Oracle)": "tab:purple", "vLLM": "tab:red"}
    for i, (ax, prefix_len) in enumerate(zip(axes[3:], prefix_lens, strict=False)):
        for system, color in line_colors.items():
            series = sorted((r["rate"], r["normalized_latency"]) for r in points
                            if r["system"] == system and r["prefix_len"] == prefix_len)  # fmt: skip
            best = next(
                s["max_rate"]
                for s in summaries
                if s["system"] == system and s["prefix_len"] == prefix_len
            )
            ax.plot(
                *zip(*series, strict=True),
                "o-",
                color=color,
                markersize=3,
                label=system,
            )
            ax.axvline(best, color=color, linestyle="--", linewidth=1)
        ax.axhline(
            lat.THRESHOLD, linestyle=":", color="black", linewidth=1, label="threshold"
        )
        ax.set_ylim(0, lat.CAP * 1.2)
        ax.set_xlabel("request rate (requests/s); dashed: max_rate")
        ax.set_ylabel("normalized latency (s/token)")
        ax.set_title(f"({'de'[i]}) {prefix_len}-token prefix, LLaMA-13B")
        legend(ax)
    savefig(fig, path)


__all__ = ["PAPER", "PREFIX_LENS", "RATE_SYSTEMS", "SCALES", "plot", "rate_rows", "run"]
