"""What the memory simulator records: one StepRecord per model step, and the summaries over them.

OS idea: vmstat and sar sample the kernel's memory counters at fixed intervals (free, used, cached,
paged in and out), and a report averages the samples over a window; OSTEP's homework simulators print
the same kind of trace, then the totals (OSTEP ch. 17-22). KV counterpart: vLLM paper section 6: the
memory categories of Fig. 3 (token states, reservation, internal fragmentation, external fragmentation
and the free memory stranded while a request waits) sampled at every step, averaged into Fig. 2's
shares, the batch size of Fig. 13 and the sharing savings of Fig. 15.

A record is taken after the model step and before finished requests free their memory, as the engine
records its own step statistics (engine.LLM.step_stats).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace

from minipaged.experiments.memory_breakdown import BREAKDOWN_FIELDS, MemoryBreakdown

# the categories of the memory in use: every field but "free"
HELD_FIELDS = BREAKDOWN_FIELDS[:-1]


@dataclass(frozen=True)
class StepRecord:
    """One model step, measured after the model ran and before finished requests free their memory."""

    step: int
    time: float  # the clock when the step started, in seconds
    num_running: int  # requests (sequence groups) in the batch
    num_waiting: int  # requests that have arrived and wait (preempted ones included)
    num_seqs: int  # sequences in the batch (samples and beams count one each)
    breakdown: MemoryBreakdown
    # paged: KV blocks held; vattention: pages mapped; contiguous: live ranges
    blocks_used: int
    # paged: blocks that tables share (sum of table lengths - blocks used)
    blocks_saved_by_sharing: int
    # requests that finished in this step (their memory is freed after it)
    num_finished: int = 0
    # prompt tokens computed: admissions and recomputations, cache hits skipped
    num_prefill_tokens: int = 0
    num_preempted: int = 0  # requests preempted in this step
    # of num_prefill_tokens, those of requests readmitted after a preemption
    num_recomputed_tokens: int = 0
    # seconds the step took (the null model's step_time, or the cost model's)
    duration: float = 0.0
    # sequences that decoded a token in this step: each waited `duration` for it
    num_decodes: int = 0


@dataclass(frozen=True)
class FinishedRequest:
    """When one request of the workload arrived, got its first token and finished (simulated s)."""

    request_id: str
    arrival_time: float
    first_token_time: float
    finished_time: float
    output_len: int  # tokens it generated (each of its sequences)

    @property
    def latency(self) -> float:
        """End-to-end latency, from arrival to the last token."""
        return self.finished_time - self.arrival_time

    @property
    def normalized_latency(self) -> float:
        """Latency per output token, the paper's measure (section 6.1: s/token)."""
        return self.latency / self.output_len


@dataclass
class SimulationResult:
    """Every step's record and the summaries the experiments plot."""

    allocator: str
    # token slots in the pool (kv_slots rounded down to whole blocks or pages)
    capacity: int
    block_size: int  # slots per block (paged), page (vattention) or 1 (contiguous)
    records: list[StepRecord]
    num_requests: int
    num_finished: int
    num_preemptions: int
    # paged with prefix caching: full prompt blocks found cached
    prefix_cache_hits: int = 0
    prefix_cache_misses: int = 0  # ... and full prompt blocks that had to be computed
    cow_copies: int = 0
    # in the order they finished
    finished: list[FinishedRequest] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.records)

    @property
    def duration(self) -> float:
        """Simulated seconds from the first recorded step's start to the last one's end."""
        if not self.records:
            return 0.0
        return self.records[-1].time + self.records[-1].duration - self.records[0].time

    @property
    def throughput(self) -> float:
        """Requests finished per simulated second (0.0 for an empty run)."""
        return self.num_finished / self.duration if self.records else 0.0

    @property
    def mean_batch_size(self) -> float:
        """Running requests per step, the paper's batch size."""
        return (
            statistics.fmean(r.num_running for r in self.records)
            if self.records
            else 0.0
        )

    @property
    def mean_waiting(self) -> float:
        """Requests waiting per step: arrived, not running (0 when the system keeps up)."""
        return (
            statistics.fmean(r.num_waiting for r in self.records)
            if self.records
            else 0.0
        )

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
            name: statistics.fmean(getattr(r.breakdown, name) for r in self.records)
            / self.capacity
            for name in BREAKDOWN_FIELDS
        }

    @property
    def mean_used_fractions(self) -> dict[str, float]:
        """The five categories of the memory in use (every field but free), each as a fraction of
        capacity - free, averaged over steps with memory in use: they sum to 1 (Fig. 2's bars)."""
        used = [r.breakdown for r in self.records if r.breakdown.used]
        if not used:
            return {name: 0.0 for name in HELD_FIELDS}
        return {
            name: statistics.fmean(getattr(b, name) / b.used for b in used)
            for name in HELD_FIELDS
        }

    @property
    def peak_slots_used(self) -> int:
        """The most slots not free at once."""
        return max((r.breakdown.used for r in self.records), default=0)

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens computed over the run (recomputations included, prefix-cache hits not)."""
        return sum(r.num_prefill_tokens for r in self.records)

    @property
    def recomputed_tokens(self) -> int:
        """Prefill tokens computed again after a preemption by recompute (the prompt and the tokens
        generated before it), over the run. The null model's step costs the same whatever they are."""
        return sum(r.num_recomputed_tokens for r in self.records)

    @property
    def prefix_hit_rate(self) -> float:
        """Full prompt blocks found in the prefix cache / full prompt blocks looked up (0.0 if none)."""
        looked_up = self.prefix_cache_hits + self.prefix_cache_misses
        return self.prefix_cache_hits / looked_up if looked_up else 0.0

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

    def window(self, start: float, end: float = math.inf) -> SimulationResult:
        """The same run, restricted to the steps that start in [start, end) seconds.

        Used to leave out the warm-up, while the pool fills from empty. num_finished and
        num_preemptions count the window's steps; the prefix-cache and copy-on-write counters stay
        the whole run's (they are not recorded per step).
        """
        records = [r for r in self.records if start <= r.time < end]
        finished = sum(r.num_finished for r in records)
        return replace(
            self,
            records=records,
            num_finished=finished,
            num_preemptions=sum(r.num_preempted for r in records),
        )

    def summary(self) -> dict:
        """The summaries as plain JSON values (one experiment row)."""
        fractions = self.mean_fractions
        return {
            "allocator": self.allocator,
            "capacity": self.capacity,
            "requests": self.num_requests,
            "finished": self.num_finished,
            "steps": self.steps,
            "duration_s": self.duration,
            "throughput_rps": self.throughput,
            "mean_batch_size": self.mean_batch_size,
            "mean_utilization": self.mean_utilization,
            **{f"fraction_{name}": value for name, value in fractions.items()},
            "peak_slots_used": self.peak_slots_used,
            "max_blocks_saved_by_sharing": self.max_blocks_saved_by_sharing,
            "max_slots_saved_by_sharing": self.max_blocks_saved_by_sharing
            * self.block_size,
            "mean_sharing_saving": self.mean_sharing_saving,
            "preemptions": self.num_preemptions,
            "prefill_tokens": self.prefill_tokens,
            "recomputed_tokens": self.recomputed_tokens,
            "prefix_cache_hits": self.prefix_cache_hits,
        }


def request_width(req) -> int:
    """Sequences a request runs at once: its beam width, or its n samples (1 for neither).

    Raises:
        ValueError: naming the request, for n < 1, beam_width < 0, or both n > 1 and a beam width.
    """
    n, beam_width = getattr(req, "n", 1), getattr(req, "beam_width", 0)
    if (
        not isinstance(n, int)
        or n < 1
        or not isinstance(beam_width, int)
        or beam_width < 0
    ):
        raise ValueError(
            f"request {req.request_id!r}: n must be >= 1 and beam_width >= 0"
        )
    if n > 1 and beam_width:
        raise ValueError(
            f"request {req.request_id!r}: parallel sampling (n={n}) and beam search both asked"
        )
    return beam_width or n


__all__ = ["HELD_FIELDS", "SimulationResult", "StepRecord", "request_width"]
