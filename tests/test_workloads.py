"""Workloads: seeded, valid, with the paper's mean lengths (section 6.1), and the ShareGPT loader."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipaged.experiments.baselines import reservation_size
from minipaged.presets import ByteTokenizer
from minipaged.reference.block_table import num_blocks_for
from minipaged.reference.prefix_cache import hash_full_blocks
from minipaged.workloads import (
    ALPACA,
    SHAREGPT,
    Request,
    Workload,
    _clipped_lognormal_mean,
    alpaca_like,
    load_sharegpt,
    poisson_arrivals,
    shared_prefix,
    sharegpt_like,
    solve_mu,
    with_beam_search,
    with_parallel_sampling,
)


def assert_valid(workload: Workload, max_model_len: int) -> None:
    """Every request fits the model, ids are unique and arrivals never go back in time."""
    assert len({r.request_id for r in workload}) == len(workload)
    for r in workload:
        assert r.prompt_len >= 1 and r.output_len >= 1
        assert r.total_len == r.prompt_len + r.output_len <= max_model_len
    times = [r.arrival_time for r in workload]
    assert times == sorted(times)


# ---------------------------------------------------------------- synthetic lengths


@pytest.mark.parametrize("make", [sharegpt_like, alpaca_like, shared_prefix])
def test_same_seed_same_workload_other_seed_differs(make):
    a, b = make(200, rate=2.0, seed=3), make(200, rate=2.0, seed=3)
    assert a == b
    assert a.requests != make(200, rate=2.0, seed=4).requests


def test_changing_the_rate_keeps_the_lengths():
    slow, fast = (
        sharegpt_like(100, rate=1.0, seed=5),
        sharegpt_like(100, rate=8.0, seed=5),
    )
    assert [(r.prompt_len, r.output_len) for r in slow] == [
        (r.prompt_len, r.output_len) for r in fast
    ]
    assert [r.arrival_time for r in slow] != [r.arrival_time for r in fast]


@pytest.mark.parametrize(
    ("make", "spec"), [(sharegpt_like, SHAREGPT), (alpaca_like, ALPACA)]
)
def test_sample_means_match_the_paper(make, spec):
    workload = make(20_000, seed=0)
    assert workload.mean_prompt_len == pytest.approx(spec.mean_prompt_len, rel=0.03)
    assert workload.mean_output_len == pytest.approx(spec.mean_output_len, rel=0.03)
    assert_valid(workload, 2048)


def test_sharegpt_outputs_are_long_tailed():
    outputs = [r.output_len for r in sharegpt_like(20_000, seed=1)]
    # most are short...
    assert statistics.median(outputs) < 0.75 * statistics.mean(outputs)
    assert max(outputs) > 5 * statistics.mean(outputs)  # ...and a few are very long
    # Alpaca is shorter
    assert sum(r.output_len for r in alpaca_like(1000)) < sum(outputs[:1000])


@pytest.mark.parametrize(
    ("mean", "sigma", "cap"), [(161.31, 1.0, 2047), (58.45, 0.9, 2047), (30.0, 1.5, 63)]
)
def test_solve_mu_hits_the_clipped_mean(mean, sigma, cap):
    assert _clipped_lognormal_mean(
        solve_mu(mean, sigma, cap), sigma, cap
    ) == pytest.approx(mean, rel=1e-6)


def test_solve_mu_without_clipping_is_the_lognormal_formula():
    # with a cap far away and a mean far above 1, E[X] = exp(mu + sigma^2 / 2)
    assert solve_mu(1000.0, 0.5, 1e9) == pytest.approx(
        math.log(1000.0) - 0.125, abs=1e-6
    )


def test_a_small_max_model_len_clips_every_request():
    workload = sharegpt_like(2000, seed=2, max_model_len=64)
    assert_valid(workload, 64)
    assert any(r.total_len == 64 for r in workload)  # the long tail piles up at the cap


@given(
    make=st.sampled_from([sharegpt_like, alpaca_like]),
    num_requests=st.integers(1, 40),
    seed=st.integers(0, 2**32),
    max_model_len=st.integers(2, 4096),
    rate=st.sampled_from([0.5, 3.0, math.inf]),
)
def test_any_arguments_give_valid_requests(
    make, num_requests, seed, max_model_len, rate
):
    workload = make(num_requests, rate=rate, seed=seed, max_model_len=max_model_len)
    assert len(workload) == num_requests
    assert_valid(workload, max_model_len)


# ---------------------------------------------------------------- arrivals


def test_poisson_gaps_have_mean_one_over_rate():
    times = poisson_arrivals(20_000, rate=4.0, seed=0)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert min(gaps) >= 0
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.03)
    # exponential: stdev = mean
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.05)


def test_infinite_rate_sends_everything_at_time_zero():
    assert all(r.arrival_time == 0.0 for r in alpaca_like(50))
    assert poisson_arrivals(3, math.inf) == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- shared prefixes and token ids


# the paper's 1-shot and 5-shot prefixes
@pytest.mark.parametrize("prefix_len", [80, 341])
def test_shared_prefix_ids_are_equal_then_differ(prefix_len):
    workload = shared_prefix(20, prefix_len=prefix_len, seed=1)
    assert_valid(workload, 2048)
    ids = [r.prompt_token_ids(vocab_size=1000, seed=7) for r in workload]
    assert all(
        r.prefix_len == prefix_len and r.prompt_len > prefix_len for r in workload
    )
    assert all(len(t) == r.prompt_len for t, r in zip(ids, workload, strict=True))
    assert len({tuple(t[:prefix_len]) for t in ids}) == 1
    assert len({tuple(t[prefix_len:]) for t in ids}) == len(ids)
    # what prefix caching relies on: the full blocks of the prefix hash the same in every request
    hashes = [hash_full_blocks(t[:prefix_len], block_size=16) for t in ids]
    assert len(hashes[0]) == prefix_len // 16 and all(h == hashes[0] for h in hashes)


def test_several_prefixes_share_within_a_prefix_id_only():
    workload = shared_prefix(60, prefix_len=32, num_prefixes=3, seed=0)
    assert {r.prefix_id for r in workload} == {0, 1, 2}
    prefixes = {}
    for r in workload:
        prefixes.setdefault(r.prefix_id, set()).add(tuple(r.prompt_token_ids(500)[:32]))
    assert (
        all(len(p) == 1 for p in prefixes.values())
        and len(set().union(*prefixes.values())) == 3
    )


def test_prompt_token_ids_are_deterministic_and_in_range():
    r = Request("a", 0.0, prompt_len=50, output_len=5)
    ids = r.prompt_token_ids(vocab_size=259, seed=1, low=3)
    assert ids == r.prompt_token_ids(vocab_size=259, seed=1, low=3)
    assert ids != r.prompt_token_ids(vocab_size=259, seed=2, low=3)
    assert ids != Request("b", 0.0, prompt_len=50, output_len=5).prompt_token_ids(
        259, seed=1, low=3
    )
    assert len(ids) == 50 and all(3 <= t < 259 for t in ids)
    assert alpaca_like(3).prompts(259)[1] == {
        "prompt_token_ids": alpaca_like(3)[1].prompt_token_ids(259)
    }


# ---------------------------------------------------------------- sampling and beam search


def test_parallel_sampling_and_beam_search_keep_the_lengths():
    base = alpaca_like(10, seed=0)
    sampled, beams = with_parallel_sampling(base, 4), with_beam_search(base, 6)
    assert all(r.n == 4 and r.beam_width == 0 for r in sampled)
    assert all(r.n == 1 and r.beam_width == 6 for r in beams)
    assert all(r.n == 2 and r.beam_width == 0 for r in with_parallel_sampling(beams, 2))
    for wrapped in (sampled, beams):
        assert [(r.prompt_len, r.output_len, r.arrival_time) for r in wrapped] == [
            (r.prompt_len, r.output_len, r.arrival_time) for r in base
        ]
    assert (sampled.name, sampled.params["n"], beams.params["beam_width"]) == (
        "alpaca+n4",
        4,
        6,
    )


# ---------------------------------------------------------------- the ShareGPT loader


def conversation(*turns: tuple[str, str], id_: str = "x") -> dict:
    return {
        "id": id_,
        "conversations": [{"from": who, "value": text} for who, text in turns],
    }


@pytest.fixture
def sharegpt_file(tmp_path):
    data = [
        conversation(
            ("human", "one two three"),
            ("gpt", "a b"),
            ("human", "four"),
            ("gpt", "c d e f"),
        ),
        # starts with the bot
        conversation(("gpt", "hello there"), ("human", "hi"), ("gpt", "yes")),
        # two human turns in a row
        conversation(("human", "x"), ("human", "y z"), ("gpt", "ok")),
        conversation(("human", "only a question")),  # no answer: no pair
        conversation(("human", ""), ("gpt", "empty prompt is dropped")),
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    return path


def test_loader_pairs_each_human_turn_with_the_next_gpt_turn(sharegpt_file):
    workload = load_sharegpt(sharegpt_file)
    assert [(r.prompt_len, r.output_len) for r in workload] == [
        (3, 2),
        (1, 4),
        (1, 1),
        (2, 1),
    ]
    assert_valid(workload, 2048)
    first = load_sharegpt(sharegpt_file, first_turn_only=True)
    assert [(r.prompt_len, r.output_len) for r in first] == [(3, 2), (1, 1), (2, 1)]


def test_loader_counts_with_the_tokenizer(sharegpt_file):
    workload = load_sharegpt(sharegpt_file, tokenizer=ByteTokenizer())
    # ByteTokenizer: one token per byte plus a bos
    assert (workload[0].prompt_len, workload[0].output_len) == (
        len("one two three") + 1,
        len("a b") + 1,
    )


def test_loader_drops_long_pairs_and_samples_with_the_seed(sharegpt_file):
    # (3, 2) and (1, 4) are too long
    short = load_sharegpt(sharegpt_file, max_model_len=4)
    assert [(r.prompt_len, r.output_len) for r in short] == [(1, 1), (2, 1)]
    a = load_sharegpt(sharegpt_file, num_requests=3, seed=1, rate=2.0)
    assert (
        a == load_sharegpt(sharegpt_file, num_requests=3, seed=1, rate=2.0)
        and len(a) == 3
    )
    assert {(r.prompt_len, r.output_len) for r in a} <= {(3, 2), (1, 4), (1, 1), (2, 1)}
    assert a[2].arrival_time > 0


def test_loader_errors_name_the_argument(tmp_path, sharegpt_file):
    bad_json, wrong_shape, no_pairs = (
        tmp_path / "bad.json",
        tmp_path / "shape.json",
        tmp_path / "none.json",
    )
    bad_json.write_text("[{")
    wrong_shape.write_text(json.dumps([{"id": "a", "conversations": "hello"}]))
    no_pairs.write_text(json.dumps([conversation(("gpt", "hi"))]))
    cases = [
        ({"path": tmp_path / "missing.json"}, "path .* is not a file"),
        ({"path": bad_json}, "path .* is not UTF-8 JSON"),
        ({"path": wrong_shape}, "path .* must hold .*entry 0"),
        ({"path": no_pairs}, "path .* has no usable pairs"),
        (
            {"path": sharegpt_file, "num_requests": 5},
            "num_requests must be <= 4 usable pairs",
        ),
        (
            {"path": sharegpt_file, "num_requests": 0},
            "num_requests must be an int >= 1",
        ),
        ({"path": sharegpt_file, "tokenizer": object()}, "tokenizer must have encode"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            load_sharegpt(**kwargs)
    wrong_shape.write_text(json.dumps({"conversations": []}))
    with pytest.raises(ValueError, match=r"must hold a JSON list .* got a dict"):
        load_sharegpt(wrong_shape)


# ---------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: sharegpt_like(0), "num_requests must be an int >= 1, got 0"),
        (
            lambda: sharegpt_like(5, rate=0.0),
            r"rate must be > 0 requests/s \(or inf\), got 0.0",
        ),
        (lambda: alpaca_like(5, rate=-1), "rate must be > 0"),
        (lambda: alpaca_like(5, seed=-1), "seed must be an int >= 0, got -1"),
        (
            lambda: alpaca_like(5, max_model_len=1),
            "max_model_len must be an int >= 2, got 1",
        ),
        (
            lambda: shared_prefix(5, prefix_len=80, max_model_len=81),
            "max_model_len must be an int >= 82",
        ),
        (lambda: shared_prefix(5, num_prefixes=0), "num_prefixes must be an int >= 1"),
        (
            lambda: with_parallel_sampling(alpaca_like(2), 0),
            "n must be an int >= 1, got 0",
        ),
        (
            lambda: with_beam_search(alpaca_like(2), 0),
            "width must be an int >= 1, got 0",
        ),
        (lambda: Request("r", -1.0, 5, 5), "arrival_time must be >= 0"),
        (lambda: Request("r", 0.0, 0, 5), "prompt_len must be an int >= 1, got 0"),
        (lambda: Request("r", 0.0, 5, 2.5), "output_len must be an int >= 1, got 2.5"),
        (
            lambda: Request("r", 0.0, 5, 5, prefix_len=6),
            "prefix_len must be <= prompt_len=5",
        ),
        (
            lambda: Request("r", 0.0, 5, 5, n=2, beam_width=4),
            "samples n=2 or beam searches, not both",
        ),
        (
            lambda: Request("r", 0.0, 5, 5).prompt_token_ids(vocab_size=3, low=3),
            "vocab_size must be an int >= 4",
        ),
    ],
)
def test_bad_arguments_raise_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_exercise_workloads_page():
    """docs/experiments/workloads.md: the reservations of four requests under each Orca policy."""
    lens = [(40, 60), (100, 200), (20, 30), (1_000, 600)]
    reserve = {
        p: [reservation_size(p, a, b, 2048) for a, b in lens]
        for p in ("max", "pow2", "oracle")
    }
    assert reserve["pow2"] == [104, 356, 52, 2024]
    assert {p: sum(r) for p, r in reserve.items()} == {
        "max": 8192,
        "pow2": 2536,
        "oracle": 2050,
    }
    assert round(100 * 2050 / 2536) == 81
    assert sum(num_blocks_for(a + b, 16) for a, b in lens) == 130


def test_workloads_page_table():
    """docs/experiments/workloads.md: the share of Max's and Pow2's reservations the true lengths fill."""
    table = {}
    for w in (sharegpt_like(20_000), alpaca_like(20_000)):
        used = sum(r.total_len for r in w)
        pow2 = sum(
            reservation_size("pow2", r.prompt_len, r.output_len, 2048) for r in w
        )
        table[w.name] = (
            round(used / len(w)),
            round(100 * used / (2048 * len(w))),
            round(100 * used / pow2),
        )
    assert table == {"sharegpt": (497, 24, 80), "alpaca": (78, 4, 76)}


def test_the_loader_lives_in_its_own_module_and_workloads_still_exports_it():
    import subprocess
    import sys

    import minipaged.workloads
    from minipaged import sharegpt

    assert sharegpt.load_sharegpt is load_sharegpt is minipaged.workloads.load_sharegpt
    with pytest.raises(AttributeError, match="no_such_thing"):
        minipaged.workloads.no_such_thing  # noqa: B018
    # importing the loader's module first, in a fresh interpreter, is no import cycle
    code = (
        "import minipaged.sharegpt as s, minipaged.workloads as w; "
        "assert s.load_sharegpt is w.load_sharegpt"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
