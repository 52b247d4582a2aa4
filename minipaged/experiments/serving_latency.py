"""Serving: normalized latency against request rate, vLLM against Orca (vLLM paper Fig. 12).

OS idea: the less memory each process wastes, the more are resident, and the higher the load a
machine takes before its queue, and so its response time, runs away (OSTEP ch. 13, 21-22: the
degree of multiprogramming; the queue's knee in latency.py). KV counterpart: vLLM paper section
6.2, Fig. 12: on ShareGPT, vLLM sustains 1.7x-2.7x the request rate of Orca (Oracle) and
2.7x-8x that of Orca (Max) at similar normalized latency, and up to 22x FasterTransformer's
(not built here); on Alpaca, whose sequences are short, the gains are smaller.

What is measured (latency.py): for each workload (ShareGPT-like, Alpaca-like) and system (vLLM:
paged blocks; Orca (Max), (Pow2), (Oracle): contiguous reservations), the requests arriving in
[0, window) at each rate of a grid are served to completion by the engine with the simulated
runner, each step priced by the cost model of OPT-13B on an A100-40GB (OPT-66B on four A100-40GB
and OPT-175B on eight A100-80GB with `model=`). The KV pool is the cost model's
kv_cache_tokens(0.9) (latency.setup). `result.rows` holds two kinds of row:

- a point: system, workload, rate (requests/s), normalized_latency (s/token, the mean over every
  arrived request), throughput (requests finished per simulated second), mean_batch_size;
- a summary, one per system and workload: system, workload, max_rate (the highest rate of the
  grid before the first whose normalized latency reaches latency.THRESHOLD, 0.1 s/token).

`result.settings` records the model, the GPUs, the pool, the threshold and each window.
"""

from __future__ import annotations

from dataclasses import dataclass

from tqdm import tqdm

from minipaged.experiments import ExperimentResult, check_run_args, check_tensor_args
from minipaged.experiments import latency as lat

# the measured run (run(measured=True))
from minipaged.experiments import measured as realtime
from minipaged.presets import PRESETS
from minipaged.workloads import alpaca_like, sharegpt_like

NAME = "serving"
SYSTEMS = {  # name in the rows -> the simulator's allocator, most frugal first
    "vLLM": "paged",
    "Orca (Oracle)": "orca-oracle",
    "Orca (Pow2)": "orca-pow2",
    "Orca (Max)": "orca-max",
    # Orca (Max)'s reservation, static batches
    "FasterTransformer": "fastertransformer",
}
COLORS = {"vLLM": "tab:red", "Orca (Oracle)": "tab:purple", "Orca (Pow2)": "tab:orange",
          "Orca (Max)": "tab:gray", "FasterTransformer": "tab:brown",
          **{label: color for label, color in zip(realtime.LABELS.values(), ("tab:red", "tab:purple",
             "tab:gray", "tab:brown"), strict=True)}}  # fmt: skip
WORKLOADS = {"ShareGPT": sharegpt_like, "Alpaca": alpaca_like}

PAPER = {
    "section": "6.2",
    "figure": "12",
    "setup": "OPT-13B on 1 A100-40GB, OPT-66B on 4 A100-40GB, OPT-175B on 8 A100-80GB",
    "vllm_rate_vs": {  # ShareGPT, over the three models
        "Orca (Oracle)": [1.7, 2.7],
        "Orca (Max)": [2.7, 8.0],
        "FasterTransformer": [None, 22.0],
    },
    # OPT-13B, ShareGPT: vLLM's max_rate >= x
    "goal": {"Orca (Oracle)": 1.7, "Orca (Max)": 2.7},
    "finding": (
        "vLLM can sustain 1.7x-2.7x higher request rates compared to Orca (Oracle) and 2.7x-8x "
        "compared to Orca (Max), while maintaining similar latencies [ShareGPT]; ... up to 22x "
        "higher request rates compared to FasterTransformer. On Alpaca the advantage is less "
        "pronounced, since its short sequences leave the memory less of a bottleneck."
    ),
}


ALPACA_FROM_5 = (
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    70.0,
    80.0,
    90.0,
    100.0,
    120.0,
)


@dataclass(frozen=True)
class Scale:
    """One workload's sweep: the arrival window and the grid of rates."""

    window: float  # simulated seconds of arrivals
    rates: tuple[float, ...]  # requests/s, ascending


SCALES = {
    "small": {
        "ShareGPT": Scale(20.0, (0.5, 2.0, 4.0, 8.0)),
        "Alpaca": Scale(6.0, (5.0, 20.0, 60.0)),
    },
    "full": {
        # from 0.1: FasterTransformer's knee is far below the others'
        "ShareGPT": Scale(
            120.0,
            (
                0.1,
                0.2,
                0.3,
                0.4,
                0.5,
                0.75,
                1.0,
                1.25,
                1.5,
                1.75,
                2.0,
                2.25,
                2.5,
                2.75,
                3.0,
                3.5,
                4.0,
                5.0,
            ),
        ),
        "Alpaca": Scale(30.0, (0.5, 1.0, 2.0, 3.0, *ALPACA_FROM_5)),
    },
}


MEASURED = {  # scale -> (rates in requests/s, seconds of arrivals at each)
    "small": ((120.0,), 2.0),
    "full": ((40.0, 80.0, 100.0, 120.0, 140.0, 160.0, 200.0), 4.0),
}
# s/token: 5x the engine's unloaded latency on this CPU (tiny-llama, 2 ms)
MEASURED_THRESHOLD = 0.01


def run(
    scale: str = "full",
    seed: int = 0,
    progress: bool = True,
    model: str | None = None,
    measured: bool = False,
    backend: str | None = None,
    device: str | None = None,
) -> ExperimentResult:
    """Normalized latency against rate per system and workload, and each one's max_rate.

    Args:
        scale: "full" (ShareGPT: 120 s of arrivals, 18 rates from 0.1 to 5 requests/s, 0.25
            apart near the knees; Alpaca: 30 s, 18 rates from 0.5 to 120; a few minutes) or
            "small" (20 s and 4 rates, 6 s and 3 rates; seconds).
        seed: the workloads' lengths and arrival times, and the simulator's.
        progress: a tqdm bar over the points.
        model: the simulation's: "opt-13b" (default; 1 A100-40GB), "opt-66b" (4 A100-40GB) or
            "opt-175b" (8 A100-80GB); the measured run's: a preset (default "tiny-llama").
        measured: instead of the simulation, replay arrivals in real time on this machine
            (experiments/measured.py): the engine on a preset model, the same engine under
            Orca-style reservations, and transformers' padded generate in static batches.
        backend: the measured run's kernels, "reference" (default) or "triton".
        device: the measured run's device, "cpu" (default) or "cuda[:N]".

    Raises:
        ValueError: naming the argument: a scale other than "small" or "full", a negative seed,
            an unknown model, or a backend or device without measured=True (the simulation runs
            no tensors).
    """
    check_run_args(scale, seed, SCALES)
    if measured:
        model = model or realtime.MODEL
        return _run_measured(
            scale, seed, progress, model, backend or "reference", device or "cpu"
        )
    if backend is not None or device is not None:
        raise ValueError(
            "backend and device apply to the measured run only (measured=True, `--measured`): "
            "the simulation runs no tensors"
        )
    model = model or "opt-13b"
    cost, kv_slots = lat.setup(model)
    config = SCALES[scale]
    curves = {}
    for workload, make in WORKLOADS.items():
        sweep = config[workload]
        num = lat.num_requests(max(sweep.rates), sweep.window)

        def requests_at(rate, make=make, sweep=sweep, num=num):
            return lat.arrivals(
                lambda n, r: make(n, rate=r, seed=seed), rate, sweep.window, num
            )

        curves[workload] = requests_at
    rates = {workload: sweep.rates for workload, sweep in config.items()}
    rows = lat.sweep_all(curves, rates, SYSTEMS, cost, kv_slots, seed, NAME, progress)
    rows += lat.summaries(rows)
    windows = {name: s.window for name, s in config.items()}
    settings = lat.sweep_settings(scale, seed, model, cost, kv_slots, windows)
    return ExperimentResult(NAME, rows, dict(PAPER), settings)


def _run_measured(
    scale: str, seed: int, progress: bool, model: str, backend: str, device: str
) -> ExperimentResult:
    """The measured run: every system of realtime.SYSTEMS at each rate, in real time."""
    check_tensor_args(backend, device)
    if model not in PRESETS:
        raise ValueError(
            f"model must be a preset ({', '.join(PRESETS)}) for the measured run, got {model!r}"
        )
    rates, duration = MEASURED[scale]
    rows = []
    with tqdm(
        total=len(realtime.SYSTEMS) * len(rates),
        desc=f"{NAME} --measured",
        disable=not progress,
    ) as bar:
        for system in realtime.SYSTEMS:
            for rate in rates:
                row = realtime.measure(
                    system,
                    rate,
                    duration,
                    model=model,
                    backend=backend,
                    device=device,
                    seed=seed,
                )
                rows.append({**row, "system": realtime.LABELS[system]})
                bar.update(1)
    rows += lat.summaries(rows, MEASURED_THRESHOLD)
    settings = {
        "scale": scale,
        "seed": seed,
        "measured": True,
        "model": model,
        "backend": backend,
        "device": device,
        "num_gpu_blocks": realtime.NUM_GPU_BLOCKS,
        "block_size": realtime.BLOCK_SIZE,
        "threshold": MEASURED_THRESHOLD,
        "window_s": duration,
    }
    return ExperimentResult(NAME, rows, dict(PAPER), settings)


def plot(result: ExperimentResult, path) -> None:
    """Normalized latency against request rate, one panel per workload (like Fig. 12)."""
    model = result.settings.get("model", "opt-13b").upper()
    title = f"Normalized latency against request rate, {model} (Fig. 12)"
    if result.settings.get("measured"):
        title = f"Measured in real time: {result.settings['model']} on {result.settings['device']}"
    threshold = result.settings.get("threshold", lat.THRESHOLD)
    lat.plot_latency(result.rows, path, title, COLORS, threshold)


__all__ = [
    "MEASURED",
    "MEASURED_THRESHOLD",
    "PAPER",
    "SCALES",
    "SYSTEMS",
    "plot",
    "run",
]
