"""A KV-memory simulator: the one engine loop, a simulated runner, and a record of every step.

OS idea: OSTEP's homework simulators (malloc.py, paging-policy.py, ...) replay a trace of requests
against an allocation policy and count what is used and what is wasted, without running programs.
KV counterpart: the memory side of the vLLM paper's section 6: a workload of requests (arrival time,
prompt length, true output length) is served on one pool of `kv_slots` token slots by PagedAttention
or by one of the baselines (experiments/baselines.py, vattention.py), and every step records where
each slot is (MemoryBreakdown, the paper's Fig. 3 categories), the batch size and what sharing saved
(records.py).

There is one serving loop, engine.LLM.step, for every system: the simulator builds an LLM whose
runner is a SimulatedRunner (no tensors: null-policy tokens and a step time) and, for a baseline,
whose memory manager is a ReservationManager over the baseline's allocator (reservation.py); the
real Scheduler admits, grows, preempts and finishes requests for all of them. Each request is
submitted with max_tokens = output_len and ignore_eos, so it ends at its true length; n samples
share the prompt by fork (paged) or hold n ranges (baselines); beams run the real beam search over
the null policy's seeded logits.

Time: a fixed `step_time` per step whatever the batch (the null model of the memory experiments), or
a cost model's price of each step (experiments/cost_model.py). A request joins the waiting queue
once the engine's simulated clock has passed its arrival_time; when nothing is left to run, the
clock jumps to the next arrival (no step is recorded).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm  # the plain bar: tqdm.auto warns in a notebook without ipywidgets

from minipaged.config import PREEMPTION_MODES
from minipaged.engine import LLM
from minipaged.experiments import one_thread
from minipaged.experiments.baselines import ContiguousAllocator, check_positive
from minipaged.experiments.cost_model import CostModel
from minipaged.experiments.memory_breakdown import MemoryBreakdown, waiting_waste
from minipaged.experiments.records import (
    FinishedRequest,
    SimulationResult,
    StepRecord,
    request_width,
)
from minipaged.experiments.reservation import ReservationManager
from minipaged.experiments.simulated_runner import SimulatedRunner
from minipaged.experiments.vattention import VATTENTION_PAGE_TOKENS, VAttentionAllocator
from minipaged.reference.block_manager import AllocStatus, BlockManager
from minipaged.reference.scheduler import SchedulerOutput
from minipaged.sampling import BeamSearchParams, SamplingParams

ALLOCATORS = (
    "paged",
    "orca-max",
    "orca-pow2",
    "orca-oracle",
    "vattention",
    "fastertransformer",
)
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
    max_num_batched_tokens: int | None = None,
    enable_chunked_prefill: bool = False,
    enable_prefix_caching: bool = False,
    preemption_mode: str = "recompute",
    page_tokens: int = VATTENTION_PAGE_TOKENS,
    placement: str = "buddy",
    watermark: float = 0.01,
    step_time: float | None = None,
    cost_model: CostModel | None = None,
    seed: int = 0,
    progress: bool = False,
    max_steps: int | None = None,
    until: float | None = None,
) -> SimulationResult:
    """Serve `workload` on the engine with a simulated runner and record the KV pool at every step.

    Args:
        workload: requests with .request_id, .arrival_time, .prompt_len, .output_len (tokens it
            generates), .prefix_len and .prefix_id (the first prefix_len prompt tokens are shared by
            every request of the same prefix_id), .n (parallel samples, each generating output_len
            tokens) and .beam_width (0: no beam search), e.g. a minipaged.workloads.Workload.
        allocator: "paged", "orca-max", "orca-pow2", "orca-oracle", "vattention", or
            "fastertransformer": Orca (Max)'s reservation with static batching (a new batch only
            when the last one has finished; SchedulerConfig.batching).
        kv_slots: token slots in the pool, rounded down to whole blocks (paged) or pages (vattention).
        block_size: tokens per block (paged).
        max_model_len: the longest request; Orca (Max) reserves this much for each.
        max_num_seqs: the most sequences running at once.
        max_num_batched_tokens: the most tokens one step computes (None: the engine's default).
        enable_chunked_prefill: paged only: compute a long prompt over several steps, in chunks of
            what the token budget leaves (concepts/chunked-prefill.md).
        enable_prefix_caching: paged only (the others refuse True): reuse cached full blocks of
            shared prefixes.
        preemption_mode: "recompute" or "swap" (a host pool as large as the device's); only paged
            can swap, the others refuse "swap".
        page_tokens: vattention's page size in token slots.
        placement: where the Orca allocators place a range: "buddy" (the paper's) or "first-fit".
        watermark: fraction of blocks (paged) or pages (vattention) kept free at admission.
        step_time: seconds per step, whatever the batch (the null model; None: STEP_TIME).
        cost_model: prices each step instead (experiments/cost_model.py); then step_time must be None.
        seed: seeds the null policy (beams fork and exit by its seeded logits).
        progress: show a tqdm bar of finished requests.
        max_steps: stop after this many steps (None: no limit).
        until: stop at the first step that starts at or after this simulated second (None: none).

    Raises:
        ValueError: naming the argument, for a bad setting, or naming the request, for one that can
            never be served (too long, or too large for the pool); nothing is simulated then.
    """
    _check_settings(
        allocator,
        kv_slots,
        block_size,
        page_tokens,
        preemption_mode,
        enable_prefix_caching,
        enable_chunked_prefill,
    )
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 0):
        raise ValueError(f"max_steps must be None or an int >= 0, got {max_steps!r}")
    # stable: ties keep workload order
    requests = sorted(workload, key=lambda r: r.arrival_time)
    if len({r.request_id for r in requests}) != len(requests):
        raise ValueError("workload: request ids must be unique")
    if step_time is None and cost_model is None:
        step_time = STEP_TIME
    runner = SimulatedRunner(
        cost_model,
        step_time=step_time,
        block_size=block_size,
        max_model_len=max_model_len,
        seed=seed,
    )
    if allocator == "paged":
        num_blocks = kv_slots // block_size
        manager = BlockManager(
            block_size, num_blocks, num_blocks if preemption_mode == "swap" else 0, watermark,
            enable_prefix_caching,
        )  # fmt: skip
    elif allocator == "vattention":
        manager = ReservationManager(
            VAttentionAllocator(kv_slots, page_tokens, max_model_len, watermark)
        )
    else:
        policy = (
            "max"
            if allocator == "fastertransformer"
            else allocator.removeprefix("orca-")
        )
        manager = ReservationManager(
            ContiguousAllocator(kv_slots, policy, max_model_len, placement)
        )
    llm = LLM(
        runner=runner,
        block_manager=manager,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_chunked_prefill=enable_chunked_prefill,
        preemption_mode=preemption_mode,
        batching="static" if allocator == "fastertransformer" else "iteration",
    )
    ids = _submit_all(llm, requests)  # every request is checked before anything runs
    recorder = _Recorder(manager)
    llm.step_observers.append(recorder)
    finished: list[FinishedRequest] = []
    with (
        one_thread(),
        tqdm(
            total=len(requests), desc=f"simulate {allocator}", disable=not progress
        ) as bar,
    ):
        while llm.has_unfinished_requests() and (
            max_steps is None or len(recorder.records) < max_steps
        ):
            if until is not None and llm.now() >= until:
                break
            outputs = llm.step()
            recorder.finish_step(len(outputs))
            for output in outputs:
                request = ids[output.request_id]
                m = output.metrics
                finished.append(
                    FinishedRequest(
                        request.request_id, m.arrival_time, m.first_token_time, m.finished_time,
                        request.output_len,
                    )
                )  # fmt: skip
            bar.update(len(outputs))
    if until is not None:
        recorder.records = [r for r in recorder.records if r.time < until]
    capacity = (
        manager.device.num_blocks * block_size
        if allocator == "paged"
        else manager.allocator.capacity
    )
    cache = manager.device if allocator == "paged" else None
    return SimulationResult(
        allocator,
        capacity,
        block_size if allocator == "paged" else manager.block_size,
        recorder.records,
        len(requests),
        sum(r.num_finished for r in recorder.records),
        sum(r.num_preempted for r in recorder.records),
        getattr(cache, "hits", 0),
        getattr(cache, "misses", 0),
        manager.cow_copies if allocator == "paged" else 0,
        finished,
    )


def _submit_all(llm: LLM, requests: list) -> dict[str, Any]:
    """Add every request at its arrival time; its prompt's tokens are synthetic. Returns the
    engine's request ids -> the workload's requests."""
    # no two requests' own tokens are equal: they never share blocks
    fresh = itertools.count(1)
    ids = {}
    for req in requests:
        width = request_width(req)
        prefix_len, prefix_id = (
            getattr(req, "prefix_len", 0),
            getattr(req, "prefix_id", 0),
        )
        # A shared prefix's tokens depend on its id and position only, so equal prefixes hash alike.
        prompt = [(1 << 40) + prefix_id * (1 << 20) + i for i in range(prefix_len)]
        prompt += [next(fresh) for _ in range(req.prompt_len - prefix_len)]
        if getattr(req, "beam_width", 0):
            params = BeamSearchParams(
                beam_width=width, max_tokens=req.output_len, ignore_eos=True
            )
        else:
            params = SamplingParams(
                n=width, temperature=0.0, max_tokens=req.output_len, ignore_eos=True
            )
        try:
            request_id = llm.add_request(
                {"prompt_token_ids": prompt}, params, req.arrival_time
            )
        except ValueError as error:
            raise ValueError(f"request {req.request_id!r}: {error}") from None
        ids[request_id] = req
    return ids


class _Recorder:
    """A step observer of the engine: one StepRecord per step, taken after the model step and
    before finished requests free their memory (engine.LLM._record calls it there)."""

    def __init__(self, manager) -> None:
        self.manager = manager
        self.records: list[StepRecord] = []
        # requests scheduled before: their next prefill recomputes
        self.admitted: set[str] = set()

    def __call__(self, llm: LLM, out: SchedulerOutput) -> None:
        stats, s = llm.step_stats[-1], llm.scheduler
        recomputed = sum(
            i.num_query_tokens
            for i in out.scheduled
            if i.is_prefill and i.group.request_id in self.admitted
        )
        # a prompt chunked over several steps is admitted once, at its last chunk
        self.admitted.update(
            i.group.request_id for i in out.scheduled if i.completes_sequence
        )
        if isinstance(self.manager, BlockManager):
            breakdown, used, saved = _paged_breakdown(self.manager, s)
        else:
            head = s.waiting[0] if s.waiting else None
            breakdown, saved = self.manager.breakdown(head), 0
            alloc = self.manager.allocator
            used = (
                alloc.pages.num_used
                if isinstance(alloc, VAttentionAllocator)
                else self.manager.num_ranges
            )
        self.records.append(
            StepRecord(
                stats.step, stats.time, len(s.running), len(s.waiting) + len(s.swapped), len(out.scheduled),
                breakdown, used, saved, 0, stats.num_prefill_tokens, len(out.preempted), recomputed,
                stats.duration, sum(not i.is_prefill for i in out.scheduled),
            )
        )  # fmt: skip

    def finish_step(self, num_finished: int) -> None:
        """After the step: how many requests it finished (they free their memory now)."""
        if self.records:
            last = self.records[-1]
            self.records[-1] = StepRecord(
                **{**last.__dict__, "num_finished": num_finished}
            )


def _paged_breakdown(
    manager: BlockManager, scheduler
) -> tuple[MemoryBreakdown, int, int]:
    """(breakdown, blocks used, blocks saved by sharing) of the device pool: pool_stats's figures in
    O(sequences) instead of O(blocks), so that long runs stay fast.

    Every block but a table's last is full, and a partly filled block is only ever shared as the
    last block of tables with the same tokens (fork, or the n samples of a prompt): so the unfilled
    slots are block_size - fill of each distinct partial last block. The tests hold this to pool_stats.
    Free blocks are stranded while the head waits for memory; any block serves any request, so there
    is never external fragmentation (memory_breakdown.waiting_waste: one rule for all).
    """
    tables, bs, device = (
        manager.device_tables.values(),
        manager.block_size,
        manager.device,
    )
    partial = {
        t.block_ids[-1]: t.num_filled_in_last_block for t in tables if t.num_tokens % bs
    }
    slots_used = device.num_used * bs - sum(bs - fill for fill in partial.values())
    # the group the scheduler would admit next: the oldest swapped, else the head
    if scheduler.swapped:
        waits = not manager.can_swap_in(scheduler.swapped[0])
    else:
        waits = (
            bool(scheduler.waiting)
            and manager.can_allocate(scheduler.waiting[0]) != AllocStatus.OK
        )
    _, stranded, free = waiting_waste(device.num_free * bs, waits, False)
    breakdown = MemoryBreakdown(
        slots_used, 0, device.num_used * bs - slots_used, 0, stranded, free
    )
    return breakdown, device.num_used, sum(len(t) for t in tables) - device.num_used


def _check_settings(
    allocator,
    kv_slots,
    block_size,
    page_tokens,
    preemption_mode,
    prefix_caching,
    chunked,
) -> None:
    """Raise ValueError naming the argument: the pool's sizes, and the paged-only options, which the
    other allocators refuse rather than ignore."""
    if allocator not in ALLOCATORS:
        raise ValueError(
            f"allocator must be one of {', '.join(ALLOCATORS)}, got {allocator!r}"
        )
    check_positive(kv_slots=kv_slots, block_size=block_size, page_tokens=page_tokens)
    units = {
        "paged": ("block", "block_size", block_size),
        "vattention": ("page", "page_tokens", page_tokens),
    }
    what, name, unit = units.get(allocator, ("slot", "", 1))
    if kv_slots < unit:
        raise ValueError(
            f"kv_slots must hold at least one {what} of {name}={unit} slots, got {kv_slots}"
        )
    if preemption_mode not in PREEMPTION_MODES:
        raise ValueError(
            f"preemption_mode must be 'recompute' or 'swap', got {preemption_mode!r}"
        )
    if allocator != "paged" and preemption_mode != "recompute":
        raise ValueError(
            f"preemption_mode={preemption_mode!r} needs allocator 'paged' (the others have no host "
            f"pool to swap to: vattention preempts by recompute, the Orca allocators never preempt), "
            f"got allocator {allocator!r}"
        )
    if allocator != "paged" and chunked:
        raise ValueError(
            f"enable_chunked_prefill=True needs allocator 'paged' (a reservation is made whole at "
            f"admission), got allocator {allocator!r}"
        )
    if allocator != "paged" and prefix_caching:
        raise ValueError(
            f"enable_prefix_caching=True needs allocator 'paged' (only paged blocks can be shared "
            f"between requests), got allocator {allocator!r}"
        )


__all__ = ["ALLOCATORS", "STEP_TIME", "SimulationResult", "StepRecord", "simulate"]
