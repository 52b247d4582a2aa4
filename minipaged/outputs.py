"""What the engine returns: generated sequences, beams, and what happened to memory, as plain data.

Names follow vLLM (RequestOutput, CompletionOutput) so a student can read vLLM's API afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One generated sequence of a request (one of its n samples).

    Attributes:
        index: which sample (0 .. n-1).
        text: the decoded tokens ("" without a tokenizer).
        token_ids: the generated tokens, the EOS included when it ended there.
        cumulative_logprob: the sum of `logprobs`.
        logprobs: the model's log-probability of each generated token.
        finish_reason: "stop" (EOS, a stop string or a stop token) or "length" (max_tokens or
            the model's length); None while the request is still running.
        stop_reason: the stop string or stop token id that ended it; None for EOS, a length cap,
            or while running (as vLLM's).
        top_logprobs: for each generated token, the `SamplingParams.logprobs` most likely token
            ids and their log-probabilities; None when not asked for.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float
    logprobs: list[float]
    finish_reason: str | None
    stop_reason: str | int | None = None
    top_logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestMetrics:
    """When things happened to one request, in seconds on the engine's clock (LLM.now()), as vLLM's.

    Attributes:
        arrival_time: when it arrived.
        first_scheduled_time: when the step that first ran it started (None: not yet).
        first_token_time: when its first token was sampled, the end of that step (None: not yet).
        finished_time: when its last token was sampled (None: not finished).
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def latency(self) -> float:
        """End-to-end: finished_time - arrival_time (the paper's request latency, section 6.1)."""
        if self.finished_time is None:
            raise ValueError("latency: the request has not finished")
        return self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    """A request's prompt and its samples, in index order, and its timings.

    `finished` is True for what generate() and step() return; LLM.request_output() gives the state
    of an unfinished request (its samples so far), which is how a server streams tokens.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    metrics: RequestMetrics | None = None


@dataclass
class BeamSequence:
    """One beam: generated tokens only, best beam first in BeamSearchOutput.sequences.

    Attributes:
        token_ids: the generated tokens (the EOS included when the beam ended there).
        cumulative_logprob: the sum of the tokens' log-probabilities.
        score: cumulative_logprob / len(token_ids) ** length_penalty, what beams are ranked by.
        text: the decoded tokens.
    """

    token_ids: list[int]
    cumulative_logprob: float
    score: float
    text: str = ""


@dataclass
class BeamSearchOutput:
    """A finished beam search: the beam_width best beams, best first."""

    request_id: str
    prompt_token_ids: list[int]
    sequences: list[BeamSequence]
    metrics: RequestMetrics | None = None


@dataclass
class StepStats:
    """One engine step, as the memory manager and the scheduler saw it.

    Attributes:
        step: the step's number, from 0.
        time, duration: when the step started and how long it took, in seconds on the engine's
            clock (simulated seconds under a simulated runner).
        num_running, num_waiting, num_swapped: groups in each queue as the step ran.
        num_seqs: sequences computed this step; num_batched_tokens: tokens computed, of which
            num_prefill_tokens by prefills (admissions and recomputations; cached tokens skipped).
        blocks_free, blocks_used, blocks_shared: the device pool after the model step, before the
            sequences that finished in it give their blocks back.
        kv_utilization: slots holding a token over slots in used blocks (the paper's KV usage).
        preempted: (request_id, "swap" | "recompute") for each group preempted this step.
        blocks_swapped_out, blocks_swapped_in, blocks_copied: block moves carried out this step.
    """

    step: int
    time: float
    duration: float
    num_running: int
    num_waiting: int
    num_swapped: int
    num_seqs: int
    num_batched_tokens: int
    blocks_free: int
    blocks_used: int
    blocks_shared: int
    kv_utilization: float
    num_prefill_tokens: int = 0
    preempted: list[tuple[str, str]] = field(default_factory=list)
    blocks_swapped_out: int = 0
    blocks_swapped_in: int = 0
    blocks_copied: int = 0


@dataclass
class EngineStats:
    """Totals since the engine was built: the figures the memory report prints.

    Attributes:
        steps: model steps run.
        num_preemptions: {"recompute": n, "swap": n}.
        blocks_swapped_out, blocks_swapped_in: blocks moved to and from the host pool.
        cow_copies: blocks copied by copy-on-write.
        prefix_cache_hits, prefix_cache_misses: full blocks found (or not) in the prefix cache.
        peak_blocks_used: the most device blocks in use after any step.
        mean_kv_utilization: the mean over steps of StepStats.kv_utilization.
        max_blocks_saved_by_sharing: the most blocks that sharing saved at any step.
        generated_tokens: tokens sampled.
        aborted_requests: requests cancelled by abort_request (or by a failed step).
    """

    steps: int = 0
    num_preemptions: dict[str, int] = field(
        default_factory=lambda: {"recompute": 0, "swap": 0}
    )
    blocks_swapped_out: int = 0
    blocks_swapped_in: int = 0
    cow_copies: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_misses: int = 0
    peak_blocks_used: int = 0
    mean_kv_utilization: float = 1.0
    max_blocks_saved_by_sharing: int = 0
    generated_tokens: int = 0
    aborted_requests: int = 0
