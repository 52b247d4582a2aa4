"""The paged side of the memory simulator: the real Scheduler and BlockManager, with a null model.

OS idea: a trace-driven simulation runs the real policy code against a recorded trace with the
expensive part stubbed out, as OSTEP's paging-policy.py runs replacement policies on a list of page
references without any program behind them (OSTEP ch. 22). KV counterpart: vLLM paper sections 4.2-4.5:
the block manager (demand paging, fork and copy-on-write, prefix caching, swapping) and the
iteration-level scheduler with preemption run unchanged, driven as engine.LLM.step drives them
(schedule -> model step -> append a token to each scheduled sequence -> finish and free), but the
model step computes nothing: every scheduled token is simply marked computed, and every running
sequence samples a fresh token id until it has generated its request's output_len tokens.

Parallel sampling forks the prompt's sequence n times at admission, as engine._submit does; beam
search runs BeamState.step's fork-and-free shape under a seeded null policy (each step draws the W
parents at random). simulator.simulate is the loop that feeds requests in and collects the records.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

from minipaged.config import SchedulerConfig
from minipaged.experiments.memory_breakdown import MemoryBreakdown, waiting_waste
from minipaged.experiments.records import SimulationResult, StepRecord, request_width
from minipaged.reference.block_manager import AllocStatus, BlockManager
from minipaged.reference.block_table import num_blocks_for
from minipaged.reference.scheduler import Scheduler
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus


class PagedDriver:
    """The real Scheduler and BlockManager, driven as engine.LLM.step drives them (simulate checks
    the settings first)."""

    def __init__(
        self, kv_slots, block_size, max_model_len, max_num_seqs, prefix_caching, mode, watermark, seed
    ):
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
        self.admitted: set[str] = set()  # requests scheduled at least once: their next prefill recomputes

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
        first, width = Sequence(prompt), request_width(req)
        if getattr(req, "beam_width", 0):  # one sequence until the first step forks the beams
            group = SequenceGroup(req.request_id, [first], req.arrival_time, max_seqs=width)
        else:  # n samples share the prompt's blocks from admission on (engine._submit)
            seqs = [first] + [first.fork() for _ in range(width - 1)]
            group = SequenceGroup(req.request_id, seqs, req.arrival_time, max_seqs=width)
        self.requests[req.request_id] = req
        self.scheduler.add(group)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self, step: int, clock: float) -> StepRecord:
        """One engine step: schedule, run the null model, sample, finish and free."""
        s = self.scheduler  # a group scheduled now that was neither running nor swapped is a prefill
        resident = {group.request_id for group in s.running} | {group.request_id for group in s.swapped}
        out = self.scheduler.schedule()
        if not out.scheduled and not out.preempted:
            raise RuntimeError("the scheduler made no progress: no request can run")
        prefill = recomputed = 0
        for item in out.scheduled:
            request_id = item.group.request_id
            if request_id not in resident:  # a prefill: first admitted now, or again after a preemption
                prefill += item.num_query_tokens
                recomputed += item.num_query_tokens if request_id in self.admitted else 0
        self.admitted |= {item.group.request_id for item in out.scheduled}
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
        return replace(
            record,
            num_finished=done,
            num_prefill_tokens=prefill,
            num_preempted=len(out.preempted),
            num_recomputed_tokens=recomputed,
        )

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
        # Free blocks are stranded while the head waits for memory; any block serves any request, so
        # there is never external fragmentation (memory_breakdown.waiting_waste: one rule for all).
        _, stranded, free = waiting_waste(device.num_free * bs, self._head_waits_for_memory(), False)
        breakdown = MemoryBreakdown(slots_used, 0, device.num_used * bs - slots_used, 0, stranded, free)
        waiting = len(s.waiting) + len(s.swapped)
        return StepRecord(step, clock, len(s.running), waiting, num_seqs, breakdown, device.num_used, saved)

    def _head_waits_for_memory(self) -> bool:
        """Does the request the scheduler would admit next (the oldest swapped one, else the head of
        the waiting queue) fail the block manager's admission test now?"""
        s, manager = self.scheduler, self.manager
        if s.swapped:
            return not manager.can_swap_in(s.swapped[0])
        return bool(s.waiting) and manager.can_allocate(s.waiting[0]) != AllocStatus.OK

    def result(self, allocator, records, num_requests, step_time) -> SimulationResult:
        cache = self.manager.device  # a PrefixCachingBlockAllocator counts hits and misses
        return SimulationResult(
            allocator,
            self.manager.device.num_blocks * self.block_size,
            self.block_size,
            records,
            num_requests,
            sum(r.num_finished for r in records),
            sum(self.scheduler.num_preemptions.values()),
            step_time,
            getattr(cache, "hits", 0),
            getattr(cache, "misses", 0),
            self.manager.cow_copies,
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


__all__ = ["PagedDriver"]
