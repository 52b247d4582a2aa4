"""A KV-memory simulator with a null model: token counts only, no tensors, no model.

OS idea: OSTEP's homework simulators (malloc.py, paging-policy.py, ...) replay a trace of requests
against an allocation policy and count what is used and what is wasted, without running programs.
KV counterpart: the memory side of the vLLM paper's section 6: a workload of requests (arrival time,
prompt length, true output length) is served by PagedAttention or by one of the baselines of
reference/baselines.py on one pool of `kv_slots` token slots, and every step records where each slot
is (MemoryBreakdown, the paper's Fig. 3 categories), the batch size and what sharing saved.

The null model: a model step takes `step_time` seconds whatever the batch, and every running sequence
gains one token per step until it has generated its request's output_len tokens. Time is step counts
plus arrival times: a request joins the waiting queue once the clock has passed its arrival_time;
when nothing is left to run, the clock jumps to the next arrival (no step is recorded).

- "paged" runs the REAL Scheduler and BlockManager as engine.py does (schedule -> model step ->
  append a token to each scheduled sequence -> finish and free), with parallel sampling (n sequences
  sharing the prompt), beam search under a seeded null policy, prefix caching and preemption.
- "orca-max" | "orca-pow2" | "orca-oracle" | "vattention" run an Orca-like iteration-level FCFS loop
  over a baseline allocator: admit in arrival order while it fits; samples and beams cannot share,
  so a request of width W holds W ranges. Only vAttention can run short of pages while a request
  grows; it then preempts the newest request by recompute, as vLLM's scheduler (which it runs under) does.
"""

from __future__ import annotations

import itertools
import random
import statistics
from collections import deque
from dataclasses import dataclass

from tqdm.auto import tqdm

from minipaged.config import PREEMPTION_MODES, SchedulerConfig
from minipaged.reference.baselines import (
    BREAKDOWN_FIELDS,
    VATTENTION_PAGE_TOKENS,
    ContiguousAllocator,
    MemoryBreakdown,
    VAttentionAllocator,
)
from minipaged.reference.block_manager import BlockManager
from minipaged.reference.block_table import num_blocks_for
from minipaged.reference.scheduler import Scheduler
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus

ALLOCATORS = ("paged", "orca-max", "orca-pow2", "orca-oracle", "vattention")
# One model step, in seconds, whatever its batch: the order of an OPT-13B decode step on an A100.
STEP_TIME = 0.04


@dataclass(frozen=True)
class StepRecord:
    """One model step, measured after the model ran and before finished requests free their memory."""

    step: int
    time: float  # the clock when the step started, in seconds
    num_running: int  # requests (sequence groups) in the batch
    num_waiting: int  # requests that have arrived and wait (preempted ones included)
    num_seqs: int  # sequences in the batch (samples and beams count one each)
    breakdown: MemoryBreakdown
    blocks_used: int  # paged: KV blocks held; vattention: pages mapped; contiguous: live ranges
    blocks_saved_by_sharing: int  # paged: blocks that tables share (sum of table lengths - blocks used)


@dataclass
class SimulationResult:
    """Every step's record and the summaries the experiments plot."""

    allocator: str
    capacity: int  # token slots in the pool (kv_slots rounded down to whole blocks or pages)
    block_size: int  # slots per block (paged), page (vattention) or 1 (contiguous)
    records: list[StepRecord]
    num_requests: int
    num_finished: int
    num_preemptions: int
    prefix_cache_hits: int = 0  # paged with prefix caching: full prompt blocks found cached
    cow_copies: int = 0

    @property
    def steps(self) -> int:
        return len(self.records)

    @property
    def mean_batch_size(self) -> float:
        """Running requests per step, the paper's batch size."""
        return statistics.fmean(r.num_running for r in self.records) if self.records else 0.0

    @property
    def mean_utilization(self) -> float:
        """token_states / (capacity - free), averaged over steps with memory in use (Fig. 2's measure)."""
        values = [r.breakdown.utilization for r in self.records if r.breakdown.used]
        return statistics.fmean(values) if values else 1.0

    @property
    def mean_token_fraction(self) -> float:
        """token_states / capacity averaged over steps: the share of the whole pool holding tokens."""
        return self.mean_fractions["token_states"]

    @property
    def mean_fractions(self) -> dict[str, float]:
        """Each MemoryBreakdown field as a fraction of the capacity, averaged over steps."""
        if not self.records:
            return {name: 0.0 for name in BREAKDOWN_FIELDS}
        return {
            name: statistics.fmean(getattr(r.breakdown, name) for r in self.records) / self.capacity
            for name in BREAKDOWN_FIELDS
        }

    @property
    def peak_slots_used(self) -> int:
        """The most slots not free at once."""
        return max((r.breakdown.used for r in self.records), default=0)

    @property
    def max_blocks_saved_by_sharing(self) -> int:
        return max((r.blocks_saved_by_sharing for r in self.records), default=0)

    @property
    def mean_sharing_saving(self) -> float:
        """Blocks saved / blocks the tables would hold without sharing, averaged over steps (Fig. 15)."""
        values = [
            r.blocks_saved_by_sharing / (r.blocks_used + r.blocks_saved_by_sharing)
            for r in self.records
            if r.blocks_used
        ]
        return statistics.fmean(values) if values else 0.0

    def summary(self) -> dict:
        """The summaries as plain JSON values (one experiment row)."""
        fractions = self.mean_fractions
        return {
            "allocator": self.allocator,
            "capacity": self.capacity,
            "requests": self.num_requests,
            "finished": self.num_finished,
            "steps": self.steps,
            "mean_batch_size": self.mean_batch_size,
            "mean_utilization": self.mean_utilization,
            **{f"fraction_{name}": value for name, value in fractions.items()},
            "peak_slots_used": self.peak_slots_used,
            "max_blocks_saved_by_sharing": self.max_blocks_saved_by_sharing,
            "max_slots_saved_by_sharing": self.max_blocks_saved_by_sharing * self.block_size,
            "mean_sharing_saving": self.mean_sharing_saving,
            "preemptions": self.num_preemptions,
            "prefix_cache_hits": self.prefix_cache_hits,
        }


def simulate(
    workload,
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
        enable_prefix_caching: paged only: reuse cached full blocks of shared prefixes.
        preemption_mode: paged only: "recompute" or "swap" (a host pool as large as the device's).
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
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {', '.join(ALLOCATORS)}, got {allocator!r}")
    if not isinstance(step_time, (int, float)) or step_time <= 0:
        raise ValueError(f"step_time must be a positive number of seconds, got {step_time!r}")
    if preemption_mode not in PREEMPTION_MODES:
        raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {preemption_mode!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 0):
        raise ValueError(f"max_steps must be None or an int >= 0, got {max_steps!r}")
    requests = sorted(workload, key=lambda r: r.arrival_time)  # stable: ties keep workload order
    if len({r.request_id for r in requests}) != len(requests):
        raise ValueError("workload: request ids must be unique")
    if allocator == "paged":
        driver = _PagedDriver(
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
        driver = _OrcaDriver(allocator, kv_slots, max_model_len, max_num_seqs, page_tokens, watermark)
    for req in requests:  # every request is checked before anything runs
        driver.check(req, _width(req))
    records: list[StepRecord] = []
    pending, clock, finished = deque(requests), 0.0, 0
    with tqdm(total=len(requests), desc=f"simulate {allocator}", disable=not progress) as bar:
        while (pending or driver.has_unfinished()) and (max_steps is None or len(records) < max_steps):
            while pending and pending[0].arrival_time <= clock:
                driver.add(pending.popleft())
            if not driver.has_unfinished():
                clock = max(clock, pending[0].arrival_time)  # idle: jump to the next arrival
                continue
            record, done = driver.step(len(records), clock)
            records.append(record)
            finished += done
            bar.update(done)
            clock += step_time
    return driver.result(allocator, records, len(requests), finished)


def _width(req) -> int:
    """Sequences a request runs at once: its beam width, or its n samples."""
    n, beam_width = getattr(req, "n", 1), getattr(req, "beam_width", 0)
    if not isinstance(n, int) or n < 1 or not isinstance(beam_width, int) or beam_width < 0:
        raise ValueError(f"request {req.request_id!r}: n must be >= 1 and beam_width >= 0")
    if n > 1 and beam_width:
        raise ValueError(f"request {req.request_id!r}: parallel sampling (n={n}) and beam search both asked")
    return beam_width or n


class _PagedDriver:
    """The real Scheduler and BlockManager, driven as engine.LLM.step drives them."""

    def __init__(
        self, kv_slots, block_size, max_model_len, max_num_seqs, prefix_caching, mode, watermark, seed
    ):
        if not isinstance(kv_slots, int) or not isinstance(block_size, int) or not 0 < block_size <= kv_slots:
            raise ValueError(f"kv_slots must hold at least one block of {block_size}, got {kv_slots!r}")
        num_blocks = kv_slots // block_size
        self.manager = BlockManager(
            block_size, num_blocks, num_blocks if mode == "swap" else 0, watermark, prefix_caching
        )
        batched = max(max_model_len, 2048)  # as the engine's default
        self.scheduler = Scheduler(SchedulerConfig(max_model_len, max_num_seqs, batched, mode), self.manager)
        self.block_size, self.max_model_len, self.max_num_seqs = block_size, max_model_len, max_num_seqs
        self.rng = random.Random(seed)
        self.tokens = itertools.count(1)  # fresh token ids: no two requests' own tokens are equal
        self.requests: dict[str, object] = {}

    def check(self, req, width: int) -> None:
        """engine._prepare's test: the prompt's full blocks once, the rest once per sequence."""
        total = req.prompt_len + req.output_len
        if req.prompt_len < 1 or req.output_len < 1 or total > self.max_model_len:
            raise ValueError(
                f"request {req.request_id!r}: prompt_len and output_len must be >= 1 with a sum "
                f"<= max_model_len={self.max_model_len}, got {req.prompt_len} and {req.output_len}"
            )
        if width > self.max_num_seqs:
            raise ValueError(f"request {req.request_id!r}: width {width} > max_num_seqs={self.max_num_seqs}")
        shared = req.prompt_len // self.block_size
        needed = shared + width * (num_blocks_for(total - 1, self.block_size) - shared)
        usable = self.manager.device.num_blocks - self.manager.watermark_blocks
        if needed > usable:
            raise ValueError(
                f"request {req.request_id!r} needs {needed} blocks, the pool has {usable} usable"
            )

    def add(self, req) -> None:
        prefix_len, prefix_id = getattr(req, "prefix_len", 0), getattr(req, "prefix_id", 0)
        # A shared prefix's tokens depend on its id and position only, so equal prefixes hash alike.
        prompt = [(1 << 40) + prefix_id * (1 << 20) + i for i in range(prefix_len)]
        prompt += [next(self.tokens) for _ in range(req.prompt_len - prefix_len)]
        first, width = Sequence(prompt), _width(req)
        if getattr(req, "beam_width", 0):  # one sequence until the first step forks the beams
            group = SequenceGroup(req.request_id, [first], req.arrival_time, max_seqs=width)
        else:  # n samples share the prompt's blocks from admission on (engine._submit)
            seqs = [first] + [first.fork() for _ in range(width - 1)]
            group = SequenceGroup(req.request_id, seqs, req.arrival_time, max_seqs=width)
        self.requests[req.request_id] = req
        self.scheduler.add(group)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self, step: int, clock: float) -> tuple[StepRecord, int]:
        out = self.scheduler.schedule()
        if not out.scheduled and not out.preempted:
            raise RuntimeError("the scheduler made no progress: no request can run")
        for item in out.scheduled:  # the null model step: every scheduled token is now computed
            item.seq.num_computed_tokens = len(item.seq)
        record = self._record(step, clock, len(out.scheduled))
        groups: dict[str, tuple[SequenceGroup, list[Sequence]]] = {}
        for item in out.scheduled:
            groups.setdefault(item.group.request_id, (item.group, []))[1].append(item.seq)
        done = 0
        for request_id, (group, seqs) in groups.items():
            req = self.requests[request_id]
            if getattr(req, "beam_width", 0):
                finished = self._beam_step(group, seqs, req)
            else:
                for seq in seqs:
                    self._sample(seq, req)
                finished = group.is_finished()
            if finished:
                self.scheduler.finish(group)
                del self.requests[request_id]
                done += 1
        return record, done

    def _sample(self, seq: Sequence, req) -> None:
        """engine._sample without a model: a fresh token; finished at output_len, then freed."""
        seq.append_token_id(next(self.tokens))
        if len(seq.output_token_ids) >= req.output_len or len(seq) >= self.max_model_len:
            seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
            self.manager.free(seq)

    def _beam_step(self, group: SequenceGroup, seqs: list[Sequence], req) -> bool:
        """BeamState.step with a null policy: W parents drawn at random, forked and freed the same way."""
        if len(seqs[0].output_token_ids) + 1 >= req.output_len:  # every beam ends at output_len
            for seq in seqs:
                self.manager.free(seq)
                seq.status = SequenceStatus.FINISHED_STOPPED
            return True
        parents = sorted(self.rng.choices(range(len(seqs)), k=req.beam_width))
        children, used = [], set()
        for parent in parents:  # fork first, while every parent still ends where the step left it
            if parent in used:
                child = seqs[parent].fork()
                self.manager.fork(seqs[parent], child)
                children.append(child)
            else:
                used.add(parent)
                children.append(seqs[parent])
        for i, seq in enumerate(seqs):
            if i not in used:  # no continuation survived: the beam gives its blocks back
                self.manager.free(seq)
                seq.status = SequenceStatus.FINISHED_ABORTED
        for child in children:
            child.append_token_id(next(self.tokens))
        group.seqs = children
        return False

    def _record(self, step: int, clock: float, num_seqs: int) -> StepRecord:
        device, bs, s = self.manager.device, self.block_size, self.scheduler
        slots_used, saved = _paged_memory(self.manager)
        breakdown = MemoryBreakdown(slots_used, 0, device.num_used * bs - slots_used, 0, device.num_free * bs)
        waiting = len(s.waiting) + len(s.swapped)
        return StepRecord(step, clock, len(s.running), waiting, num_seqs, breakdown, device.num_used, saved)

    def result(self, allocator, records, num_requests, num_finished) -> SimulationResult:
        memory = self.manager.memory_stats()
        return SimulationResult(
            allocator,
            self.manager.device.num_blocks * self.block_size,
            self.block_size,
            records,
            num_requests,
            num_finished,
            sum(self.scheduler.num_preemptions.values()),
            memory.prefix_cache_hits,
            memory.cow_copies,
        )


def _paged_memory(manager: BlockManager) -> tuple[int, int]:
    """(slots holding a token, blocks saved by sharing) of the device pool: pool_stats's figures
    in O(sequences) instead of O(blocks), so that long runs stay fast.

    Every block but a table's last is full, and a partly filled block is only ever shared as the
    last block of tables with the same tokens (fork, or the n samples of a prompt): so the unfilled
    slots are block_size - fill of each distinct partial last block. The tests hold this to pool_stats.
    """
    tables, bs = manager.device_tables.values(), manager.block_size
    partial = {t.block_ids[-1]: t.num_filled_in_last_block for t in tables if t.num_tokens % bs}
    slots_used = manager.device.num_used * bs - sum(bs - fill for fill in partial.values())
    return slots_used, sum(len(t) for t in tables) - manager.device.num_used


@dataclass(frozen=True)
class _Seq:
    """One sequence of a request, as the baseline allocators see it."""

    request_id: str
    prompt_len: int
    output_len: int


@dataclass
class _Group:
    request: object
    order: int  # arrival order: the oldest runs first, the newest is preempted first
    seqs: list[_Seq]
    generated: int = 0  # tokens each sequence has generated


class _OrcaDriver:
    """Orca-like iteration-level FCFS batching over a baseline allocator; no sharing."""

    def __init__(self, allocator, kv_slots, max_model_len, max_num_seqs, page_tokens, watermark):
        if allocator == "vattention":
            self.alloc = VAttentionAllocator(kv_slots, page_tokens, max_model_len, watermark)
            self.block_size = page_tokens
        else:
            self.alloc = ContiguousAllocator(kv_slots, allocator.removeprefix("orca-"), max_model_len)
            self.block_size = 1
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[_Group] = deque()
        self.running: list[_Group] = []
        self.num_preemptions, self._order = 0, itertools.count()

    def check(self, req, width: int) -> None:
        if width > self.max_num_seqs:
            raise ValueError(f"request {req.request_id!r}: width {width} > max_num_seqs={self.max_num_seqs}")
        self.alloc.check(req, copies=width)

    def add(self, req) -> None:
        width = _width(req)
        ids = [req.request_id] if width == 1 else [f"{req.request_id}/{k}" for k in range(width)]
        self.waiting.append(
            _Group(req, next(self._order), [_Seq(i, req.prompt_len, req.output_len) for i in ids])
        )

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self, step: int, clock: float) -> tuple[StepRecord, int]:
        alloc = self.alloc
        # 1. Running requests, oldest first, store the token they sampled last step.
        queue, kept, preempted = deque(sorted(self.running, key=lambda g: g.order)), [], False
        while queue:
            group = queue.popleft()
            ids = [s.request_id for s in group.seqs]
            while not alloc.can_append(*ids):  # vattention only: a contiguous range never runs short
                victim = queue.pop() if queue else group
                self._preempt(victim)
                preempted = True
                if victim is group:
                    break
            else:
                for i in ids:
                    alloc.append(i)
                kept.append(group)
        self.running = kept
        # 2. Admit in arrival order while the allocator places every range of the head request.
        while not preempted and self.waiting:
            group = self.waiting[0]
            if sum(len(g.seqs) for g in self.running) + len(group.seqs) > self.max_num_seqs:
                break
            if not self._admit(group):
                break
            self.running.append(self.waiting.popleft())
        # 3. The model step has run: record, then every sequence samples a token; finished ones free.
        breakdown = alloc.breakdown(self.waiting[0].seqs if self.waiting else ())
        if isinstance(alloc, VAttentionAllocator):
            units = alloc.pages.num_used
        else:
            units = sum(len(g.seqs) for g in self.running)
        num_seqs = sum(len(g.seqs) for g in self.running)
        record = StepRecord(step, clock, len(self.running), len(self.waiting), num_seqs, breakdown, units, 0)
        if not self.running and not preempted:
            raise RuntimeError("no request can run: the head of the waiting queue never fits")
        done = 0
        for group in list(self.running):
            group.generated += 1
            if group.generated >= group.request.output_len:
                for s in group.seqs:
                    alloc.free(s.request_id)
                self.running.remove(group)
                done += 1
        return record, done

    def _admit(self, group: _Group) -> bool:
        """Place every sequence of the group, or none; a prefill stores the prompt and the tokens
        generated before a preemption (recompute)."""
        admitted = []
        for s in group.seqs:
            if not self.alloc.try_admit(s, s.prompt_len + group.generated):
                for i in admitted:
                    self.alloc.free(i)
                return False
            admitted.append(s.request_id)
        return True

    def _preempt(self, group: _Group) -> None:
        for s in group.seqs:
            self.alloc.free(s.request_id)
        self.waiting.appendleft(group)  # newest first, so the oldest ends up first
        self.num_preemptions += 1

    def result(self, allocator, records, num_requests, num_finished) -> SimulationResult:
        return SimulationResult(
            allocator,
            self.alloc.capacity,
            self.block_size,
            records,
            num_requests,
            num_finished,
            self.num_preemptions,
        )


__all__ = ["ALLOCATORS", "STEP_TIME", "SimulationResult", "StepRecord", "simulate"]
