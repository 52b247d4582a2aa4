"""benchmarks/serving_load.py: its arrival schedules and its summary maths on known inputs, then real
runs against minipaged's OpenAI-compatible server (tiny-llama on CPU).

Benchmarks are not timed assertions (DESIGN.md): nothing here checks how fast the server is, only that
the load generator sends what the workload says, when it says, and reports what happened: every request
gets the tokens it asked for, the timings are consistent, the JSON holds what the table prints, and a
refused or rejected request is counted as failed instead of stopping the run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import math
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

# a server hides a stub's error from the test (student copy: tests/conftest.py)
pytestmark = pytest.mark.needs_every_task

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serving_load.py"
METRIC_KEYS = ("ttft_s", "tpot_s", "normalized_latency_s", "latency_s")


@pytest.fixture(scope="module")
def load():
    """The script imported as a module (benchmarks/ is not a package)."""
    # as `python benchmarks/...` does: bench_common sits beside it
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("serving_load_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def server():
    """A real minipaged server over tiny-llama on CPU, on a free port."""
    from minipaged import LLM
    from minipaged.serving import running_server

    llm = LLM("tiny-llama", seed=0, max_step_stats=16)
    with running_server(llm) as base_url:
        yield base_url


@pytest.fixture
def rng():
    return np.random.default_rng()  # fresh inputs every run


# --- the arrival schedule ---------------------------------------------------------------------------


def test_poisson_gaps_are_exponential_with_mean_one_over_rate(load, rng):
    seed, rate, n = int(rng.integers(2**31)), float(rng.uniform(1.0, 50.0)), 4000
    times = load.arrival_times(n, rate, "poisson", seed)
    gaps = np.diff([0.0, *times])
    assert (gaps > 0).all()
    # The mean of n exponential gaps has a relative spread of 1/sqrt(n) = 1.6%; the standard
    # deviation (equal to the mean for an exponential) about sqrt(2/n) = 2.2%: both within ~4 sigma.
    assert gaps.mean() * rate == pytest.approx(1.0, abs=0.065), (seed, rate)
    assert gaps.std() * rate == pytest.approx(1.0, abs=0.09), (seed, rate)
    # seeded: the same schedule again
    assert load.arrival_times(n, rate, "poisson", seed) == times
    assert load.arrival_times(n, rate, "poisson", seed + 1) != times


def test_fixed_arrivals_have_exact_gaps_and_inf_sends_all_at_once(load, rng):
    rate, n = float(rng.uniform(0.5, 100.0)), int(rng.integers(2, 200))
    times = load.arrival_times(n, rate, "fixed", seed=int(rng.integers(100)))
    np.testing.assert_allclose(np.diff([0.0, *times]), 1.0 / rate, rtol=1e-12)
    for arrivals in ("poisson", "fixed"):
        assert load.arrival_times(n, math.inf, arrivals) == [0.0] * n


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(request_rate=2.0, arrivals="uniform"), "arrivals"),
        (dict(request_rate=0.0, arrivals="poisson"), "request_rate"),
        (dict(request_rate=-1.0, arrivals="fixed"), "request_rate"),
        (dict(request_rate=math.nan, arrivals="fixed"), "request_rate"),
    ],
)
def test_bad_schedule_raises_naming_the_argument(load, kwargs, field):
    with pytest.raises(ValueError, match=field):
        load.arrival_times(5, **kwargs)


# --- the summary maths ------------------------------------------------------------------------------


def test_describe_on_known_and_random_inputs(load, rng):
    values = rng.permutation(np.arange(1.0, 101.0))  # 1..100 in a fresh order
    d = load.describe(list(values))
    # p99 interpolates between the 99th and 100th order statistics: 99 + 0.01 * (100 - 99)
    assert d == pytest.approx({"mean": 50.5, "median": 50.5, "p99": 99.01})
    sample = rng.lognormal(0.0, 1.0, int(rng.integers(3, 500)))
    ordered, pos = np.sort(sample), 0.99 * (len(sample) - 1)
    low, frac = int(pos), pos - int(pos)
    p99 = ordered[low] + frac * (ordered[min(low + 1, len(sample) - 1)] - ordered[low])
    d = load.describe(sample)
    assert d["median"] <= d["p99"] <= ordered[-1]
    assert d["p99"] == pytest.approx(p99, rel=1e-12) and d["mean"] == pytest.approx(
        sample.sum() / len(sample)
    )
    assert load.describe([]) == {"mean": None, "median": None, "p99": None}


def _random_result(load, rng, i, output_tokens=None, error=None):
    ttft = float(rng.uniform(0.01, 0.5))
    return load.RequestResult(
        request_id=f"r{i}",
        prompt_len=int(rng.integers(1, 100)),
        max_tokens=int(rng.integers(1, 100)),
        arrival_time=float(rng.uniform(0, 5)),
        start_time=math.nan if error else float(rng.uniform(5, 6)),
        ttft=math.nan if error else ttft,
        latency=math.nan if error else ttft + float(rng.uniform(0.01, 3.0)),
        output_tokens=0 if error else (output_tokens or int(rng.integers(2, 100))),
        error=error,
    )


def test_summarize_on_known_results(load, rng):
    done = [_random_result(load, rng, i) for i in range(int(rng.integers(3, 20)))]
    one_token = _random_result(load, rng, len(done), output_tokens=1)  # has no TPOT
    failed = [
        _random_result(load, rng, 100 + i, error=f"HTTP {400 + i}") for i in range(7)
    ]
    results = [*failed[:3], *done, one_token, *failed[3:]]
    duration = float(rng.uniform(1.0, 10.0))
    s = load.summarize(results, duration)
    ok = [*done, one_token]
    tokens = sum(r.output_tokens for r in ok)
    assert (s["completed"], s["failed"], s["duration_s"]) == (len(ok), 7, duration)
    assert s["total_output_tokens"] == tokens and s["total_input_tokens"] == sum(
        r.prompt_len for r in ok
    )
    assert s["request_throughput"] == pytest.approx(len(ok) / duration)
    assert s["output_throughput"] == pytest.approx(tokens / duration)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done]
    assert s["tpot_s"] == pytest.approx(load.describe(tpots))
    assert s["normalized_latency_s"] == pytest.approx(
        load.describe([r.latency / r.output_tokens for r in ok])
    )
    assert s["ttft_s"] == pytest.approx(load.describe([r.ttft for r in ok]))
    assert s["latency_s"] == pytest.approx(load.describe([r.latency for r in ok]))
    # the first few, in order
    assert s["errors"] == [f"HTTP {400 + i}" for i in range(load.KEPT_ERRORS)]
    assert one_token.tpot is None and failed[0].normalized_latency is None
    with pytest.raises(ValueError, match="duration"):
        load.summarize(results, 0.0)


def test_scale_lengths_and_base_url(load, rng):
    seed, scale = int(rng.integers(2**31)), float(rng.uniform(0.01, 0.5))
    full = load.make_workload("sharegpt-like", 50, seed)
    small = load.make_workload("sharegpt-like", 50, seed, scale=scale)
    for a, b in zip(full, small, strict=True):
        assert b.prompt_len == max(1, round(a.prompt_len * scale))
        assert b.output_len == max(1, round(a.output_len * scale))
    assert load.openai_base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert (
        load.openai_base_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1"
    )
    with pytest.raises(ValueError, match="base_url"):
        load.openai_base_url("127.0.0.1:8000")
    with pytest.raises(ValueError, match="workload"):
        load.make_workload("lmsys", 5)


# --- real runs --------------------------------------------------------------------------------------


def _peak_in_flight(rows):
    """The most [start, start + latency] intervals open at once (a sweep over their ends)."""
    events = sorted(
        [(r["start_time"] + r["latency"], -1) for r in rows]
        + [(r["start_time"], 1) for r in rows]
    )
    open_now = peak = 0
    # at a tie an end (-1) sorts before a start: the slot was freed first
    for _, delta in events:
        open_now += delta
        peak = max(peak, open_now)
    return peak


def test_load_against_a_minipaged_server(load, server, rng, tmp_path, capsys):
    seed, n, rate = int(rng.integers(2**31)), 20, 20.0
    path = tmp_path / "load.json"
    argv = ["--base-url", server, "--num-requests", str(n), "--request-rate", str(rate)]
    argv += ["--max-concurrency", "4", "--scale", "0.05", "--seed", str(seed)]
    assert load.main([*argv, "--json", str(path), "--no-progress"]) == 0, seed
    report = json.loads(path.read_text())
    rows, s = report["requests"], report["summary"]
    workload = load.make_workload("sharegpt-like", n, seed, scale=0.05)
    assert [(r["request_id"], r["max_tokens"]) for r in rows] == [
        (w.request_id, w.output_len) for w in workload
    ]
    assert [r["arrival_time"] for r in rows] == load.arrival_times(
        n, rate, "poisson", seed
    )
    for r in rows:
        assert r["error"] is None, r
        # ignore_eos
        assert (
            r["output_tokens"] == r["max_tokens"] and r["finish_reason"] == "length"
        ), r
        assert 0 < r["ttft"] <= r["latency"], r
        # never sent before it is due
        assert r["start_time"] >= r["arrival_time"] - 1e-3, r
    assert _peak_in_flight(rows) <= 4
    assert (s["completed"], s["failed"], s["errors"]) == (n, 0, [])
    assert (
        s["total_output_tokens"]
        == s["requested_output_tokens"]
        == sum(w.output_len for w in workload)
    )
    assert s["duration_s"] >= max(r["start_time"] + r["latency"] for r in rows)
    for key in METRIC_KEYS:
        assert 0 < s[key]["median"] <= s[key]["p99"], (key, s[key])
    # The JSON's summary is the summary of its own rows, and the table prints the same figures.
    fields = {f.name for f in dataclasses.fields(load.RequestResult)}
    results = [
        load.RequestResult(**{k: v for k, v in r.items() if k in fields}) for r in rows
    ]
    assert load.summarize(results, s["duration_s"]) == s
    table = capsys.readouterr().out
    assert f"{'Completed requests:':<34}{n}\n" in table
    for key, label in load.METRICS:
        d = s[key]
        assert (
            f"{label:<34}{d['mean'] * 1e3:>10.2f}{d['median'] * 1e3:>10.2f}{d['p99'] * 1e3:>10.2f}"
            in table
        )
    assert report["settings"]["model"] == "tiny-llama"  # the first of GET /v1/models


def test_a_burst_keeps_the_concurrency_cap_and_counts_a_rejected_request(
    load, server, rng
):
    vocab, num_ok = int(rng.integers(100, 259)), int(rng.integers(4, 8))
    prompts = [
        [int(t) for t in rng.integers(3, vocab, int(rng.integers(2, 12)))]
        for _ in range(num_ok)
    ]
    requests = [
        load.LoadRequest(f"ok-{i}", p, len(p), int(rng.integers(8, 16)))
        for i, p in enumerate(prompts)
    ]
    # longer than the model's 1024 positions
    too_long = [int(t) for t in rng.integers(3, vocab, 5000)]
    requests.insert(
        int(rng.integers(0, num_ok + 1)),
        load.LoadRequest("too-long", too_long, 5000, 4),
    )
    result = asyncio.run(
        load.run_load(server, None, requests, max_concurrency=2, progress=False)
    )
    by_id = {r.request_id: r for r in result.results}
    assert (
        by_id["too-long"].error.startswith("BadRequestError")
        and "400" in by_id["too-long"].error
    )
    assert (result.summary["completed"], result.summary["failed"]) == (num_ok, 1)
    assert result.summary["errors"] == [by_id["too-long"].error]
    ok = [by_id[r.request_id] for r in requests if r.request_id != "too-long"]
    assert [r.output_tokens for r in ok] == [
        r.max_tokens for r in requests if r.request_id != "too-long"
    ]
    # All arrive at once (rate inf), two at a time are sent: the cap is reached and never passed.
    assert _peak_in_flight([dataclasses.asdict(r) for r in ok]) == 2


def test_refused_connection_is_counted_not_raised(load, rng):
    # a port that was free a moment ago: nothing listens on it
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    requests = [
        load.LoadRequest(f"r{i}", [5, 6, 7], 3, 4)
        for i in range(int(rng.integers(2, 6)))
    ]
    result = asyncio.run(
        load.run_load(f"http://127.0.0.1:{port}", "m", requests, progress=False)
    )
    assert result.summary["completed"] == 0 and result.summary["failed"] == len(
        requests
    )
    assert all(
        r.error.startswith("APIConnectionError") and r.output_tokens == 0
        for r in result.results
    )
    assert result.summary["ttft_s"] == {"mean": None, "median": None, "p99": None}
