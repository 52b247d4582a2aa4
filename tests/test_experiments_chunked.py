"""The chunked-prefill experiment: its workload, its rows, the trade-off they show, its docs page."""

from __future__ import annotations

import json

import pytest

from minipaged.experiments import EXPERIMENTS, chunked_prefill, get_experiment
from minipaged.experiments import latency as lat
from minipaged.experiments.chunked_prefill import (
    BUDGETS,
    LONG_OUTPUT,
    LONG_PROMPT,
    RATES,
    ROW_KEYS,
    SHORT_OUTPUT,
    SHORT_PROMPT,
    UNCHUNKED_BUDGET,
    mixed,
)
from minipaged.experiments.page_tables_chunked import seconds


@pytest.fixture(scope="module")
def small():
    return chunked_prefill.run("small", seed=0, progress=False)


def _row(rows, rate, budget):
    """The row at `rate`: with chunking at `budget`, or without chunking if budget is None."""
    return next(
        r
        for r in rows
        if r["rate"] == rate
        and r["chunking"] == (budget is not None)
        and (budget is None or r["budget"] == budget)
    )


def test_registered_and_listed():
    assert "chunked-prefill" in EXPERIMENTS
    assert get_experiment("chunked-prefill") is chunked_prefill


def test_rows_have_exactly_the_documented_keys(small):
    assert all(tuple(r) == ROW_KEYS for r in small.rows)
    points = {(r["rate"], r["chunking"], r["budget"]) for r in small.rows}
    expected = {(rate, False, UNCHUNKED_BUDGET) for rate in RATES}
    expected |= {(rate, True, b) for rate in RATES for b in BUDGETS}
    assert points == expected and len(small.rows) == len(expected)
    json.dumps(small.to_json())  # plain JSON values
    assert small.settings["window_s"] == chunked_prefill.SCALES["small"].window


def test_the_mixed_workload_is_long_among_short():
    workload = mixed(20_000, rate=5.0, seed=3)
    long = [r for r in workload if r.request_id.startswith("long")]
    short = [r for r in workload if r.request_id.startswith("short")]
    assert len(long) + len(short) == 20_000
    assert 0.09 < len(long) / 20_000 < 0.11  # 10%, give or take 5 standard deviations
    assert all(LONG_PROMPT[0] <= r.prompt_len <= LONG_PROMPT[1] for r in long)
    assert all(LONG_OUTPUT[0] <= r.output_len <= LONG_OUTPUT[1] for r in long)
    assert all(SHORT_PROMPT[0] <= r.prompt_len <= SHORT_PROMPT[1] for r in short)
    assert all(SHORT_OUTPUT[0] <= r.output_len <= SHORT_OUTPUT[1] for r in short)
    times = [r.arrival_time for r in workload]
    assert times == sorted(times) and 20_000 / times[-1] == pytest.approx(5.0, rel=0.05)
    assert mixed(50, 5.0, seed=3) == mixed(50, 5.0, seed=3)
    assert mixed(50, 5.0, seed=3) != mixed(50, 5.0, seed=4)


def test_chunks_bound_the_wait_for_a_token_and_delay_long_prompts(small):
    """The trade-off: at every rate, the smallest budget cuts the longest wait a decode sees (a
    step never computes more than 64 tokens) and makes the long prompts' first token later."""
    for rate in RATES:
        whole, tiny = _row(small.rows, rate, None), _row(small.rows, rate, min(BUDGETS))
        assert tiny["itl_max"] < whole["itl_max"] / 3, rate
        assert tiny["tpot_mean"] < whole["tpot_mean"], rate
        assert tiny["ttft_long"] > whole["ttft_long"], rate
        # the longest wait grows with the budget: a larger chunk makes a longer step
        waits = [_row(small.rows, rate, b)["itl_max"] for b in BUDGETS]
        assert waits == sorted(waits), (rate, waits)


def test_each_row_reports_its_own_simulation(small):
    """A row is measure() of its point: the experiment adds nothing to what simulate() gives."""
    rate, budget = RATES[1], 256
    window = chunked_prefill.SCALES["small"].window
    num = lat.num_requests(rate, window)
    requests = [r for r in mixed(num, rate, seed=0) if r.arrival_time < window]
    measured = chunked_prefill.measure(requests, True, budget, seed=0)
    row = _row(small.rows, rate, budget)
    assert measured == {k: row[k] for k in measured}
    assert 0 < row["itl_p99"] <= row["itl_max"] and row["ttft_mean"] <= row["ttft_p99"]


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"scale": "medium"}, "scale"), ({"seed": -1}, "seed")]
)
def test_bad_arguments_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        chunked_prefill.run(**{"progress": False, **kwargs})


def test_plot_writes_a_figure(small, tmp_path):
    path = tmp_path / "chunked.png"
    chunked_prefill.plot(small, path)
    assert path.stat().st_size > 10_000


def test_times_are_written_in_the_unit_that_suits_them():
    assert [seconds(x) for x in (0.0274, 0.2134, 21.04)] == [
        "27.4 ms",
        "213 ms",
        "21.0 s",
    ]
