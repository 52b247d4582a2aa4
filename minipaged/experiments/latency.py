"""Latency against request rate: the sweep behind the serving and decoding experiments.

OS idea: a server's response time stays flat while it is lightly loaded and grows without bound
as the arrival rate nears its service rate (the knee of a queue's curve, 1 / (mu - lambda) for
M/M/1); capacity planning reads the highest rate a system sustains off that knee, at a latency
target (Jain, "The Art of Computer Systems Performance Analysis", ch. 30-31). KV counterpart: vLLM
paper section 6.1, "Metrics": the mean normalized latency, each request's end-to-end latency
divided by its output length (s/token), against the request rate; Figs. 12 and 14 plot it, and
section 6.2 compares the rates that systems sustain "while maintaining similar latencies".

How one point is measured: the requests that arrive in [0, window) (a Poisson process at the
rate) are all served to completion on the simulated clock (simulator.py, the engine's own loop
priced by the cost model), and the latency of every one of them counts. An overloaded system's
queue grows for the whole window, so its latency explodes instead of requests being dropped.
The requests are the same at every rate of a sweep: their lengths come from the seed, and only
the arrival times scale with 1 / rate.

A sweep runs a grid of rates, lowest first, for one system, and stops once the normalized
latency passes CAP (well above THRESHOLD): the higher rates would only take longer to say
the same. `max_rate` reads the knee: the highest rate of the grid before the first whose
normalized latency reaches THRESHOLD.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from minipaged.experiments.cost_model import CostModel
from minipaged.experiments.simulator import simulate

# 0.1 s/token: Fig. 12's curves sit flat near its floor (a few hundredths of a second per token)
# and are on their way up once they pass a tenth of a second, 2-4x the unloaded latency here.
THRESHOLD = 0.1  # s/token
CAP = 0.5  # s/token: a sweep stops after the first rate past it
MAX_MODEL_LEN = 2048  # OPT's context
# model -> (GPU, tensor-parallel GPUs): the paper's Table 1
SETUPS = {
    "opt-13b": ("A100-40GB", 1),
    "opt-66b": ("A100-40GB", 4),
    "opt-175b": ("A100-80GB", 8),
}
ROW_KEYS = (
    "system",
    "workload",
    "rate",
    "normalized_latency",
    "throughput",
    "mean_batch_size",
)
SUMMARY_KEYS = ("system", "workload", "max_rate")


def setup(model: str) -> tuple[CostModel, int]:
    """The cost model of `model` on the paper's GPUs, and its KV pool in token slots.

    The pool is the cost model's kv_cache_tokens(0.9), vLLM's own sizing rule, so that one rule
    serves all three models: for OPT-13B on an A100-40GB it gives 15,837 slots, 5.6% more than
    serving.KV_SLOTS (the paper's rounded 12 GB).

    Raises:
        ValueError: naming `model`, for a model not in SETUPS.
    """
    if model not in SETUPS:
        raise ValueError(f"model must be one of {', '.join(SETUPS)}, got {model!r}")
    gpu, tp = SETUPS[model]
    cost = CostModel(model, gpu, tp)
    return cost, cost.kv_cache_tokens()


def arrivals(
    make: Callable[[int, float], object], rate: float, window: float, num: int
) -> list:
    """The requests of `make(num, rate)` that arrive in [0, window).

    Raises:
        ValueError: if the last of the `num` requests arrives before `window`: ask for more.
    """
    requests = list(make(num, rate))
    if requests[-1].arrival_time < window:
        raise ValueError(
            f"{num} requests at {rate} requests/s end before {window} s: ask for more"
        )
    return [r for r in requests if r.arrival_time < window]


def num_requests(max_rate: float, window: float) -> int:
    """Enough requests for the highest rate to arrive past `window` (Poisson: mean + 30% + 20)."""
    return math.ceil(max_rate * window * 1.3) + 20


def measure(
    requests: list,
    allocator: str,
    cost: CostModel,
    kv_slots: int,
    seed: int,
    **settings: Any,
) -> dict:
    """Serve `requests` to completion; the point's normalized latency, throughput and batch.

    `settings` go to simulate (enable_prefix_caching=True, for example)."""
    result = simulate(
        requests, allocator, kv_slots=kv_slots, max_model_len=MAX_MODEL_LEN, cost_model=cost, seed=seed,
        **settings,
    )  # fmt: skip
    return {
        "normalized_latency": statistics.fmean(
            f.normalized_latency for f in result.finished
        ),
        "throughput": result.throughput,
        "mean_batch_size": result.mean_batch_size,
    }


def sweep(
    system: str,
    allocator: str,
    workload: str,
    requests_at: Callable[[float], list],
    rates: tuple[float, ...],
    cost: CostModel,
    kv_slots: int,
    seed: int,
    on_point: Callable[[], None] = lambda: None,
    **settings: Any,
) -> list[dict]:
    """One system's rows over `rates` (ascending), stopping after the first past CAP.

    Args:
        system: its name in the rows ("vLLM", "Orca (Oracle)", ...).
        allocator: the simulator's allocator for it ("paged", "orca-oracle", ...).
        workload: the workload's name in the rows.
        requests_at: rate -> the requests that arrive in the window at that rate.
        rates: the grid, lowest first.
        cost: the cost model that prices each step.
        kv_slots: the KV pool, in token slots.
        seed: the simulator's seed.
        on_point: called after each point (a progress bar's update).
        **settings: more keyword arguments of simulate, for every point.

    Returns:
        Rows with exactly ROW_KEYS; throughput is requests finished per simulated second.
    """
    rows = []
    for rate in rates:
        point = measure(requests_at(rate), allocator, cost, kv_slots, seed, **settings)
        rows.append({"system": system, "workload": workload, "rate": rate, **point})
        on_point()
        if point["normalized_latency"] > CAP:
            break
    return rows


def sweep_all(
    curves: dict[str, Callable[[float], list]],
    rates: dict[str, tuple[float, ...]],
    systems: dict[str, str | tuple[str, dict]],
    cost: CostModel,
    kv_slots: int,
    seed: int,
    desc: str,
    progress: bool,
) -> list[dict]:
    """Every system's sweep on every curve, curve by curve, under one progress bar.

    Args:
        curves: workload name -> rate -> the requests that arrive in the window at that rate.
        rates: workload name -> its grid, lowest first.
        systems: name in the rows -> the simulator's allocator, or (allocator, more simulate
            settings such as enable_prefix_caching=True).
        cost: prices each step (as sweep's).
        kv_slots: the KV pool, in token slots.
        seed: the simulator's seed.
        desc: the progress bar's label.
        progress: whether to show it.

    Returns:
        The points of every sweep (ROW_KEYS), workload by workload, system by system.
    """
    rows: list[dict] = []
    total = len(systems) * sum(len(rates[w]) for w in curves)
    with tqdm(total=total, desc=desc, disable=not progress) as bar:
        for workload, requests_at in curves.items():
            for system, spec in systems.items():
                allocator, settings = (spec, {}) if isinstance(spec, str) else spec
                points = sweep(
                    system, allocator, workload, requests_at, rates[workload], cost, kv_slots, seed,
                    on_point=lambda: bar.update(1), **settings,
                )  # fmt: skip
                # the rates past CAP, not run
                bar.update(len(rates[workload]) - len(points))
                rows += points
    return rows


def sweep_settings(
    scale: str, seed: int, model: str, cost: CostModel, kv_slots: int, windows: dict
) -> dict:
    """What a latency experiment's `result.settings` records: the run, the setup, the measure."""
    return {
        "scale": scale,
        "seed": seed,
        "model": model,
        "gpu": cost.gpu.name,
        "tensor_parallel_size": cost.tensor_parallel_size,
        "kv_slots": kv_slots,
        "threshold": THRESHOLD,
        "cap": CAP,
        "window_s": windows,
    }


def max_rate(rows: list[dict], threshold: float = THRESHOLD) -> float:
    """The highest rate before the first whose normalized latency reaches `threshold`.

    `rows` are one system's on one workload, in any order; 0.0 if even the lowest rate is over.
    """
    best = 0.0
    for row in sorted(rows, key=lambda r: r["rate"]):
        if row["normalized_latency"] >= threshold:
            break
        best = row["rate"]
    return best


def summaries(rows: list[dict], threshold: float = THRESHOLD) -> list[dict]:
    """One row per (system, workload) of `rows`, in their order: SUMMARY_KEYS, with max_rate."""
    pairs = dict.fromkeys((r["system"], r["workload"]) for r in rows if "rate" in r)
    return [
        {
            "system": system,
            "workload": workload,
            "max_rate": max_rate([r for r in rows if (r["system"], r["workload"]) == (system, workload)
                                  and "rate" in r], threshold),
        }
        for system, workload in pairs
    ]  # fmt: skip


def split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """A result's rows split into the measured points and the summaries (which have max_rate)."""
    return [r for r in rows if "max_rate" not in r], [
        r for r in rows if "max_rate" in r
    ]


def plot_latency(
    rows: list[dict],
    path,
    title: str,
    colors: dict[str, str],
    threshold: float = THRESHOLD,
    nrows: int = 1,
) -> None:
    """Normalized latency against rate, one panel per workload (in `nrows` rows, in the rows'
    order), one line per system; the y axis runs to 10x `threshold` (the dotted line)."""
    from minipaged.experiments.plotting import legend, new_figure, savefig

    points, _ = split(rows)
    workloads = list(dict.fromkeys(r["workload"] for r in points))
    fig, axes = new_figure(-(-len(workloads) // nrows), title=title, nrows=nrows)
    for ax, workload in zip(axes, workloads, strict=True):
        for system, color in colors.items():
            series = sorted((r["rate"], r["normalized_latency"]) for r in points
                            if r["system"] == system and r["workload"] == workload)  # fmt: skip
            if series:
                ax.plot(
                    *zip(*series, strict=True),
                    "o-",
                    color=color,
                    markersize=3,
                    label=system,
                )
        ax.axhline(
            threshold, linestyle=":", color="black", linewidth=1, label="threshold"
        )
        ax.set_ylim(0, 10 * threshold)
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel("normalized latency (s/token)")
        ax.set_title(workload)
        legend(ax)
    savefig(fig, path)


__all__ = [
    "CAP",
    "ROW_KEYS",
    "SETUPS",
    "SUMMARY_KEYS",
    "THRESHOLD",
    "arrivals",
    "max_rate",
    "measure",
    "num_requests",
    "plot_latency",
    "setup",
    "split",
    "summaries",
    "sweep",
    "sweep_all",
    "sweep_settings",
]
