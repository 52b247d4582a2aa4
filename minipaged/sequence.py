"""Sequences and sequence groups: the "processes" whose memory the block manager pages.

OS idea: the kernel tracks each process (its pages, its state: ready, running, swapped out) in a
process control block (OSTEP ch. 4). KV counterpart: vLLM paper section 4.3-4.5. A *sequence* is one
stream of tokens (a prompt and what has been generated after it); it owns one block table. A
*sequence group* is one request: its n parallel samples or its beams, which share the prompt's
blocks and are scheduled, preempted and swapped together, all or nothing.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life, like a process's state."""

    # admitted by nobody yet, or preempted by recompute: holds no blocks
    WAITING = "waiting"
    RUNNING = "running"  # its blocks are in the device pool
    SWAPPED = "swapped"  # its blocks are in the host pool (swapped out)
    FINISHED_STOPPED = "finished_stopped"  # hit EOS or a stop token
    FINISHED_LENGTH_CAPPED = "finished_length_capped"  # hit max_tokens
    FINISHED_ABORTED = "finished_aborted"  # cancelled

    def __init__(self, value: str) -> None:
        # Decided once per state, not at every question: the scheduler asks it of every
        # sequence at every step (an enum's `name` is a slow descriptor).
        self.is_finished: bool = value.startswith("finished")


# one past the largest id handed out or given:
# constant memory, however long the process runs
_next_seq_id = [0]


def _new_seq_id() -> int:
    """A fresh id, above every id any Sequence has had, explicit ids included (like a pid counter)."""
    seq_id = _next_seq_id[0]
    _next_seq_id[0] += 1
    return seq_id


@dataclass(eq=False)
class Sequence:
    """One token stream: its prompt and the tokens generated after it.

    Equality is identity (`eq=False`): two sequences with the same tokens are still two processes.

    Attributes:
        seq_id: unique id; block tables are keyed by it.
        prompt_token_ids: the prompt.
        output_token_ids: tokens generated so far.
        status: see `SequenceStatus`.
        num_computed_tokens: how many leading tokens already have their K/V in the cache; the
            next model step computes the rest (all of the prompt at first, then one token a step).
        output_logprobs: the model's log-probability of each generated token.
        output_top_logprobs: for each generated token, the most likely tokens and their
            log-probabilities, when the request asked for them (SamplingParams.logprobs).
        stop_reason: the stop string or stop token id that ended it, if one did.
    """

    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    seq_id: int = field(default_factory=_new_seq_id)
    status: SequenceStatus = SequenceStatus.WAITING
    # tokens whose K/V are in the cache; 0 again after a recompute
    num_computed_tokens: int = 0
    # log p of each generated token
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[dict[int, float]] = field(default_factory=list)
    stop_reason: str | int | None = None

    def __post_init__(self) -> None:
        # so an explicit id is never handed out again by fork()
        if self.seq_id >= _next_seq_id[0]:
            _next_seq_id[0] = self.seq_id + 1

    @property
    def token_ids(self) -> list[int]:
        """Prompt then output: every token whose K/V the cache must hold."""
        return self.prompt_token_ids + self.output_token_ids

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens the next model step must compute: its q_len."""
        num_tokens = len(self.prompt_token_ids) + len(self.output_token_ids)
        return num_tokens - self.num_computed_tokens

    @property
    def cumulative_logprob(self) -> float:
        """Sum of output_logprobs: the log-probability of everything generated so far."""
        return sum(self.output_logprobs)

    def append_token_id(self, token_id: int, logprob: float = 0.0) -> None:
        """Record a generated token and its log-probability; BlockManager.append_slots finds its slot."""
        self.output_token_ids.append(token_id)
        self.output_logprobs.append(logprob)

    def fork(self) -> Sequence:
        """A child with a new id and a copy of this sequence's tokens, status and progress (like fork())."""
        return Sequence(
            list(self.prompt_token_ids),
            list(self.output_token_ids),
            status=self.status,
            num_computed_tokens=self.num_computed_tokens,
            output_logprobs=list(self.output_logprobs),
            output_top_logprobs=list(self.output_top_logprobs),
        )

    def is_finished(self) -> bool:
        return self.status.is_finished


@dataclass(eq=False)
class SequenceGroup:
    """One request: the sequences (samples or beams) that share its prompt.

    Attributes:
        request_id: the caller's name for the request.
        seqs: its sequences; parallel sampling and beam search add more by fork.
        arrival_time: when it arrived; first come, first served orders by it.
        max_seqs: the most sequences it will hold at once; the scheduler counts it against its
            max_num_seqs budget at admission.
        max_tokens: the most tokens each sequence will generate (its params' max_tokens), or None
            when unknown. Paged memory never needs it; an allocator that reserves a request's
            memory at admission (the Orca baselines, experiments/reservation.py) does.
    """

    request_id: str
    seqs: list[Sequence]
    arrival_time: float = field(default_factory=time.monotonic)
    # the most sequences it will hold at once (n samples, or the beam width)
    max_seqs: int = 1
    max_tokens: int | None = None  # the most tokens each sequence generates, when known

    def get_seqs(self, status: SequenceStatus | None = None) -> list[Sequence]:
        """The group's sequences, or only those with `status`."""
        if status is None:
            return list(self.seqs)
        # A loop, not a list comprehension: on Python 3.11 a comprehension is a function
        # call of its own (3.12 inlines it, PEP 709), dearer than the test for the usual
        # group of one, and the scheduler asks this of every group at every step.
        found = []
        for seq in self.seqs:
            if seq.status is status:
                found.append(seq)
        return found

    def get_unfinished_seqs(self) -> list[Sequence]:
        return [seq for seq in self.seqs if not seq.is_finished()]

    def add(self, seq: Sequence) -> None:
        """Add a forked sequence (a new sample or beam) to the group."""
        self.seqs.append(seq)

    def is_finished(self) -> bool:
        # a loop, not all() over a generator: the engine asks every step, and for the usual
        # group of one sequence the generator's setup costs more than the test
        for seq in self.seqs:  # noqa: SIM110
            if not seq.status.is_finished:
                return False
        return True
