"""The engine benchmarks run at a tiny scale, report what their docs say, and refuse wrong outputs.

Benchmarks are not timed assertions (DESIGN.md): these tests run benchmarks/engine_throughput.py and
benchmarks/scheduler_overhead.py on tiny-llama and a handful of sequences and check the shape of
their reports (keys, positive figures), never how fast anything is.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_THROUGHPUT = [
    "--model",
    "tiny-llama",
    "--num-requests",
    "3",
    "--prompt-lens",
    "4",
    "20",
    "--output-lens",
    "2",
    "9",
    "--block-size",
    "4",
    "--num-checked",
    "3",
    "--no-progress",
]
TINY_SCHEDULER = [
    "--num-seqs",
    "1",
    "8",
    "--steps",
    "3",
    "--warmup",
    "1",
    "--rounds",
    "2",
    "--no-progress",
]


def _load(name: str):
    """A benchmark script imported as a module (benchmarks/ is not a package)."""
    # as `python benchmarks/...` does: bench_common sits beside it
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(
        f"{name}_benchmark", BENCHMARKS / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def throughput():
    module = _load("engine_throughput")
    yield module
    del sys.modules[module.__name__]


@pytest.fixture(scope="module")
def scheduler():
    module = _load("scheduler_overhead")
    yield module
    del sys.modules[module.__name__]


# ---- engine_throughput.py --------------------------------------------------------------------


def test_throughput_tiny_run_reports_every_system(throughput, tmp_path, capsys):
    path = tmp_path / "out.json"
    threads = torch.get_num_threads()
    assert throughput.main([*TINY_THROUGHPUT, "--json", str(path)]) == 0
    # the benchmark's thread count does not leak out
    assert torch.get_num_threads() == threads
    report = json.loads(path.read_text())
    assert {
        "benchmark",
        "command",
        "machine",
        "date",
        "torch",
        "transformers",
        "threads",
    } <= report.keys()
    assert {"config", "rows", "goals", "notes"} <= report.keys()
    assert report["benchmark"] == "engine_throughput" and report["threads"] == 1
    assert report["command"].startswith(
        "python benchmarks/engine_throughput.py --model tiny-llama"
    )
    assert report["config"]["prompt_lens"] == [4, 20] and report["config"][
        "output_lens"
    ] == [2, 9]
    assert report["config"]["checked_requests"] == [0, 1, 2]
    rows = {row["system"]: row for row in report["rows"]}
    assert list(rows) == ["minipaged", "padded", "continuous"]
    useful = 2 + 6 + 9  # the outputs spread evenly over 2..9
    for row in rows.values():
        assert tuple(row) == throughput.ROW_KEYS
        assert row["useful_tokens"] == useful
        assert (
            row["wall_s"] > 0
            and row["kv_peak_bytes"] > 0
            and row["kv_allocated_bytes"] > 0
        )
        assert math.isclose(row["tokens_per_s"], useful / row["wall_s"])
        assert row["kv_peak_bytes"] <= row["kv_allocated_bytes"]
    assert rows["minipaged"]["matches_minipaged"] == 3
    # every row runs to the longest output
    assert rows["padded"]["computed_tokens"] == 3 * 9
    assert (
        rows["minipaged"]["computed_tokens"]
        == rows["continuous"]["computed_tokens"]
        == useful
    )
    assert [goal["goal"] for goal in report["goals"]] == list(throughput.GOALS)
    # three rounds by default, each system once a round; speed as per-round ratios
    assert report["config"]["rounds"] == 3
    assert set(report["ratios"]) == {"minipaged/continuous", "minipaged/padded"}
    for ratio in report["ratios"].values():
        assert len(ratio["per_round"]) == 3
        assert ratio["min"] <= ratio["median"] <= ratio["max"]
    table = capsys.readouterr().out
    assert (
        "| system | useful tokens | tokens computed | wall s | useful tokens/s |"
        in table
    )
    assert "transformers " in table and "goals (stated, not asserted):" in table


def test_throughput_padded_kv_is_the_padded_batch(throughput):
    """The padded run's cache holds batch x (longest prompt + max_new_tokens - 1) tokens."""
    model = throughput.load_model("tiny-llama", 0)
    workload = throughput.make_workload(3, (4, 20), (2, 9), 259)
    result = throughput.run_padded(model, workload)
    tokens = 3 * (20 + 9 - 1)
    assert result.kv_peak_bytes == tokens * throughput.bytes_per_token(model)
    assert [len(o) for o in result.outputs] == [r.max_tokens for r in workload]


def test_throughput_workload_spans_the_ranges_and_repeats(throughput):
    workload = throughput.make_workload(10, (16, 160), (8, 80), 259, seed=1)
    prompts = sorted(len(r.prompt_token_ids) for r in workload)
    outputs = sorted(r.max_tokens for r in workload)
    assert (
        prompts[0] == 16
        and prompts[-1] == 160
        and outputs[0] == 8
        and outputs[-1] == 80
    )
    assert all(
        r.prompt_token_ids[0] == 1 and min(r.prompt_token_ids[1:]) >= 3
        for r in workload
    )
    assert throughput.make_workload(10, (16, 160), (8, 80), 259, seed=1) == workload
    ids, mask = throughput.left_padded(workload[:2])
    assert (
        ids.shape
        == mask.shape
        == (2, max(len(r.prompt_token_ids) for r in workload[:2]))
    )
    assert mask.sum().item() == sum(len(r.prompt_token_ids) for r in workload[:2])


def test_throughput_refuses_a_wrong_minipaged_and_reports_nothing(
    throughput, monkeypatch, tmp_path, capsys
):
    real = throughput.run_minipaged

    def off_by_one_token(*args, **kwargs):
        result = real(*args, **kwargs)
        result.outputs[1][-1] = (result.outputs[1][-1] + 1) % 259
        return result

    monkeypatch.setattr(throughput, "run_minipaged", off_by_one_token)
    path = tmp_path / "out.json"
    argv = [*TINY_THROUGHPUT, "--systems", "minipaged", "--json", str(path)]
    assert throughput.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and not path.exists()
    assert "request 1" in captured.err and "refusing to report" in captured.err


# ---- scheduler_overhead.py -------------------------------------------------------------------


def test_scheduler_tiny_run_reports_positive_figures(scheduler, tmp_path, capsys):
    path = tmp_path / "out.json"
    assert scheduler.main([*TINY_SCHEDULER, "--profile", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert {
        "benchmark",
        "command",
        "machine",
        "date",
        "python",
        "config",
        "rows",
        "goal",
    } <= report.keys()
    assert report["benchmark"] == "scheduler_overhead"
    assert [row["num_seqs"] for row in report["rows"]] == [1, 8]
    for row in report["rows"]:
        assert tuple(row) == scheduler.ROW_KEYS
        assert all(row[key] > 0 for key in scheduler.ROW_KEYS if "_us_" in key)
        assert row["step_us_min"] <= row["step_us_per_seq"] <= row["step_us_max"]
        assert row["rounds"] == report["config"]["rounds"] == 2
    assert report["goal"]["value_us"] is None  # no row at 1024 sequences: no verdict
    assert report["profile"]["num_seqs"] == 8 and report["profile"]["top"]
    assert report["profile"]["calls_per_seq_step"] > 1
    assert all(entry["own_us_per_step"] >= 0 for entry in report["profile"]["top"])
    table = capsys.readouterr().out
    assert (
        "| sequences | step us/seq (min-max) | schedule() us/seq | admission us/seq "
        "| device_stats() us/seq | memory_stats() us/seq |" in table
    )
    assert "| function | calls/step |" in table


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_null_engine_plays_the_engine_part(scheduler, prefix_caching):
    """Every step is a decode step of every sequence; blocks grow on demand; all is freed at the end."""
    engine = scheduler.NullEngine(
        8,
        prompt_len=5,
        max_tokens=6,
        block_size=4,
        enable_prefix_caching=prefix_caching,
    )
    first = engine.step()
    # the prefill
    assert len(first.scheduled) == 8 and first.num_batched_tokens == 8 * 5
    for _ in range(4):
        out = engine.step()
        assert (
            len(out.scheduled) == 8
            and out.num_batched_tokens == 8
            and not out.preempted
        )
    seq = out.scheduled[0].seq
    # ceil(10 / 4)
    assert len(seq) == 5 + 5 and len(engine.manager.get_block_table(seq)) == 3
    engine.step()  # the sixth token: every sequence finishes and frees its blocks
    assert not engine.scheduler.has_unfinished()
    assert engine.manager.device.num_used == 0


def test_scheduler_goal_row_at_1024(scheduler):
    args = scheduler.parse_args(
        ["--num-seqs", "1024", "--steps", "1", "--warmup", "0", "--rounds", "1"]
    )
    report = scheduler.run(args)
    goal = report["goal"]
    assert goal["value_us"] > 0 and isinstance(goal["met"], bool)
    # the verdict is the median step over the peer's recorded figure, at most GOAL_RATIO
    assert goal["ratio"] == goal["value_us"] / scheduler.PEER_US_PER_SEQ_STEP
    assert goal["met"] == (goal["ratio"] <= scheduler.GOAL_RATIO)
    assert goal["peer"] == "nano-vllm" and "bb823b3" in goal["peer_how"]


def test_scheduler_rounds_rotate_the_order_and_take_the_median(scheduler, monkeypatch):
    """Each round measures every N once, starting one N later each round; a row is the median
    of its rounds, with the step's spread."""
    seen = []
    figures = iter([5.0, 1.0, 9.0, 2.0, 3.0, 4.0])

    def fake_measure(num_seqs, args):
        seen.append(num_seqs)
        step = next(figures)
        return {
            "step": step,
            "schedule": step,
            "admit": 1.0,
            "device_stats": 1.0,
            "memory_stats": 1.0,
        }

    monkeypatch.setattr(scheduler, "measure", fake_measure)
    args = scheduler.parse_args(["--num-seqs", "1", "8", "--rounds", "3"])
    report = scheduler.run(args, "")
    assert seen == [1, 8, 8, 1, 1, 8]
    # N=1 got 5, 2, 3; N=8 got 1, 9, 4
    one, eight = report["rows"]
    assert (one["step_us_per_seq"], one["step_us_min"], one["step_us_max"]) == (3, 2, 5)
    assert (eight["step_us_per_seq"], eight["step_us_min"], eight["step_us_max"]) == (
        4,
        1,
        9,
    )


def test_throughput_rounds_rotate_and_ratios_are_taken_round_by_round(throughput):
    assert [throughput.rotated(("a", "b", "c"), r) for r in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]

    def result(system, wall):
        return throughput.SystemResult(system, [], wall, 100, 100, 1, 1)

    # minipaged 2x, 1x and 4x as fast as continuous in its three rounds
    rounds = {
        "minipaged": [result("minipaged", w) for w in (1.0, 2.0, 1.0)],
        "continuous": [result("continuous", w) for w in (2.0, 2.0, 4.0)],
    }
    ratios = throughput.per_round_ratios(rounds)
    assert ratios == {
        "minipaged/continuous": {
            "median": 2.0,
            "min": 1.0,
            "max": 4.0,
            "per_round": [2.0, 1.0, 4.0],
        }
    }
    (goal,) = throughput.goals({}, ratios)
    assert goal["met"] and goal["value"] == "2.00x (rounds 1.00-4.00)"


def test_throughput_profile_names_every_part(throughput, capsys):
    """--profile splits one minipaged generate into PROFILE_PARTS; each part is found in the
    profile (a renamed function would read 0 s and mislead) and within the whole."""
    args = throughput.parse_args(
        [*TINY_THROUGHPUT, "--systems", "minipaged", "--rounds", "1", "--profile"]
    )
    report = throughput.run(args)
    parts = report["profile"]
    assert [p["part"] for p in parts] == [
        label for label, *_ in throughput.PROFILE_PARTS
    ]
    whole = parts[0]
    assert whole["share"] == 1.0 and whole["seconds"] > 0
    for part in parts[1:]:
        assert 0 < part["seconds"] <= whole["seconds"], part
    assert "| part | seconds | share |" in throughput.format_table(report)
