"""Block size under load: how many requests a fixed KV budget serves at each block size.

OS idea: the page size decides how many processes fit in memory at once. Each process wastes, on
average, half a page in its last page; with large pages and small processes that half page is most of
what each one holds, and fewer of them fit (OSTEP ch. 20, "Bigger pages"). KV counterpart: vLLM paper
section 7.2, Fig. 18b: on Alpaca, "larger block sizes significantly degrade the performance since the
sequences become shorter than the block sizes". The latency the paper plots rises when the batch
shrinks; this module measures the batch.

The part "load" of the block-size experiment (block_size.py): the null-model simulator
(simulator.py) serves the ShareGPT-like and the Alpaca-like workload with paged allocation on the
memory-waste experiment's budget (15,000 token slots, OPT-13B on an A100) at each block size, and
records per step how many requests run and where the memory goes. Requests arrive faster than any
block size serves them, so the batch is as large as the memory allows: the runs measure capacity.
Rows: {"part": "load", "block_size", "workload", "rate", "kv_slots", "window_s", "mean_batch_size",
"mean_waiting", "throughput_rps", "token_states", "internal_fragmentation", "stranded",
"preemptions"}, the memory shares being of the memory in use, as in memory-waste.
"""

from __future__ import annotations

from tqdm import tqdm

from minipaged.experiments.serving import KV_SLOTS, MAX_MODEL_LEN, serve
from minipaged.experiments.simulator import STEP_TIME
from minipaged.workloads import alpaca_like, sharegpt_like

# Each workload at a rate above what the budget serves at any block size (paged allocation at block size
# 16 keeps up with about 2.1 ShareGPT-like and 69 Alpaca-like requests/s), so the queue never empties
# and what is measured is the budget's capacity: the most requests it runs at once, and serves per second.
LOADS = {"sharegpt-like": (sharegpt_like, 4.0), "alpaca-like": (alpaca_like, 100.0)}


def load_rows(
    block_sizes: tuple[int, ...],
    end: dict[str, float],
    warmup: dict[str, float],
    seed: int,
    progress: bool,
) -> list[dict]:
    """The "load" rows: paged allocation on the fixed budget, one run per workload and block size.

    Args:
        block_sizes: the block sizes to serve with.
        end: simulated seconds to serve, per workload (a key of LOADS).
        warmup: seconds left out at the start, per workload, while the pool fills from empty.
        seed: the workloads' lengths and arrival times.
        progress: a tqdm bar over the runs.
    """
    rows = []
    with tqdm(
        total=len(LOADS) * len(block_sizes),
        desc="block-size: load",
        disable=not progress,
    ) as bar:
        for name, (make, rate) in LOADS.items():
            # the same requests at every block size: arrivals outlast the run
            workload = make(
                int(rate * end[name] * 1.2) + 20,
                rate=rate,
                seed=seed,
                max_model_len=MAX_MODEL_LEN,
            )
            for b in block_sizes:
                # the null model's fixed step: capacity, not time, is what this part measures
                result = serve(
                    workload,
                    "paged",
                    end[name],
                    warmup[name],
                    block_size=b,
                    step_time=STEP_TIME,
                )
                # shares of the memory in use, as in memory-waste
                used = result.mean_used_fractions
                rows.append(
                    {
                        "part": "load",
                        "block_size": b,
                        "workload": name,
                        "rate": rate,
                        # 15,000 rounded down to whole blocks
                        "kv_slots": result.capacity,
                        "window_s": end[name] - warmup[name],
                        "mean_batch_size": result.mean_batch_size,
                        "mean_waiting": result.mean_waiting,
                        "throughput_rps": result.throughput,
                        "token_states": used["token_states"],
                        "internal_fragmentation": used["internal_fragmentation"],
                        "stranded": used["stranded"],
                        "preemptions": result.num_preemptions,
                    }
                )
                bar.update(1)
    return rows


__all__ = ["KV_SLOTS", "LOADS", "load_rows"]
