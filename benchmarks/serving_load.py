"""Serving load generator: offer an OpenAI-compatible server a stream of requests, time the answers.

OS idea: a server is measured under an *open* workload: requests arrive on their own schedule (a
Poisson process, as independent users do) whether or not earlier ones are done, so a server that
falls behind builds a queue and its latency grows without bound, instead of slowing its clients
down (the open system model of queueing theory; Schroeder, Wierman and Harchol-Balter, "Open Versus
Closed: A Cautionary Tale", NSDI 2006). `--max-concurrency N` caps the requests in flight, which
turns the workload closed once the cap is reached: the excess waits in the client. KV counterpart:
vLLM paper section 6.1: ShareGPT- and Alpaca-like requests arrive as a Poisson process at a given
rate, and the figure of merit is the normalized latency; vLLM's benchmarks/benchmark_serving.py
measures a live server the same way, with TTFT and TPOT besides.

Per request (`RequestResult`), the clock starts when the request is sent (once the concurrency cap
lets it through, as in vLLM) and stops at each streamed chunk:

- TTFT, time to first token: until the first chunk that carries a choice. It holds the queueing in
  the server and the prefill of the prompt.
- TPOT, time per output token: (latency - ttft) / (output_tokens - 1), the decode pace a reader
  sees once text flows; undefined for a one-token answer.
- normalized latency: latency / output_tokens, the paper's metric (section 6.1), which lets
  requests of different lengths share one mean.
- latency: end to end, until the stream ends.

Over the run (`summarize`): completed and failed requests, the duration (from the start to the
last answer), request and output-token throughput (per second of that duration), and the mean,
median and p99 of each metric over the completed requests. Output tokens are the server's count
(`usage.completion_tokens` of the final chunk, asked for with stream_options include_usage), or,
with `--no-stream-usage`, the number of chunks that carried a choice.

Workloads come from minipaged.workloads (lengths only: the prompt is random token ids of that
length, the output length is `max_tokens`, and `ignore_eos` makes the server generate all of
them). Run it against a running server from the repository root:

    python benchmarks/serving_load.py --base-url http://127.0.0.1:8000/v1 --num-requests 100 \\
        --request-rate 4 --workload sharegpt-like --scale 0.1 --json load.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import urlparse

import numpy as np
import openai
from bench_common import machine, positive, utc_now
from tqdm import tqdm

from minipaged.presets import BYTE_OFFSET, VOCAB_SIZE
from minipaged.workloads import (
    Workload,
    alpaca_like,
    load_sharegpt,
    poisson_arrivals,
    sharegpt_like,
)

BENCHMARK = "serving_load"
ARRIVALS = ("poisson", "fixed")
WORKLOADS = ("sharegpt-like", "alpaca-like", "sharegpt")
KEPT_ERRORS = 5  # the messages of the first few failures go into the summary
# (summary key, table label); the summary holds seconds, the table milliseconds
METRICS = (
    ("ttft_s", "TTFT (ms)"),
    ("tpot_s", "TPOT (ms)"),
    ("normalized_latency_s", "Normalized latency (ms/token)"),
    ("latency_s", "E2E latency (ms)"),
)


def arrival_times(
    num_requests: int, request_rate: float, arrivals: str = "poisson", seed: int = 0
) -> list[float]:
    """When each request is sent, in seconds after the start of the run.

    Args:
        num_requests: how many times.
        request_rate: requests per second; inf sends them all at once (every time 0.0).
        arrivals: "poisson": exponential gaps of mean 1/request_rate from a seeded generator (the
            times minipaged.workloads gives a workload of this seed, so the simulated experiments
            and a live server see the same schedule); "fixed": gaps of exactly 1/request_rate.
            Either way the first request waits one gap.
        seed: picks the Poisson gaps.

    Raises:
        ValueError: naming the argument, for an unknown `arrivals` or a rate that is not > 0.
    """
    if arrivals not in ARRIVALS:
        raise ValueError(f"arrivals must be one of {ARRIVALS}, got {arrivals!r}")
    # nan > 0 is False
    rate_ok = isinstance(request_rate, (int, float)) and request_rate > 0
    if not rate_ok:
        raise ValueError(
            f"request_rate must be > 0 requests/s (or inf), got {request_rate!r}"
        )
    if arrivals == "poisson" or math.isinf(request_rate):
        # validates num_requests, seed
        return poisson_arrivals(num_requests, request_rate, seed)
    if not isinstance(num_requests, int) or num_requests < 1:
        raise ValueError(f"num_requests must be an int >= 1, got {num_requests!r}")
    return [(i + 1) / request_rate for i in range(num_requests)]


@dataclass(frozen=True)
class LoadRequest:
    """One request to send: a prompt (token ids, or text) and the number of tokens to ask for."""

    request_id: str
    prompt: list[int] | str
    prompt_len: int  # tokens in the prompt, as the workload counted them
    max_tokens: int


def scale_lengths(workload: Workload, scale: float) -> Workload:
    """The same requests with prompt and output lengths times `scale` (rounded, at least 1).

    Keeps the shape of the length distribution (the long tail) while making every request cheap,
    for a small model on a CPU.
    """
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be > 0, got {scale!r}")

    def scaled(n: int) -> int:
        return max(1, round(n * scale))

    requests = tuple(
        replace(
            r,
            prompt_len=scaled(r.prompt_len),
            output_len=scaled(r.output_len),
            prefix_len=min(r.prefix_len, scaled(r.prompt_len)),
        )
        for r in workload
    )
    return Workload(workload.name, requests, {**workload.params, "scale": scale})


def make_workload(
    name: str,
    num_requests: int,
    seed: int = 0,
    max_model_len: int = 2048,
    scale: float = 1.0,
    dataset_path: str | None = None,
) -> Workload:
    """The lengths to replay: "sharegpt-like", "alpaca-like" (synthetic, minipaged.workloads) or
    "sharegpt" (a local ShareGPT JSON at `dataset_path`, first turn of each conversation, lengths in
    words), scaled by `scale`.

    Raises:
        ValueError: naming the argument, for an unknown name or a missing `dataset_path`.
    """
    if name == "sharegpt":
        if dataset_path is None:
            raise ValueError("dataset_path is required for the 'sharegpt' workload")
        workload = load_sharegpt(
            dataset_path,
            num_requests,
            seed=seed,
            max_model_len=max_model_len,
            first_turn_only=True,
        )
    elif name in ("sharegpt-like", "alpaca-like"):
        synthetic = sharegpt_like if name == "sharegpt-like" else alpaca_like
        workload = synthetic(num_requests, seed=seed, max_model_len=max_model_len)
    else:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {name!r}")
    return scale_lengths(workload, scale)


def requests_from_workload(
    workload: Workload,
    vocab_size: int = VOCAB_SIZE,
    seed: int = 0,
    low: int = BYTE_OFFSET,
) -> list[LoadRequest]:
    """One LoadRequest per workload request: random prompt ids in [low, vocab_size), seeded.

    The defaults suit any server whose vocabulary has at least 259 ids, minipaged's byte tokenizer
    included; `low` = 3 keeps its pad, bos and eos ids out of the prompts. A workload's `n` and
    `beam_width` are not sent: every request asks for one sample.
    """
    return [
        LoadRequest(
            r.request_id,
            r.prompt_token_ids(vocab_size, seed, low),
            r.prompt_len,
            r.output_len,
        )
        for r in workload
    ]


@dataclass
class RequestResult:
    """What happened to one request; times in seconds (see the module docstring for the metrics).

    `arrival_time` is when it was due, `start_time` when it was sent (later when the concurrency
    cap held it back), both after the start of the run; `ttft` and `latency` count from
    `start_time`. A failed request has an `error` and no timings.
    """

    request_id: str
    prompt_len: int
    max_tokens: int
    arrival_time: float
    start_time: float = math.nan
    ttft: float = math.nan
    latency: float = math.nan
    output_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def success(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        """(latency - ttft) / (output_tokens - 1); None for a failure or a one-token answer."""
        if not self.success or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    @property
    def normalized_latency(self) -> float | None:
        """latency / output_tokens; None for a failure."""
        return self.latency / self.output_tokens if self.success else None

    def row(self) -> dict[str, Any]:
        """A JSON-ready dict: every field, the derived metrics, NaN as None."""
        row = {
            **asdict(self),
            "tpot": self.tpot,
            "normalized_latency": self.normalized_latency,
        }
        return {
            k: None if isinstance(v, float) and math.isnan(v) else v
            for k, v in row.items()
        }


@dataclass
class LoadResult:
    """A run: its settings, each request's result (in request order) and the run's duration (s)."""

    settings: dict[str, Any]
    results: list[RequestResult]
    duration: float
    summary: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.summary = summarize(self.results, self.duration)


def openai_base_url(base_url: str) -> str:
    """The client's base URL: `http://host:port` gets the `/v1` that OpenAI's client expects."""
    parsed = urlparse(base_url) if isinstance(base_url, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
        expected = "an http(s) URL like http://127.0.0.1:8000/v1"
        raise ValueError(f"base_url must be {expected}, got {base_url!r}")
    base_url = base_url.rstrip("/")
    return base_url + "/v1" if parsed.path in ("", "/") else base_url


async def send_request(
    client: openai.AsyncOpenAI,
    model: str,
    request: LoadRequest,
    arrival_time: float,
    t0: float,
    ignore_eos: bool = True,
    include_usage: bool = True,
) -> RequestResult:
    """Stream one completion and time it; a failure is recorded in the result, never raised."""
    result = RequestResult(
        request.request_id, request.prompt_len, request.max_tokens, arrival_time
    )
    start = time.perf_counter()
    result.start_time = start - t0
    chunks, usage_tokens = 0, None
    try:
        stream = await client.completions.create(
            model=model,
            prompt=request.prompt,
            max_tokens=request.max_tokens,
            stream=True,
            stream_options={"include_usage": True} if include_usage else openai.omit,
            extra_body={"ignore_eos": True} if ignore_eos else None,
        )
        async with stream:
            async for chunk in stream:
                if chunk.choices:  # the usage chunk carries none
                    if chunks == 0:
                        result.ttft = time.perf_counter() - start
                    chunks += 1
                    result.finish_reason = (
                        chunk.choices[0].finish_reason or result.finish_reason
                    )
                if chunk.usage is not None:
                    usage_tokens = chunk.usage.completion_tokens
        result.latency = time.perf_counter() - start
    # an HTTP status, a refused connection, a broken stream: counted
    except Exception as err:
        result.error = f"{type(err).__name__}: {err}"
        return result
    if chunks == 0:
        result.error = "the stream ended without a token"
    result.output_tokens = chunks if usage_tokens is None else usage_tokens
    return result


async def first_model(client: openai.AsyncOpenAI) -> str:
    """The id of the first model GET /v1/models lists (what the server serves)."""
    models = await client.models.list()
    if not models.data:
        raise ValueError("model: the server lists no models; pass one")
    return models.data[0].id


async def run_load(
    base_url: str,
    model: str | None,
    requests: Sequence[LoadRequest],
    request_rate: float = math.inf,
    arrivals: str = "poisson",
    max_concurrency: int | None = None,
    seed: int = 0,
    *,
    ignore_eos: bool = True,
    include_usage: bool = True,
    timeout: float = 600.0,
    api_key: str | None = None,
    progress: bool = True,
) -> LoadResult:
    """Send `requests` at their arrival times, at most `max_concurrency` at once, and time each.

    Args:
        base_url: the server, `http://host:port` or `http://host:port/v1`.
        model: the model name to ask for; None: the first that GET /v1/models lists.
        requests: what to send, in arrival order.
        request_rate, arrivals, seed: the schedule (see `arrival_times`).
        max_concurrency: requests in flight at most (None: no cap); a due request waits for a slot.
        ignore_eos: send `ignore_eos: true` (a vLLM extension) so each answer has `max_tokens`.
        include_usage: ask for the usage chunk (stream_options), the server's token count.
        timeout: seconds a request may take before it counts as failed.
        api_key: sent as the bearer token (default: $OPENAI_API_KEY, else "EMPTY").
        progress: show a tqdm bar over completed requests.

    Raises:
        ValueError: naming the argument, for bad settings.
    """
    if not requests or not all(isinstance(r, LoadRequest) for r in requests):
        raise ValueError(
            f"requests must be a non-empty sequence of LoadRequest, got {requests!r:.80}"
        )
    capped = isinstance(max_concurrency, int) and max_concurrency >= 1
    if not (max_concurrency is None or capped):
        raise ValueError(
            f"max_concurrency must be None or an int >= 1, got {max_concurrency!r}"
        )
    times = arrival_times(len(requests), request_rate, arrivals, seed)
    api_key = api_key or os.environ.get("OPENAI_API_KEY", "EMPTY")
    url = openai_base_url(base_url)
    client = openai.AsyncOpenAI(
        base_url=url, api_key=api_key, max_retries=0, timeout=timeout
    )
    async with client:  # no retries: a failure is a result
        model = model or await first_model(client)
        slots = (
            asyncio.Semaphore(max_concurrency)
            if max_concurrency
            else contextlib.nullcontext()
        )
        bar = tqdm(
            total=len(requests), desc="requests", unit="req", disable=not progress
        )
        t0 = time.perf_counter()

        async def arrive(request: LoadRequest, arrival: float) -> RequestResult:
            # due at t0 + arrival
            await asyncio.sleep(arrival - (time.perf_counter() - t0))
            async with slots:
                result = await send_request(
                    client, model, request, arrival, t0, ignore_eos, include_usage
                )
            bar.update(1)
            return result

        results = await asyncio.gather(*map(arrive, requests, times))
        duration = time.perf_counter() - t0
        bar.close()
    settings = dict(
        base_url=base_url,
        model=model,
        num_requests=len(requests),
        request_rate=request_rate,
        arrivals=arrivals,
        max_concurrency=max_concurrency,
        seed=seed,
        ignore_eos=ignore_eos,
        include_usage=include_usage,
    )
    return LoadResult(settings, list(results), duration)


def describe(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, median and p99 (linear interpolation between order statistics, numpy's default and
    vLLM's); all None for no values."""
    if len(values) == 0:
        return {"mean": None, "median": None, "p99": None}
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "median": float(np.median(array)),
        "p99": float(np.percentile(array, 99)),
    }


def summarize(results: Sequence[RequestResult], duration: float) -> dict[str, Any]:
    """The run's figures (see the module docstring): counts, throughputs, and each metric's
    mean/median/p99 over the completed requests, in seconds; the first few errors.

    Raises:
        ValueError: if `duration` is not > 0.
    """
    if not (isinstance(duration, (int, float)) and duration > 0):
        raise ValueError(f"duration must be > 0 seconds, got {duration!r}")
    done = [r for r in results if r.success]
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration,
        "total_input_tokens": sum(r.prompt_len for r in done),
        "total_output_tokens": output_tokens,
        "requested_output_tokens": sum(r.max_tokens for r in done),
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "ttft_s": describe([r.ttft for r in done]),
        "tpot_s": describe([r.tpot for r in done if r.tpot is not None]),
        "normalized_latency_s": describe([r.normalized_latency for r in done]),
        "latency_s": describe([r.latency for r in done]),
        "errors": [r.error for r in results if not r.success][:KEPT_ERRORS],
    }


def build_report(result: LoadResult, command: str) -> dict[str, Any]:
    """What `--json` writes: how it was run, the settings, the summary and one row per request."""
    return {
        "benchmark": BENCHMARK,
        "command": command,
        "machine": machine(),
        "date": utc_now(),
        "settings": {**result.settings, "request_rate": _json_rate(result.settings)},
        "summary": result.summary,
        "requests": [r.row() for r in result.results],
    }


def _json_rate(settings: dict[str, Any]) -> float | str:
    rate = settings["request_rate"]
    return "inf" if math.isinf(rate) else rate  # JSON has no infinity


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.2f}"


def format_table(report: dict[str, Any]) -> str:
    """The summary as a printed table, vLLM-style, in milliseconds."""
    s, cfg = report["summary"], report["settings"]
    cap = cfg["max_concurrency"] or "none"
    rate = float(cfg["request_rate"])  # "inf" in JSON
    schedule = "all at once" if math.isinf(rate) else f"{rate} req/s, {cfg['arrivals']}"
    lines = [
        f"# {report['command']}",
        f"# {report['machine']}; {report['date']}",
        f"# model {cfg['model']} at {cfg['base_url']}; {cfg['num_requests']} requests ({schedule}),"
        f" max concurrency {cap}, seed {cfg['seed']}",
        f"{'Completed requests:':<34}{s['completed']}",
        f"{'Failed requests:':<34}{s['failed']}",
        f"{'Duration (s):':<34}{s['duration_s']:.2f}",
        f"{'Input / output tokens:':<34}{s['total_input_tokens']} / {s['total_output_tokens']}"
        f" (asked {s['requested_output_tokens']})",
        f"{'Request throughput (req/s):':<34}{s['request_throughput']:.2f}",
        f"{'Output token throughput (tok/s):':<34}{s['output_throughput']:.2f}",
        f"{'metric':<34}{'mean':>10}{'median':>10}{'p99':>10}",
    ]
    for key, label in METRICS:
        d = s[key]
        lines.append(
            f"{label:<34}{_ms(d['mean']):>10}{_ms(d['median']):>10}{_ms(d['p99']):>10}"
        )
    lines += [f"error: {e}" for e in s["errors"]]
    return "\n".join(lines)


def _positive_float(text: str) -> float:
    """An argparse type: a number > 0 (inf included, for --request-rate)."""
    value = float(text)
    if not value > 0:  # nan too
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server")
    p.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    p.add_argument("--workload", choices=WORKLOADS, default="sharegpt-like")
    p.add_argument(
        "--dataset-path", default=None, help="a ShareGPT JSON, for --workload sharegpt"
    )
    p.add_argument("--num-requests", type=positive, default=100)
    p.add_argument(
        "--scale",
        type=_positive_float,
        default=1.0,
        help="multiply every length by this",
    )
    p.add_argument(
        "--max-model-len", type=positive, default=2048, help="longest prompt + output"
    )
    p.add_argument(
        "--vocab-size",
        type=positive,
        default=VOCAB_SIZE,
        help="prompt ids are below it",
    )
    p.add_argument(
        "--low-token-id",
        type=int,
        default=BYTE_OFFSET,
        help="prompt ids are at least it",
    )
    p.add_argument(
        "--request-rate",
        type=_positive_float,
        default=math.inf,
        help="req/s; inf: all at once",
    )
    p.add_argument("--arrivals", choices=ARRIVALS, default="poisson")
    p.add_argument("--max-concurrency", type=positive, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--no-stream-usage", dest="include_usage", action="store_false")
    p.add_argument(
        "--timeout", type=_positive_float, default=600.0, help="seconds per request"
    )
    p.add_argument(
        "--json", default=None, help="write the settings, summary and rows here"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load, print the table, write the JSON; 1 if no request completed (or no server)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = shlex.join(["python", f"benchmarks/{BENCHMARK}.py", *argv])
    try:
        workload = make_workload(
            args.workload,
            args.num_requests,
            args.seed,
            args.max_model_len,
            args.scale,
            args.dataset_path,
        )
        requests = requests_from_workload(
            workload, args.vocab_size, args.seed, args.low_token_id
        )
    # a bad length, vocabulary or dataset: said before anything is sent
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    load = run_load(
        args.base_url,
        args.model,
        requests,
        args.request_rate,
        args.arrivals,
        args.max_concurrency,
        args.seed,
        ignore_eos=args.ignore_eos,
        include_usage=args.include_usage,
        timeout=args.timeout,
        progress=args.progress,
    )
    try:
        result = asyncio.run(load)
    except (openai.APIError, ValueError) as err:  # no server (or no model) to ask for
        print(f"error: GET /v1/models at {args.base_url}: {err}", file=sys.stderr)
        return 1
    report = build_report(result, command)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0 if result.summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
