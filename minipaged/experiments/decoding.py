"""Decoding: parallel sampling and beam search, normalized latency against rate (vLLM Fig. 14).

OS idea: fork() shares the parent's page frames with the child copy-on-write, so that N
processes from one parent cost little more memory than one until they write (OSTEP ch. 5, 23).
KV counterpart: vLLM paper section 6.3, Fig. 14: the samples of one prompt share its blocks and
the beams of a beam search share their common prefixes, so vLLM fits more requests than Orca
(Oracle), which reserves a contiguous range per sequence; the gain in sustained rate grows from
1.3x for basic sampling to 2.3x for beam search with width 6, as more is shared.

What is measured (latency.py): the Alpaca-like workload with each request sampling n = 2, 4, 6
sequences (parallel sampling) or searching with beam width 2, 4, 6, served by vLLM (paged) and
Orca (Oracle) on OPT-13B's KV pool of an A100-40GB, each step priced by the cost model. Rows, as
in serving_latency.py: a point (system, workload, rate, normalized_latency, throughput,
mean_batch_size) per rate, and a summary (system, workload, max_rate) per system and workload.

The simulation runs torch on one thread (simulator.simulate, experiments.one_thread): on a busy
machine a second OpenMP thread turned each of the beam search's tiny ops (log_softmax on [beams, 8])
from about 2 us into 10-500 us, making the run 4x slower with the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from minipaged.experiments import ExperimentResult, check_run_args
from minipaged.experiments import latency as lat
from minipaged.workloads import alpaca_like, with_beam_search, with_parallel_sampling

NAME = "decoding"
SYSTEMS = {"vLLM": "paged", "Orca (Oracle)": "orca-oracle"}
COLORS = {"vLLM": "tab:red", "Orca (Oracle)": "tab:purple"}
WORKLOADS = {  # name in the rows -> how each Alpaca-like request decodes, and its width
    **{f"parallel n={n}": (with_parallel_sampling, n) for n in (2, 4, 6)},
    **{f"beam width={w}": (with_beam_search, w) for w in (2, 4, 6)},
}

PAPER = {
    "section": "6.3",
    "figure": "14",
    "setup": "OPT-13B on 1 A100-40GB, Alpaca",
    # basic sampling: one sample per request (section 6.2, Fig. 12, Alpaca), the serving experiment
    "vllm_rate_vs_orca_oracle": {"basic sampling": 1.3, "beam width=6": 2.3},
    "finding": (
        "The improvement of vLLM over Orca (Oracle) on OPT-13B and the Alpaca dataset goes from "
        "1.3x in basic sampling to 2.3x in beam search with a width of 6."
    ),
}


@dataclass(frozen=True)
class Scale:
    """One decoding setting's sweep: the arrival window and the grid of rates."""

    window: float  # simulated seconds of arrivals
    rates: tuple[float, ...]  # requests/s, ascending


def _by_width(grids: dict[int, tuple[float, ...]], window: float) -> dict[str, Scale]:
    """The same grid for n = w and beam width w: each sample or beam costs about alike."""
    return {name: Scale(window, grids[width]) for name, (_, width) in WORKLOADS.items()}


# A request with w samples or beams asks w times the decode tokens of one, so the knees at width
# w sit near 2 / w times width 2's: each grid is finest (10-20% apart) around both systems' knees.
SCALES = {
    "small": _by_width(
        {2: (10.0, 30.0, 60.0), 4: (5.0, 15.0, 30.0), 6: (5.0, 10.0, 25.0)}, 4.0
    ),
    "full": _by_width(
        {
            2: (10.0, 20.0, 30.0, 35.0, 40.0, 50.0, 60.0, 65.0, 70.0),
            4: (5.0, 10.0, 15.0, 17.5, 20.0, 22.5, 25.0, 30.0, 35.0, 40.0, 45.0),
            6: (5.0, 10.0, 12.0, 14.0, 16.0, 20.0, 22.5, 25.0, 30.0),
        },
        12.0,
    ),
}


def run(scale: str = "full", seed: int = 0, progress: bool = True) -> ExperimentResult:
    """Normalized latency against rate for vLLM and Orca (Oracle), per decoding, and max_rate.

    Args:
        scale: "full" (12 s of arrivals, 9-11 rates per setting, finest near the knees: from
            10 to 70 requests/s at n or width 2, 5 to 45 at 4, 5 to 30 at 6; a few minutes) or
            "small" (4 s and 3 rates per setting; seconds). Every setting serves the same
            requests (lengths, order), only decoded differently and arriving at its rates.
        seed: the workload's lengths and arrival times, and the simulator's (its beams).
        progress: a tqdm bar over the points.

    Raises:
        ValueError: naming the argument: a scale other than "small" or "full", a negative seed.
    """
    check_run_args(scale, seed, SCALES)
    cost, kv_slots = lat.setup("opt-13b")
    config = SCALES[scale]
    # one sample for all: the same requests
    top = max(max(s.rates) for s in config.values())
    curves = {}
    for workload, (decode, width) in WORKLOADS.items():
        sweep = config[workload]
        num = lat.num_requests(top, sweep.window)

        def make(n, rate, decode=decode, width=width):
            return decode(alpaca_like(n, rate=rate, seed=seed), width)

        def requests_at(rate, make=make, sweep=sweep, num=num):
            return lat.arrivals(make, rate, sweep.window, num)

        curves[workload] = requests_at
    rates = {workload: sweep.rates for workload, sweep in config.items()}
    rows = lat.sweep_all(curves, rates, SYSTEMS, cost, kv_slots, seed, NAME, progress)
    rows += lat.summaries(rows)
    windows = {name: s.window for name, s in config.items()}
    settings = lat.sweep_settings(scale, seed, "opt-13b", cost, kv_slots, windows)
    return ExperimentResult(NAME, rows, dict(PAPER), settings)


def plot(result: ExperimentResult, path) -> None:
    """Normalized latency against request rate, one panel per decoding setting (like Fig. 14):
    parallel sampling on the top row, beam search below, n or width 2, 4, 6 left to right."""
    title = "Parallel sampling and beam search, OPT-13B, Alpaca (Fig. 14)"
    lat.plot_latency(result.rows, path, title, COLORS, nrows=2)


__all__ = ["PAPER", "SCALES", "SYSTEMS", "WORKLOADS", "plot", "run"]
