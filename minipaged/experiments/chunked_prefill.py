"""Chunked prefill: time to first token and time per output token against the token budget.

OS idea: round robin with a time quantum (OSTEP ch. 7-8). A short quantum gives every job the CPU
often, so response time is low, but a long job then needs many slices; a long quantum is FCFS again,
and a short job that arrives behind a long one waits for all of it. KV counterpart: chunked prefill
(Sarathi-Serve, Agrawal et al., OSDI 2024; vLLM's `enable_chunked_prefill`): each step gives every
running decode its token first, then fills what is left of the token budget with chunks of prompts.
The budget is the quantum. A small one keeps every step short, so decodes never stall behind a long
prompt (low time per output token); but a long prompt then takes many steps to reach its first token.

What is measured: a mixed workload (`mixed`: one request in ten has a long prompt of 1,024 to 1,920
tokens and a short answer, the others a short prompt of 32 to 256 tokens and 64 to 256 tokens of
output), with Poisson arrivals for `window` seconds at each rate of RATES, served to completion by
the engine with the simulated runner (simulator.py), each step priced by the cost model of OPT-13B on
an A100-40GB, its KV pool sized by latency.setup. It runs once without chunking and once with
chunking at each budget of BUDGETS, at most MAX_NUM_SEQS sequences a step. Without chunking the
budget is UNCHUNKED_BUDGET, the model's context: a prompt computed in one step must fit in it.

`result.rows`, one per (rate, chunking, budget):

- rate (requests/s), chunking (bool), budget (tokens a step);
- ttft_mean, ttft_p99: time to first token in seconds, arrival to the end of the step that sampled it,
  over all requests; ttft_long: its mean over the long prompts alone;
- tpot_mean, tpot_p99: time per output token after the first, each request's
  (finished - first token) / (output_len - 1), in seconds;
- itl_p99: the 99th percentile, over every decoded token, of the step that computed it: how long a
  decoding request waited for that token, in seconds (the stall a prefill in its step costs it);
  itl_max: the longest such wait, the worst stall;
- throughput (requests finished per simulated second), preemptions, mean_batch_size.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np
from matplotlib.ticker import FuncFormatter
from tqdm import tqdm

from minipaged.experiments import ExperimentResult, check_run_args
from minipaged.experiments import latency as lat
from minipaged.experiments.plotting import legend, new_figure, savefig
from minipaged.experiments.simulator import simulate
from minipaged.workloads import Request, Workload, poisson_arrivals

NAME = "chunked-prefill"
MODEL = "opt-13b"  # on one A100-40GB (latency.SETUPS)
MAX_NUM_SEQS = 64  # a chunk budget must hold every running decode's token, so >= this
BUDGETS = (64, 128, 256, 512, 1024, 2048)  # tokens a step, with chunking
UNCHUNKED_BUDGET = lat.MAX_MODEL_LEN  # the longest prompt must fit in one step
LONG_SHARE = 0.1  # of requests, with a long prompt
LONG_PROMPT, LONG_OUTPUT = (1024, 1920), (16, 64)  # tokens, inclusive ranges
SHORT_PROMPT, SHORT_OUTPUT = (32, 256), (64, 256)
RATES = (4.0, 8.0, 10.0)  # requests/s: light, busy, and the KV pool full
ROW_KEYS = (
    "rate",
    "chunking",
    "budget",
    "ttft_mean",
    "ttft_p99",
    "ttft_long",
    "tpot_mean",
    "tpot_p99",
    "itl_p99",
    "itl_max",
    "throughput",
    "preemptions",
    "mean_batch_size",
)

PAPER = {
    "source": "Sarathi-Serve (Agrawal et al., OSDI 2024), not the vLLM paper",
    "capacity_vs_vllm": {"Mistral-7B, 1 A100": 2.6, "Yi-34B, 2 A100s": 3.7},
    "finding": (
        "A prefill iteration pauses every ongoing decode (a generation stall); chunked prefills "
        "split a prompt into chunks that join a batch of decodes under a token budget, so new "
        "requests are added without pausing decodes. The budget trades time between tokens "
        "against time to first token; under a tail-latency target on the time between tokens "
        "this raised serving capacity 2.6x over vLLM for Mistral-7B on one A100 and 3.7x for "
        "Yi-34B on two A100s."
    ),
}


@dataclass(frozen=True)
class Scale:
    """How much work one run does; "small" keeps the rows and keys of "full"."""

    window: float  # simulated seconds of arrivals at each rate


SCALES = {"small": Scale(10.0), "full": Scale(120.0)}


def mixed(num_requests: int, rate: float, seed: int = 0) -> Workload:
    """Long prompts among short ones: LONG_SHARE of the requests have a prompt of LONG_PROMPT
    tokens and LONG_OUTPUT of output, the others SHORT_PROMPT and SHORT_OUTPUT (uniform in each
    range), with Poisson arrivals at `rate` requests/s. Long ones are named "long-i", short ones
    "short-i"."""
    arrivals = poisson_arrivals(num_requests, rate, seed)
    rng = np.random.default_rng(seed)
    requests = []
    for i, time in enumerate(arrivals):
        is_long = bool(rng.random() < LONG_SHARE)
        prompt, output = (
            (LONG_PROMPT, LONG_OUTPUT) if is_long else (SHORT_PROMPT, SHORT_OUTPUT)
        )
        prompt_len = int(rng.integers(prompt[0], prompt[1] + 1))
        output_len = int(rng.integers(output[0], output[1] + 1))
        name = f"{'long' if is_long else 'short'}-{i}"
        requests.append(Request(name, time, prompt_len, output_len))
    return Workload("mixed", tuple(requests), dict(rate=rate, seed=seed))


def measure(
    requests: list[Request], chunking: bool, budget: int, seed: int = 0
) -> dict:
    """Serve `requests` to completion with or without chunking at `budget`; one row's figures."""
    cost, kv_slots = lat.setup(MODEL)
    result = simulate(
        requests, "paged", kv_slots=kv_slots, max_model_len=lat.MAX_MODEL_LEN, cost_model=cost,
        max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=budget,
        enable_chunked_prefill=chunking, seed=seed,
    )  # fmt: skip
    done = result.finished
    ttft = [f.first_token_time - f.arrival_time for f in done]
    tpot = [
        (f.finished_time - f.first_token_time) / (f.output_len - 1)
        for f in done
        if f.output_len > 1
    ]
    # every decoded token waited for the whole of the step that computed it
    itl = np.repeat(
        [r.duration for r in result.records], [r.num_decodes for r in result.records]
    )
    return {
        "ttft_mean": statistics.fmean(ttft),
        "ttft_p99": float(np.percentile(ttft, 99)),
        "ttft_long": statistics.fmean(
            t
            for t, f in zip(ttft, done, strict=True)
            if f.request_id.startswith("long")
        ),
        "tpot_mean": statistics.fmean(tpot),
        "tpot_p99": float(np.percentile(tpot, 99)),
        "itl_p99": float(np.percentile(itl, 99)),
        "itl_max": float(itl.max()),
        "throughput": result.throughput,
        "preemptions": result.num_preemptions,
        "mean_batch_size": result.mean_batch_size,
    }


def run(scale: str = "full", seed: int = 0, progress: bool = True) -> ExperimentResult:
    """TTFT, TPOT and the stall against the budget, with and without chunking, at each rate.

    Args:
        scale: "full" (120 simulated seconds of arrivals at each rate; under a minute) or "small"
            (10 seconds; a few seconds).
        seed: the workload's lengths and arrival times, and the simulator's.
        progress: a tqdm bar over the points.

    Raises:
        ValueError: naming the argument, for a scale other than "small" or "full" or a negative
            seed.
    """
    check_run_args(scale, seed, SCALES)
    window = SCALES[scale].window
    points = [(False, UNCHUNKED_BUDGET)] + [(True, b) for b in BUDGETS]
    rows = []
    with tqdm(total=len(RATES) * len(points), desc=NAME, disable=not progress) as bar:
        for rate in RATES:
            num = lat.num_requests(rate, window)
            requests = lat.arrivals(lambda n, r: mixed(n, r, seed), rate, window, num)
            for chunking, budget in points:
                figures = measure(requests, chunking, budget, seed)
                rows.append(
                    {"rate": rate, "chunking": chunking, "budget": budget, **figures}
                )
                bar.update(1)
    settings = {
        "scale": scale,
        "seed": seed,
        "model": MODEL,
        "gpu": lat.SETUPS[MODEL][0],
        "max_num_seqs": MAX_NUM_SEQS,
        "max_model_len": lat.MAX_MODEL_LEN,
        "kv_slots": lat.setup(MODEL)[1],
        "window_s": window,
        "long_share": LONG_SHARE,
    }
    return ExperimentResult(NAME, rows, dict(PAPER), settings)


def plot(result: ExperimentResult, path) -> None:
    """Two rows of panels, one column per rate, against the budget: time to first token (top),
    time per output token and the waits for one token (bottom); dashed: without chunking."""
    rates = sorted({r["rate"] for r in result.rows})
    fig, axes = new_figure(
        len(rates),
        "Chunked prefill: latency against the token budget (OPT-13B, A100-40GB, simulated)",
        panel_size=(4.0, 3.0),
        nrows=2,
    )
    for col, rate in enumerate(rates):
        rows = [r for r in result.rows if r["rate"] == rate]
        chunked = sorted((r for r in rows if r["chunking"]), key=lambda r: r["budget"])
        whole = next(r for r in rows if not r["chunking"])
        budgets = [r["budget"] for r in chunked]
        panels = {
            0: (
                ("ttft_mean", "mean"),
                ("ttft_p99", "p99"),
                ("ttft_long", "long prompts"),
            ),
            1: (
                ("tpot_mean", "TPOT mean"),
                ("itl_p99", "wait for a token, p99"),
                ("itl_max", "longest wait"),
            ),
        }
        for row, series in panels.items():
            ax = axes[row * len(rates) + col]
            for (key, label), color in zip(
                series, ("tab:blue", "tab:orange", "tab:red"), strict=True
            ):
                ax.plot(
                    budgets,
                    [1e3 * r[key] for r in chunked],
                    "o-",
                    color=color,
                    label=label,
                )
                ax.axhline(1e3 * whole[key], color=color, linestyle="--", linewidth=1)
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.set_xlabel("token budget (chunked; dashed: no chunking)")
            ax.set_ylabel("time to first token (ms)" if row == 0 else "ms per token")
            ax.set_yscale("log")
            for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis(FuncFormatter(lambda value, _: f"{value:g}"))
            if row == 0:
                ax.set_title(f"{rate:g} requests/s")
            if col == 0:
                legend(ax)
    savefig(fig, path)


__all__ = [
    "BUDGETS",
    "PAPER",
    "RATES",
    "ROW_KEYS",
    "SCALES",
    "measure",
    "mixed",
    "plot",
    "run",
]
