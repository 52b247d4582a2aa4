"""Choosing the next token: greedy, temperature, top-k, top-p, seeds; and the parameters of a request.

OS idea: none this time; this is the model's side. KV counterpart: vLLM paper section 4.4 (parallel
sampling and beam search are why a request owns several sequences that share blocks) and vLLM's
SamplingParams. Every sequence draws from its own seeded torch.Generator, so its tokens depend on
its request's seed and its index among the request's samples, never on which other requests share
the batch.

The log-probability reported for a token is the model's: log_softmax of the raw logits, before
temperature, top-k or top-p reshape the distribution it was drawn from.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

# vLLM's floor too: logits / 1e-38 overflow to inf and softmax turns them to NaN
MIN_TEMPERATURE = 1e-2


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to generate for one request (names and defaults as vLLM's).

    Args:
        n: parallel samples; they share the prompt's blocks (fork) until they diverge.
        temperature: 0 is greedy; higher flattens the distribution.
        top_p: keep the smallest set of tokens whose probability adds up to top_p (1: all).
        top_k: keep the k most likely tokens (0: all).
        max_tokens: the most tokens to generate.
        seed: seeds the request's generators; None draws from the engine's seed.
        ignore_eos: keep generating past the end-of-sequence token.
        stop: strings that end a sample when its text contains one; the text returned stops
            before it (vLLM's default). A single string is one stop string.
        stop_token_ids: tokens that end a sample when sampled (even with ignore_eos), kept in
            its token_ids.
        logprobs: also report, for each generated token, the log-probabilities of this many most
            likely tokens (None: only the sampled token's).

    Raises:
        ValueError: naming the field, if a value is out of range.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    seed: int | None = None
    ignore_eos: bool = False
    stop: str | tuple[str, ...] | list[str] | None = None  # a tuple once constructed
    # a tuple once constructed
    stop_token_ids: tuple[int, ...] | list[int] | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        _check(
            _is_int(self.n) and self.n >= 1, f"n must be an int >= 1, got {self.n!r}"
        )
        _check(
            isinstance(self.temperature, (int, float))
            and not isinstance(self.temperature, bool)
            and math.isfinite(self.temperature)
            and (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE),
            f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE} (below it the "
            f"scaled logits overflow), got {self.temperature!r}",
        )
        _check(
            isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
            f"top_p must be in (0, 1], got {self.top_p!r}",
        )
        _check(
            _is_int(self.top_k) and self.top_k >= 0,
            f"top_k must be an int >= 0 (0: off), got {self.top_k!r}",
        )
        _check(
            _is_int(self.max_tokens) and self.max_tokens >= 1,
            f"max_tokens must be an int >= 1, got {self.max_tokens!r}",
        )
        _check(
            self.seed is None or _is_int(self.seed),
            f"seed must be an int or None, got {self.seed!r}",
        )
        _check(
            isinstance(self.ignore_eos, bool),
            f"ignore_eos must be a bool, got {self.ignore_eos!r}",
        )
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        _check(
            stop is None
            or (
                isinstance(stop, (list, tuple))
                and all(isinstance(s, str) and s for s in stop)
            ),
            f"stop must be a non-empty string or a list of them, got {self.stop!r}",
        )
        # normalized once (frozen, hashable)
        object.__setattr__(self, "stop", tuple(stop or ()))
        ids = self.stop_token_ids
        _check(
            ids is None
            or (
                isinstance(ids, (list, tuple))
                and all(_is_int(t) and t >= 0 for t in ids)
            ),
            f"stop_token_ids must be a list of token ids (ints >= 0), got {ids!r}",
        )
        object.__setattr__(self, "stop_token_ids", tuple(ids or ()))
        _check(
            self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0),
            f"logprobs must be None or an int >= 0 (how many top tokens to report), got {self.logprobs!r}",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class BeamSearchParams:
    """Beam search for one request, scored like transformers' generate(num_beams=beam_width).

    Args:
        beam_width: beams kept at each step; also the number of sequences returned.
        max_tokens: the most tokens to generate.
        length_penalty: a finished beam scores cumulative_logprob / length ** length_penalty.
        ignore_eos: no beam ends at the end-of-sequence token.

    Raises:
        ValueError: naming the field, if a value is out of range.
    """

    beam_width: int = 4
    max_tokens: int = 16
    length_penalty: float = 1.0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check(
            _is_int(self.beam_width) and self.beam_width >= 1,
            f"beam_width must be an int >= 1, got {self.beam_width!r}",
        )
        _check(
            _is_int(self.max_tokens) and self.max_tokens >= 1,
            f"max_tokens must be an int >= 1, got {self.max_tokens!r}",
        )
        _check(
            isinstance(self.length_penalty, (int, float))
            and math.isfinite(self.length_penalty),
            f"length_penalty must be a finite number, got {self.length_penalty!r}",
        )


def seeded_generator(
    seed: int, index: int, device: str | torch.device = "cpu"
) -> torch.Generator:
    """The generator of sample `index` of a request seeded `seed`: the same wherever it is batched."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return torch.Generator(device=device).manual_seed(
        int.from_bytes(digest[:8], "little") >> 1
    )


def top_logprobs(logits: torch.Tensor, k: int) -> dict[int, float]:
    """The k most likely tokens of one sequence's logits `[vocab]` and their log-probabilities."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [vocab]
    values, tokens = torch.topk(logprobs, min(k, logprobs.numel()))  # [k], [k]
    return dict(zip(tokens.tolist(), values.tolist(), strict=True))


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[int, float]:
    """Pick the next token from one sequence's logits `[vocab]`; return it and its log-probability.

    Greedy takes the argmax. Otherwise: divide by the temperature, keep the top_k tokens, keep the
    top_p nucleus, and draw with `generator`.
    """
    logits = logits.float()  # [vocab]
    # the model's own distribution, reported
    logprobs = torch.log_softmax(logits, dim=-1)
    if params.greedy:
        token = int(torch.argmax(logits))
        return token, float(logprobs[token])
    scaled = logits / params.temperature  # [vocab]
    if params.top_k:
        kth = torch.topk(scaled, min(params.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # [vocab]
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # mass of the tokens ranked above
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        # the first always stays
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(logprobs[token])
