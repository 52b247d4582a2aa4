"""Workloads: the requests a serving experiment replays, with the paper's length distributions.

OS idea: an allocator is judged on a workload, a trace of allocation sizes, arrivals and lifetimes; when
no real trace is at hand, a synthetic one draws them from distributions fitted to measured traffic. A
policy that reserves for the worst case loses most when sizes are small on average but long-tailed
(OSTEP ch. 17, "Free-Space Management", and its malloc.py homework simulator). KV counterpart: how much
a KV cache wastes depends on the lengths it must hold, so the experiments need requests whose lengths
look like real traffic. vLLM paper section 6.1, "Workloads", Fig. 11: ShareGPT (conversations with
ChatGPT; mean input 161.31 tokens, mean output 337.99) and Alpaca (GPT-3.5 answers to instructions; mean
input 19.31, mean output 58.45), with requests arriving as a Poisson process at a given rate. Section
6.3 adds parallel sampling and beam search, section 6.4 a shared prefix (a 1-shot or 5-shot translation
prompt of 80 or 341 tokens).

Lengths are log-normal: exp(mu + sigma * z) with z standard normal, rounded and clipped so that 1 <=
prompt_len, 1 <= output_len and prompt_len + output_len <= max_model_len. Sigma sets the tail (our
choice: the paper gives histograms, not parameters); mu is solved by bisection so that the mean *after*
clipping equals the paper's mean. A seed fixes the lengths; the arrival times come from a second stream
of the same seed, so sweeping the rate (as Fig. 12 does) keeps the same requests. `load_sharegpt`
(minipaged/sharegpt.py, importable from here too) reads the lengths of a real ShareGPT JSON instead;
none is shipped.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_int(name: str, value: object, low: int) -> None:
    ok = (
        isinstance(value, (int, np.integer))
        and not isinstance(value, bool)
        and value >= low
    )
    _check(ok, f"{name} must be an int >= {low}, got {value!r}")


def _stream(*entropy: int) -> np.random.Generator:
    """An independent, reproducible random stream for one purpose (lengths, arrivals, token ids)."""
    return np.random.default_rng(list(entropy))


def _str_entropy(text: str) -> int:
    """A stable integer for a string (Python's hash() changes from run to run)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


@dataclass(frozen=True)
class Request:
    """One request of a workload: when it arrives and how long its prompt and its output are.

    Args:
        request_id: unique within its workload.
        arrival_time: seconds after the start of the experiment.
        prompt_len: tokens in the prompt.
        output_len: the TRUE number of tokens the request generates (run it with `ignore_eos` and
            `max_tokens=output_len`); the Orca (Oracle) baseline reserves exactly this much.
        prefix_len: leading prompt tokens shared with every request of the same `prefix_id`.
        prefix_id: which shared prefix those tokens are (section 6.4).
        n: parallel samples (section 6.3); 1 for none.
        beam_width: beams kept by beam search (section 6.3); 0 for none. A request samples `n` > 1
            or beam searches, not both.

    Raises:
        ValueError: naming the field, if a value is out of range.
    """

    request_id: str
    arrival_time: float
    prompt_len: int
    output_len: int
    prefix_len: int = 0
    prefix_id: int = 0
    n: int = 1
    beam_width: int = 0

    def __post_init__(self) -> None:
        t = self.arrival_time
        _check(
            isinstance(t, (int, float)) and math.isfinite(t) and t >= 0,
            f"arrival_time must be >= 0, got {t!r}",
        )
        lows = {
            "prompt_len": 1,
            "output_len": 1,
            "prefix_len": 0,
            "prefix_id": 0,
            "n": 1,
            "beam_width": 0,
        }
        for name, low in lows.items():
            _check_int(name, getattr(self, name), low)
        _check(
            self.prefix_len <= self.prompt_len,
            f"prefix_len must be <= prompt_len={self.prompt_len}",
        )
        _check(
            self.n == 1 or self.beam_width == 0,
            f"a request samples n={self.n} or beam searches, not both",
        )

    @property
    def total_len(self) -> int:
        """prompt_len + output_len: the most tokens one of its sequences holds."""
        return self.prompt_len + self.output_len

    def prompt_token_ids(
        self, vocab_size: int, seed: int = 0, low: int = 0
    ) -> list[int]:
        """Deterministic random token ids for the prompt, uniform in [low, vocab_size).

        The first `prefix_len` ids come from a stream keyed by (seed, prefix_id) alone, so requests
        with the same prefix share their leading tokens and a prefix cache finds the same block
        hashes (a shorter prefix of the same id is a prefix of the longer one). The rest are keyed by
        (seed, request_id), so they differ from request to request.

        Args:
            vocab_size: one past the largest id.
            seed: the same seed gives the same ids.
            low: the smallest id; e.g. 3 keeps ByteTokenizer's pad, bos and eos out of the prompt.
        """
        _check_int("low", low, 0)
        _check_int("vocab_size", vocab_size, low + 1)
        prefix = _stream(seed, 0, self.prefix_id).integers(
            low, vocab_size, self.prefix_len
        )
        rest_stream = _stream(seed, 1, _str_entropy(self.request_id))
        rest = rest_stream.integers(low, vocab_size, self.prompt_len - self.prefix_len)
        return [int(t) for t in np.concatenate([prefix, rest])]


@dataclass(frozen=True)
class Workload:
    """A named list of requests in arrival order, with the parameters that made it."""

    name: str
    requests: tuple[Request, ...]
    params: dict[str, Any] = field(default_factory=dict, compare=False)

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(self.requests)

    def __getitem__(self, index: int) -> Request:
        return self.requests[index]

    @property
    def mean_prompt_len(self) -> float:
        """Prompt tokens per request, the figure section 6.1 gives per dataset (161.31 for ShareGPT)."""
        return sum(r.prompt_len for r in self.requests) / len(self.requests)

    @property
    def mean_output_len(self) -> float:
        """True output tokens per request (337.99 for ShareGPT): with the step time, it sets how long
        a request holds its KV cache (Little's law, docs/experiments/batch-size.md)."""
        return sum(r.output_len for r in self.requests) / len(self.requests)

    def prompts(
        self, vocab_size: int, seed: int = 0, low: int = 0
    ) -> list[dict[str, list[int]]]:
        """The prompts as vLLM-style `{"prompt_token_ids": [...]}` dicts, for `LLM.generate`."""
        return [
            {"prompt_token_ids": r.prompt_token_ids(vocab_size, seed, low)}
            for r in self.requests
        ]


@dataclass(frozen=True)
class LengthSpec:
    """Log-normal prompt and output lengths: the target means (after clipping) and the spreads."""

    name: str
    mean_prompt_len: float
    mean_output_len: float
    prompt_sigma: float
    output_sigma: float


# The means are the paper's (section 6.1); the sigmas are ours, chosen for a long tail like Fig. 11's.
SHAREGPT = LengthSpec("sharegpt", 161.31, 337.99, prompt_sigma=1.0, output_sigma=1.0)
ALPACA = LengthSpec("alpaca", 19.31, 58.45, prompt_sigma=0.6, output_sigma=0.9)


def _clipped_lognormal_mean(mu: float, sigma: float, cap: float) -> float:
    """E[min(max(X, 1), cap)] for X = exp(mu + sigma * z), in closed form."""

    def cdf(x: float) -> float:  # the standard normal's
        return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))

    # lo, hi: logs of the clipping bounds 1 and cap
    lo, hi, s2 = 0.0, math.log(cap), sigma**2
    inside = math.exp(mu + s2 / 2) * (
        cdf((hi - mu - s2) / sigma) - cdf((lo - mu - s2) / sigma)
    )
    return cdf((lo - mu) / sigma) + inside + cap * (1.0 - cdf((hi - mu) / sigma))


def solve_mu(mean: float, sigma: float, cap: float) -> float:
    """The mu whose log-normal, clipped to [1, cap], has this mean (bisection: the mean grows with mu).

    A mean out of reach (>= cap) gives a mu that piles the lengths up at the cap.
    """
    lo, hi = -10.0 * sigma, math.log(cap) + 10.0 * sigma
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (
            (mid, hi) if _clipped_lognormal_mean(mid, sigma, cap) < mean else (lo, mid)
        )
    return (lo + hi) / 2


def poisson_arrivals(num_requests: int, rate: float, seed: int = 0) -> list[float]:
    """Arrival times of a Poisson process: exponential gaps of mean 1/rate; all 0.0 if rate is inf."""
    _check_int("num_requests", num_requests, 1)
    _check_int("seed", seed, 0)
    _check(
        isinstance(rate, (int, float)) and rate > 0,
        f"rate must be > 0 requests/s (or inf), got {rate!r}",
    )
    if math.isinf(rate):
        return [0.0] * num_requests
    return [
        float(t)
        for t in np.cumsum(_stream(seed, 1).exponential(1.0 / rate, num_requests))
    ]


def _lengths(
    rng: np.random.Generator, mean: float, sigma: float, cap: int, size: int
) -> np.ndarray:
    """`size` log-normal lengths, rounded, whose mean once clipped to [1, cap] is `mean`."""
    # [size], floats
    return np.rint(rng.lognormal(solve_mu(mean, sigma, cap), sigma, size))


def synthetic(
    spec: LengthSpec,
    num_requests: int,
    rate: float = math.inf,
    seed: int = 0,
    max_model_len: int = 2048,
) -> Workload:
    """Requests with log-normal lengths (see `LengthSpec`) and Poisson arrivals at `rate` requests/s.

    The prompt is clipped to [1, max_model_len - 1] and the output to [1, max_model_len - prompt_len],
    so every request fits the model; each mu is solved for the cap max_model_len - 1.
    """
    _check_int("max_model_len", max_model_len, 2)
    # validates num_requests, rate and seed
    arrivals = poisson_arrivals(num_requests, rate, seed)
    cap, rng = max_model_len - 1, _stream(seed, 0)
    prompt_lens = np.clip(
        _lengths(rng, spec.mean_prompt_len, spec.prompt_sigma, cap, num_requests),
        1,
        cap,
    )
    output_lens = _lengths(
        rng, spec.mean_output_len, spec.output_sigma, cap, num_requests
    )
    # the pair fits the model
    output_lens = np.clip(output_lens, 1, max_model_len - prompt_lens)
    lens = zip(
        prompt_lens.astype(int).tolist(), output_lens.astype(int).tolist(), strict=True
    )
    requests = tuple(
        Request(f"{spec.name}-{i}", arrivals[i], p, o) for i, (p, o) in enumerate(lens)
    )
    return Workload(
        spec.name,
        requests,
        dict(spec=spec, rate=rate, seed=seed, max_model_len=max_model_len),
    )


def sharegpt_like(
    num_requests: int, rate: float = math.inf, seed: int = 0, max_model_len: int = 2048
) -> Workload:
    """Long prompts and long, long-tailed outputs like ShareGPT (means 161.31 in, 337.99 out)."""
    return synthetic(SHAREGPT, num_requests, rate, seed, max_model_len)


def alpaca_like(
    num_requests: int, rate: float = math.inf, seed: int = 0, max_model_len: int = 2048
) -> Workload:
    """Short instructions and short answers like Alpaca (means 19.31 in, 58.45 out)."""
    return synthetic(ALPACA, num_requests, rate, seed, max_model_len)


def shared_prefix(
    num_requests: int,
    prefix_len: int = 80,
    rate: float = math.inf,
    seed: int = 0,
    max_model_len: int = 2048,
    num_prefixes: int = 1,
    mean_suffix_len: float = 32.0,
    mean_output_len: float = 32.0,
) -> Workload:
    """Few-shot prompts that start with one of `num_prefixes` shared prefixes (section 6.4, Fig. 16).

    The paper translates WMT16 sentences behind a 1-shot (80 tokens) or 5-shot (341 tokens) prefix
    and gives no sentence lengths, so the suffix (the sentence) and the output are log-normal with
    sigma 0.5 and these means: our assumption. With several prefixes each request picks one at random.
    """
    _check_int("prefix_len", prefix_len, 0)
    _check_int("num_prefixes", num_prefixes, 1)
    # room for one suffix and one output token
    _check_int("max_model_len", max_model_len, prefix_len + 2)
    spec = LengthSpec("shared-prefix", mean_suffix_len, mean_output_len, 0.5, 0.5)
    # the part after the prefix
    tail = synthetic(spec, num_requests, rate, seed, max_model_len - prefix_len)
    prefix_ids = _stream(seed, 2).integers(0, num_prefixes, num_requests).tolist()
    requests = tuple(
        replace(
            r, prompt_len=prefix_len + r.prompt_len, prefix_len=prefix_len, prefix_id=p
        )
        for r, p in zip(tail, prefix_ids, strict=True)
    )
    params = dict(
        tail.params,
        max_model_len=max_model_len,
        prefix_len=prefix_len,
        num_prefixes=num_prefixes,
    )
    return Workload(spec.name, requests, params)


def with_parallel_sampling(workload: Workload, n: int) -> Workload:
    """The same requests, each asking for `n` parallel samples (section 6.3, Fig. 14)."""
    _check_int("n", n, 1)
    requests = tuple(replace(r, n=n, beam_width=0) for r in workload)
    return Workload(f"{workload.name}+n{n}", requests, {**workload.params, "n": n})


def with_beam_search(workload: Workload, width: int) -> Workload:
    """The same requests, each beam searching with `width` beams (section 6.3, Fig. 14)."""
    _check_int("width", width, 1)
    requests = tuple(replace(r, n=1, beam_width=width) for r in workload)
    return Workload(
        f"{workload.name}+beam{width}",
        requests,
        {**workload.params, "beam_width": width},
    )


def __getattr__(name: str) -> Any:
    """`from minipaged.workloads import load_sharegpt` keeps working: the loader lives in
    minipaged/sharegpt.py, imported on first use (it imports this module: no import cycle)."""
    if name == "load_sharegpt":
        from minipaged.sharegpt import load_sharegpt

        return load_sharegpt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
