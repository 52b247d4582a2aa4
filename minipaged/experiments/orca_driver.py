"""The baselines' side of the memory simulator: an Orca-like loop over a contiguous or vAttention allocator.

OS idea: an allocation-policy simulator replays a trace of allocate and free calls against a free-list
policy and counts what is used and what is lost to fragmentation, as OSTEP's malloc.py does for
first, best and worst fit (OSTEP ch. 17). KV counterpart: vLLM paper section 6.1's baselines, Orca
(Max), Orca (Pow2) and Orca (Oracle), run with Orca's iteration-level FCFS batching (section 2.3):
at every step the running requests store one token each, then waiting requests are admitted in
arrival order while the allocator can place them. Nothing is shared, so a request with n samples or
W beams holds n or W ranges. Only vAttention (experiments/vattention.py) can run short of pages while a
request grows; it then preempts the newest request by recompute, as vLLM's scheduler (which it runs
under) does.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, replace

from minipaged.experiments.baselines import ContiguousAllocator
from minipaged.experiments.records import SimulationResult, StepRecord, request_width
from minipaged.experiments.vattention import VAttentionAllocator


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
    preempted: bool = False  # preempted (by recompute) at least once: its next prefill recomputes


class OrcaDriver:
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
        width = request_width(req)
        ids = [req.request_id] if width == 1 else [f"{req.request_id}/{k}" for k in range(width)]
        self.waiting.append(
            _Group(req, next(self._order), [_Seq(i, req.prompt_len, req.output_len) for i in ids])
        )

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self, step: int, clock: float) -> StepRecord:
        """One Orca iteration: grow the running requests, admit waiting ones, record, sample, free."""
        alloc, preemptions_before, prefill = self.alloc, self.num_preemptions, 0
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
        recomputed = 0
        while not preempted and self.waiting:
            group = self.waiting[0]
            if sum(len(g.seqs) for g in self.running) + len(group.seqs) > self.max_num_seqs:
                break
            if not self._admit(group):
                break
            self.running.append(self.waiting.popleft())
            tokens = len(group.seqs) * (group.seqs[0].prompt_len + group.generated)  # each range its own
            prefill += tokens
            recomputed += tokens if group.preempted else 0  # all computed before the preemption
        # 3. The model step has run: record, then every sequence samples a token; finished ones free.
        # The free memory is waste while the head waits for memory (memory_breakdown.waiting_waste).
        head = self.waiting[0] if self.waiting else None
        breakdown = alloc.breakdown(*self._admission(head)) if head else alloc.breakdown()
        if isinstance(alloc, VAttentionAllocator):
            units = alloc.pages.num_used
        else:
            units = sum(len(g.seqs) for g in self.running)
        num_seqs = sum(len(g.seqs) for g in self.running)
        preempted_now = self.num_preemptions - preemptions_before
        record = StepRecord(
            step,
            clock,
            len(self.running),
            len(self.waiting),
            num_seqs,
            breakdown,
            units,
            0,
            0,
            prefill,
            preempted_now,
            recomputed,
        )
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
        return replace(record, num_finished=done)

    @staticmethod
    def _admission(group: _Group) -> tuple[list[_Seq], int]:
        """What admitting the group asks of the allocator: its sequences, and the tokens each stores
        (the prompt, and the tokens generated before a preemption by recompute)."""
        return group.seqs, group.seqs[0].prompt_len + group.generated

    def _admit(self, group: _Group) -> bool:
        """Place every sequence of the group, or none (see _admission)."""
        admitted = []
        seqs, num_tokens = self._admission(group)
        for s in seqs:
            if not self.alloc.try_admit(s, num_tokens):
                for i in admitted:
                    self.alloc.free(i)
                return False
            admitted.append(s.request_id)
        return True

    def _preempt(self, group: _Group) -> None:
        for s in group.seqs:
            self.alloc.free(s.request_id)
        group.preempted = True
        self.waiting.appendleft(group)  # newest first, so the oldest ends up first
        self.num_preemptions += 1

    def result(self, allocator, records, num_requests, step_time) -> SimulationResult:
        return SimulationResult(
            allocator,
            self.alloc.capacity,
            self.block_size,
            records,
            num_requests,
            sum(r.num_finished for r in records),
            self.num_preemptions,
            step_time,
        )


__all__ = ["OrcaDriver"]
