"""A KV-memory simulator with a null model: token counts only, no tensors, no model.

OS idea: OSTEP's homework simulators (malloc.py, paging-policy.py, ...) replay a trace of requests
against an allocation policy and count what is used and what is wasted, without running programs.
KV counterpart: the memory side of the vLLM paper's section 6: a workload of requests (arrival time,
prompt length, true output length) is served by PagedAttention or by one of the baselines of
experiments/baselines.py and experiments/vattention.py on one pool of `kv_slots` token slots, and every
step records where each slot is (MemoryBreakdown, the paper's Fig. 3 categories), the batch size and
what sharing saved (records.py).

The null model: a model step takes `step_time` seconds whatever the batch, and every running sequence
gains one token per step until it has generated its request's output_len tokens. Time is step counts
plus arrival times: a request joins the waiting queue once the clock has passed its arrival_time;
when nothing is left to run, the clock jumps to the next arrival (no step is recorded).

- "paged" runs the REAL Scheduler and BlockManager as engine.py does (paged_driver.py), with
  parallel sampling (n sequences sharing the prompt), beam search under a seeded null policy, prefix
  caching and preemption.
- "orca-max" | "orca-pow2" | "orca-oracle" | "vattention" run an Orca-like iteration-level FCFS loop
  over a baseline allocator (orca_driver.py): admit in arrival order while it fits; samples and beams
  cannot share, so a request of width W holds W ranges. Only vAttention can run short of pages while
  a request grows; it then preempts the newest request by recompute, as vLLM's scheduler does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

from minipaged.config import PREEMPTION_MODES
from minipaged.experiments.baselines import check_positive
from minipaged.experiments.orca_driver import OrcaDriver
from minipaged.experiments.paged_driver import PagedDriver
from minipaged.experiments.records import SimulationResult, StepRecord, request_width
from minipaged.experiments.vattention import VATTENTION_PAGE_TOKENS

ALLOCATORS = ("paged", "orca-max", "orca-pow2", "orca-oracle", "vattention")
# One model step, in seconds, whatever its batch: the order of an OPT-13B decode step on an A100.
STEP_TIME = 0.04


def simulate(
    workload: Iterable[Any],
    allocator: str = "paged",
    *,
    kv_slots: int,
    block_size: int = 16,
    max_model_len: int = 2048,
    max_num_seqs: int = 256,
    enable_prefix_caching: bool = False,
    preemption_mode: str = "recompute",
    page_tokens: int = VATTENTION_PAGE_TOKENS,
    watermark: float = 0.01,
    step_time: float = STEP_TIME,
    seed: int = 0,
    progress: bool = False,
    max_steps: int | None = None,
) -> SimulationResult:
    """Serve `workload` with a null model and record the KV pool at every step.

    Args:
        workload: requests with .request_id, .arrival_time, .prompt_len, .output_len (tokens it
            generates), .prefix_len and .prefix_id (the first prefix_len prompt tokens are shared by
            every request of the same prefix_id), .n (parallel samples, each generating output_len
            tokens) and .beam_width (0: no beam search), e.g. a minipaged.workloads.Workload.
        allocator: "paged", "orca-max", "orca-pow2", "orca-oracle" or "vattention".
        kv_slots: token slots in the pool, rounded down to whole blocks (paged) or pages (vattention).
        block_size: tokens per block (paged).
        max_model_len: the longest request; Orca (Max) reserves this much for each.
        max_num_seqs: the most sequences running at once.
        enable_prefix_caching: paged only (the others refuse True): reuse cached full blocks of
            shared prefixes.
        preemption_mode: "recompute" or "swap" (a host pool as large as the device's); only paged
            can swap, the others refuse "swap".
        page_tokens: vattention's page size in token slots.
        watermark: fraction of blocks (paged) or pages (vattention) kept free at admission.
        step_time: seconds the clock advances per step.
        seed: seeds the null beam policy, the only random choice here.
        progress: show a tqdm bar of finished requests.
        max_steps: stop after this many steps (None: when every request has finished).

    Raises:
        ValueError: naming the argument, for a bad setting, or naming the request, for one that can
            never be served (too long, or too large for the pool); nothing is simulated then.
    """
    _check_settings(allocator, kv_slots, block_size, page_tokens, preemption_mode, enable_prefix_caching)
    if not isinstance(step_time, (int, float)) or step_time <= 0:
        raise ValueError(f"step_time must be a positive number of seconds, got {step_time!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 0):
        raise ValueError(f"max_steps must be None or an int >= 0, got {max_steps!r}")
    requests = sorted(workload, key=lambda r: r.arrival_time)  # stable: ties keep workload order
    if len({r.request_id for r in requests}) != len(requests):
        raise ValueError("workload: request ids must be unique")
    if allocator == "paged":
        driver = PagedDriver(
            kv_slots,
            block_size,
            max_model_len,
            max_num_seqs,
            enable_prefix_caching,
            preemption_mode,
            watermark,
            seed,
        )
    else:
        driver = OrcaDriver(allocator, kv_slots, max_model_len, max_num_seqs, page_tokens, watermark)
    for req in requests:  # every request is checked before anything runs
        driver.check(req, request_width(req))
    records: list[StepRecord] = []
    pending, clock = deque(requests), 0.0
    with tqdm(total=len(requests), desc=f"simulate {allocator}", disable=not progress) as bar:
        while (pending or driver.has_unfinished()) and (max_steps is None or len(records) < max_steps):
            while pending and pending[0].arrival_time <= clock:
                driver.add(pending.popleft())
            if not driver.has_unfinished():
                clock = max(clock, pending[0].arrival_time)  # idle: jump to the next arrival
                continue
            record = driver.step(len(records), clock)
            records.append(record)
            bar.update(record.num_finished)
            clock += step_time
    return driver.result(allocator, records, len(requests), step_time)


def _check_settings(allocator, kv_slots, block_size, page_tokens, preemption_mode, prefix_caching) -> None:
    """Raise ValueError naming the argument: the pool's sizes, and the paged-only options, which the
    other allocators refuse rather than ignore."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {', '.join(ALLOCATORS)}, got {allocator!r}")
    check_positive(kv_slots=kv_slots, block_size=block_size, page_tokens=page_tokens)
    units = {"paged": ("block", "block_size", block_size), "vattention": ("page", "page_tokens", page_tokens)}
    what, name, unit = units.get(allocator, ("slot", "", 1))
    if kv_slots < unit:
        raise ValueError(f"kv_slots must hold at least one {what} of {name}={unit} slots, got {kv_slots}")
    if preemption_mode not in PREEMPTION_MODES:
        raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {preemption_mode!r}")
    if allocator != "paged" and preemption_mode != "recompute":
        raise ValueError(
            f"preemption_mode={preemption_mode!r} needs allocator 'paged' (the others have no host "
            f"pool to swap to: vattention preempts by recompute, the Orca allocators never preempt), "
            f"got allocator {allocator!r}"
        )
    if allocator != "paged" and prefix_caching:
        raise ValueError(
            f"enable_prefix_caching=True needs allocator 'paged' (only paged blocks can be shared "
            f"between requests), got allocator {allocator!r}"
        )


__all__ = ["ALLOCATORS", "STEP_TIME", "SimulationResult", "StepRecord", "simulate"]
