"""The benchmark scripts run, report what their docs say, and refuse to time a wrong computation.

Benchmarks are not timed assertions (DESIGN.md): these tests run benchmarks/reference_attention.py at
a tiny scale and check the shape of its report, never how fast anything is.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from minipaged.backend import ReferenceBackend
from minipaged.reference import attention

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reference_attention.py"
# --default-malloc: leave the test process's malloc settings alone.
TINY = [
    "--batch-sizes",
    "2",
    "--contexts",
    "24",
    "--min-run-time",
    "0.001",
    "--no-progress",
    "--default-malloc",
]


@pytest.fixture(scope="module")
def bench():
    """The script imported as a module (benchmarks/ is not a package)."""
    # as `python benchmarks/...` does: bench_common sits beside it
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location(
        "reference_attention_benchmark", SCRIPT
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_tiny_run_reports_every_case_with_positive_times(bench, tmp_path, capsys):
    path = tmp_path / "out.json"
    threads = torch.get_num_threads()
    assert bench.main([*TINY, "--modes", "decode", "prefill", "--json", str(path)]) == 0
    # the benchmark's thread count does not leak out
    assert torch.get_num_threads() == threads
    report = json.loads(path.read_text())
    assert {
        "benchmark",
        "command",
        "machine",
        "date",
        "torch",
        "threads",
        "rows",
    } <= report.keys()
    assert report["command"].startswith(
        "python benchmarks/reference_attention.py --batch-sizes 2"
    )
    assert report["benchmark"] == "reference_attention" and report["threads"] == 1
    assert report["malloc"] == "default"
    assert [(r["mode"], r["batch"], r["context"]) for r in report["rows"]] == [
        ("decode", 2, 24),
        ("prefill", 2, 24),
    ]
    for row in report["rows"]:
        assert tuple(row) == bench.ROW_KEYS
        assert all(row[key] > 0 for key in bench.ROW_KEYS if key.endswith("_ms"))
        assert row["ratio"] == pytest.approx(row["reference_ms"] / row["sdpa_ms"])
    table = capsys.readouterr().out
    assert (
        "threads 1" in table
        and "| mode | batch | context | reference ms | SDPA ms | ratio |" in table
    )
    assert table.count("\n| decode |") == 1 and table.count("\n| prefill |") == 1


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_cases_lay_out_the_same_kv_both_ways(bench, mode):
    """The dense K/V that SDPA reads are the pools read through the shuffled tables, and they agree."""
    case = bench.make_case(
        torch.Generator().manual_seed(0), mode, batch=3, context=40, block_size=16
    )
    query, k_cache, _, block_tables, seq_lens, query_start_loc, _ = case.paged_args
    q_len = 1 if mode == "decode" else 40
    assert query.shape == (3 * q_len, 8, 64) and case.q_dense.shape == (3, 8, q_len, 64)
    assert case.k_dense.shape == (3, 2, 40, 64) and k_cache.shape == (9, 16, 2, 64)
    # every block used once
    assert sorted(block_tables.flatten().tolist()) == list(range(9))
    assert seq_lens.tolist() == [40] * 3 and query_start_loc.tolist() == [
        0,
        q_len,
        2 * q_len,
        3 * q_len,
    ]
    bench.check_case(case, attention.paged_attention)  # raises on a disagreement


def test_a_wrong_reference_is_refused_and_nothing_is_reported(
    bench, monkeypatch, tmp_path, capsys
):
    def off_by_a_little(*args, **kwargs):
        out = attention.paged_attention(*args, **kwargs)
        out[-1, 0, 0] += 1e-3  # one element, well past the fp32 tolerance
        return out

    monkeypatch.setattr(
        ReferenceBackend, "paged_attention", staticmethod(off_by_a_little)
    )
    path = tmp_path / "out.json"
    assert bench.main([*TINY, "--modes", "prefill", "--json", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and not path.exists()
    assert (
        "the reference disagrees with SDPA" in captured.err
        and "prefill batch=2 context=24" in captured.err
    )
