"""The serving setup that the memory experiments replay: one GPU's KV budget, a load, a window.

OS idea: to measure a memory manager, a benchmark fixes the machine's memory and the offered load,
lets the system reach a steady state and only then samples it, throwing the warm-up away (an empty
page cache or free list flatters every policy). KV counterpart: vLLM paper section 6.1,
"Experimental setup": OPT-13B on one NVIDIA A100 (40 GB), requests from ShareGPT or Alpaca arriving
as a Poisson process; section 6.2 serves ShareGPT at 2 requests/s when it compares batch sizes
(Fig. 13a), and Fig. 2 reports the memory breakdown of the same experiment.

The KV budget: OPT-13B keeps 2 (K and V) x 40 layers x 5,120 hidden x 2 bytes = 800 KB per token, and
the paper gives about 12 GB of the A100's 40 GB to the KV cache (Fig. 1: 26 GB of weights), so the
pool holds 12 GB / 800 KB = 15,000 token slots: 7 requests of Orca (Max)'s 2,048 slots, about 30 of
ShareGPT's mean 500 tokens.

The time: each step is priced by the cost model (experiments/cost_model.py) for OPT-13B on an
A100-40GB, so a batch of long contexts or a large prefill takes longer than a small decode batch, as
on the GPU; the simulated engine's clock runs on those prices.
"""

from __future__ import annotations

from minipaged.experiments.cost_model import CostModel
from minipaged.experiments.records import SimulationResult
from minipaged.experiments.simulator import simulate
from minipaged.workloads import sharegpt_like

# OPT-13B in fp16: K and V x layers x hidden x bytes = 819,200
KV_BYTES_PER_TOKEN = 2 * 40 * 5120 * 2
KV_SLOTS = 15_000  # 12 GB / 800 KB, as the paper rounds them
BLOCK_SIZE = 16  # vLLM's default (section 7.2)
MAX_MODEL_LEN = 2048  # OPT's context: what Orca (Max) reserves per request
# least to most frugal
ALLOCATORS = ("orca-max", "orca-pow2", "orca-oracle", "vattention", "paged")
LABELS = {
    "orca-max": "Orca (Max)",
    "orca-pow2": "Orca (Pow2)",
    "orca-oracle": "Orca (Oracle)",
    "vattention": "vAttention",
    "paged": "vLLM (paged)",
}
# how the paper's figures name a system, where it differs from LABELS
PAPER_LABELS = {"paged": "vLLM"}
# the paper's setup: what each step would take there
COST_MODEL = CostModel("opt-13b", "A100-40GB")


def serve(
    workload,
    allocator: str,
    end: float,
    warmup: float,
    *,
    progress: bool = False,
    **settings,
) -> SimulationResult:
    """Serve `workload` on the KV budget for `end` simulated seconds; keep the steps in [warmup, end).

    Args:
        workload: requests arriving over at least `end` seconds, so that the load lasts the window.
        allocator: one of ALLOCATORS.
        end: the simulated seconds to run.
        warmup: the seconds left out at the start, while the pool fills from empty.
        progress: a tqdm bar of finished requests.
        **settings: more keyword arguments of simulate (seed, enable_prefix_caching, ...). Steps
            are priced by COST_MODEL (OPT-13B on an A100-40GB) unless `step_time` gives the null
            model's fixed step.

    Returns:
        The windowed result (SimulationResult.window): its averages, num_finished and throughput
        are the window's.
    """
    settings = {
        "kv_slots": KV_SLOTS,
        "block_size": BLOCK_SIZE,
        "max_model_len": MAX_MODEL_LEN,
        **settings,
    }
    # priced by the cost model unless a null step is asked for
    if settings.get("step_time") is None:
        settings.setdefault("cost_model", COST_MODEL)
    result = simulate(workload, allocator, until=end, progress=progress, **settings)
    return result.window(warmup, end)


def sharegpt_load(rate: float, end: float, seed: int, max_rate: float = 3.0):
    """The ShareGPT-like workload at `rate` requests/s, with enough requests to arrive past `end`.

    The number of requests depends on `max_rate`, not on `rate`, so every rate up to `max_rate`
    replays the same requests (their lengths), only their arrival times scale: the memory-waste
    experiment's rows equal the batch-size experiment's at the same rate.
    """
    return sharegpt_like(
        int(max_rate * end * 1.2) + 20,
        rate=rate,
        seed=seed,
        max_model_len=MAX_MODEL_LEN,
    )


def arrived(workload, start: float, end: float) -> int:
    """Requests of `workload` that arrive in [start, end)."""
    return sum(start <= r.arrival_time < end for r in workload)


__all__ = [
    "ALLOCATORS",
    "BLOCK_SIZE",
    "KV_BYTES_PER_TOKEN",
    "KV_SLOTS",
    "LABELS",
    "MAX_MODEL_LEN",
    "PAPER_LABELS",
    "arrived",
    "serve",
    "sharegpt_load",
]
