"""benchmarks/decode_attention.py runs, reports what its docstring says, and refuses wrong answers.

Benchmarks are not timed assertions (DESIGN.md): on the CPU these tests run the script's --quick
shapes through Triton's interpreter and check the shape of its report (keys, rows, every method
checked against the fp32 oracle), never how fast anything is. The `gpu` test runs one small real
point compiled on a CUDA device.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_attention.py"
QUICK = ["--quick", "--no-progress", "--cpu-runs", "1"]


@pytest.fixture(scope="module")
def bench():
    """The script imported as a module (benchmarks/ is not a package)."""
    # as `python benchmarks/...` does: bench_common sits beside it
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("decode_attention_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_quick_run_times_every_method_after_checking_it(bench, tmp_path, capsys):
    """Context 40 leaves the last page partly filled, so the tail masks are exercised too."""
    path = tmp_path / "out.json"
    assert bench.main([*QUICK, "--contexts", "16", "40", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert {
        "benchmark",
        "command",
        "machine",
        "device",
        "date",
        "torch",
        "triton",
        "config",
    } <= report.keys()
    assert report["command"].startswith("python benchmarks/decode_attention.py --quick")
    assert report["copy_bandwidth"]["gbps"] > 0 and report["goal"]["text"] == bench.GOAL
    assert [(r["dtype"], r["batch"], r["context"]) for r in report["decode"]] == [
        (dtype, batch, ctx)
        for dtype in ("fp16", "bf16")
        for batch in (1, 2)
        for ctx in (16, 40)
    ]
    assert [
        (r["dtype"], r["batch"], r["prefix"], r["new_tokens"])
        for r in report["prefill"]
    ] == [(dtype, batch, 16, 16) for dtype in ("fp16", "bf16") for batch in (1, 2)]
    for kind, methods in (
        ("decode", bench.METHODS),
        ("prefill", bench.PREFILL_METHODS),
    ):
        for row in report[kind]:
            assert tuple(row["methods"]) == methods and row["sets"] >= 2
            for name, m in row["methods"].items():
                # torch without flex: a reason, no time
                if name in bench.GUARDED and "skipped" in m:
                    assert m["skipped"]
                    continue
                assert m["time_us"] > 0, (kind, name)
                assert (
                    0 <= m["rel_error"] <= report["config"]["tolerance"][row["dtype"]]
                ), (kind, name)
                assert m["x_sdpa"] == pytest.approx(
                    m["time_us"] / row["methods"]["sdpa"]["time_us"]
                )
                if kind == "decode":
                    assert m["gbps"] == pytest.approx(row["bytes"] / m["time_us"] / 1e3)
                else:
                    assert m["tflops"] == pytest.approx(
                        row["flops"] / m["time_us"] / 1e6
                    )
    table = capsys.readouterr().out
    assert (
        "copy bandwidth:" in table
        and bench.GOAL in table
        and f"full report: {path}" in table
    )
    for dtype in ("fp16", "bf16"):
        assert f"decode, {dtype}: median us per call" in table
        assert f"prefill after a cached prefix, {dtype}" in table
    assert table.count("triton-kernel     reference          sdpa    flex-paged") == 2


@pytest.mark.parametrize("wrong", ["scaled", "unwritten"])
def test_a_wrong_method_is_refused_and_nothing_is_reported(
    bench, monkeypatch, tmp_path, capsys, wrong
):
    real = bench.FACTORIES["triton-kernel"]

    def factory(point, shared, first, args):
        call = real(point, shared, first, args)
        if wrong == "scaled":
            return lambda s: call(s) * 1.05  # 5% off everywhere
        return lambda s: s.out  # writes nothing: the buffer still holds the NaN poison

    monkeypatch.setitem(bench.FACTORIES, "triton-kernel", factory)
    path = tmp_path / "out.json"
    argv = [
        *QUICK,
        "--dtypes",
        "fp16",
        "--batches",
        "2",
        "--contexts",
        "40",
        "--skip-prefill",
    ]
    assert bench.main([*argv, "--json", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and not path.exists()
    assert (
        "decode fp16 batch=2 ctx=40: triton-kernel disagrees with the fp32 oracle"
        in captured.err
    )


def test_flex_failures_and_reference_skips_are_recorded_not_raised(
    bench, monkeypatch, tmp_path, capsys
):
    def broken(point, shared, first, args):
        raise RuntimeError("no flex here\nsecond line")

    monkeypatch.setitem(bench.FACTORIES, "flex-paged", broken)
    path = tmp_path / "out.json"
    argv = [
        *QUICK,
        "--dtypes",
        "fp16",
        "--batches",
        "1",
        "--contexts",
        "16",
        "--skip-prefill",
    ]
    assert bench.main([*argv, "--reference-budget-gib", "0", "--json", str(path)]) == 0
    (row,) = json.loads(path.read_text())["decode"]
    assert row["methods"]["flex-paged"] == {
        "skipped": "failed: RuntimeError: no flex here"
    }
    assert "--reference-budget-gib 0" in row["methods"]["reference"]["skipped"]
    assert row["methods"]["triton"]["time_us"] > 0
    table = capsys.readouterr().out
    assert "- flex-paged failed: RuntimeError: no flex here: fp16 b1 ctx 16" in table
    assert "- reference skipped: its temporaries need about" in table


def test_inputs_lay_out_the_same_kv_both_ways(bench):
    """Shuffled distinct blocks, spares no table names, and dense K/V that are the pools read by slot."""
    point = bench.Point(
        "decode",
        "fp32",
        3,
        40,
        1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        block_size=16,
    )
    gen, cpu = torch.Generator().manual_seed(0), torch.device("cpu")
    shared = bench.make_shared(point, gen, cpu)
    s = bench.make_inputs(point, shared, gen, cpu, dense=True)
    # 9 used, 1 spare
    assert shared.block_tables.shape == (3, 3) and point.num_blocks == 10
    assert len(set(shared.block_tables.flatten().tolist())) == 9
    assert shared.seq_lens.tolist() == [40] * 3 and shared.query_start_loc.tolist() == [
        0,
        1,
        2,
        3,
    ]
    for b in range(3):
        for pos in (0, 17, 39):
            block = int(shared.block_tables[b, pos // 16])
            assert torch.equal(s.k_dense[b, :, pos], s.k_cache[block, pos % 16])
            assert torch.equal(s.v_dense[b, :, pos], s.v_cache[block, pos % 16])
    # random, never zeros
    assert torch.equal(s.q_dense[:, :, 0], s.query) and s.k_cache.abs().min() > 0


def test_bytes_flops_and_goal_marks(bench):
    shape = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "block_size": 16}
    decode = bench.Point("decode", "fp16", 1, 4096, 1, **shape)
    # K and V, query and output
    assert decode.bytes_moved == 2 * 4096 * 8 * 128 * 2 + 2 * 32 * 128 * 2
    prefill = bench.Point("prefill", "bf16", 2, 1024 + 512, 512, **shape)
    # visible pairs only
    assert prefill.flops == 4 * 2 * 32 * 128 * (512 * 1024 + 512 * 513 // 2)
    assert (
        bench.goal_mark({"time_us": 1.0, "copy_fraction": 0.85, "x_sdpa": 1.1})
        == "pass"
    )
    assert (
        bench.goal_mark({"time_us": 1.0, "copy_fraction": 0.5, "x_sdpa": 1.1})
        == "miss bw"
    )
    assert (
        bench.goal_mark({"time_us": 1.0, "copy_fraction": 0.5, "x_sdpa": 1.5})
        == "miss bw+sdpa"
    )
    assert bench.goal_mark({"skipped": "why"}) == "n/a"
    # no sdpa time
    assert (
        bench.goal_mark({"time_us": 1.0, "copy_fraction": 0.5, "x_sdpa": None}) == "n/a"
    )


def test_a_point_without_sdpa_is_not_counted_for_the_goal(bench):
    """Where sdpa has no time (left out, or failed), the goal is n/a: not a miss, not a judged point."""
    shape = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "block_size": 16}
    point = bench.Point("decode", "fp16", 1, 4096, 1, **shape)
    row = {
        "methods": {
            "triton-kernel": {"time_us": 20.0},
            "sdpa": {"skipped": "failed: OOM"},
        }
    }
    bench.add_rates(row, point, copy_gbps=3000.0)
    assert row["methods"]["triton-kernel"]["x_sdpa"] is None and row["goal"] == {
        "triton-kernel": "n/a"
    }


def test_input_sets_hold_dense_kv_only_where_sdpa_needs_them(bench):
    """Without sdpa only the first set (the oracle's) holds dense K/V, so more paged sets fit the budget."""
    shape = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "block_size": 16}
    point = bench.Point("decode", "fp16", 8, 4096, 1, **shape)
    cuda = torch.device("cuda")  # num_sets only looks at the type: no GPU needed
    dense, paged = point.set_bytes(True), point.set_bytes(False)
    assert dense > 1.9 * paged  # the dense copy of K/V is about one more pool
    budget = dense + 3 * paged
    # 3 paged sets' bytes hold 1 dense set
    assert bench.num_sets(point, cuda, budget, dense=True) == 2
    assert bench.num_sets(point, cuda, budget, dense=False) == 4
    # the oracle's set must fit
    assert bench.num_sets(point, cuda, dense - 1, dense=False) == 0


def test_flex_runs_last_within_each_point(bench, monkeypatch, tmp_path):
    """Asked first, flex-paged still runs after every other method is checked and timed."""
    events = []
    for name, real in list(bench.FACTORIES.items()):

        def factory(point, shared, first, args, name=name, real=real):
            call = real(point, shared, first, args)
            events.append(("check", name))
            return lambda s: (events.append(("call", name)), call(s))[1]

        monkeypatch.setitem(bench.FACTORIES, name, factory)
    argv = [
        *QUICK,
        "--dtypes",
        "fp16",
        "--batches",
        "1",
        "--contexts",
        "16",
        "--skip-prefill",
    ]
    argv += [
        "--methods",
        "flex-paged",
        "sdpa",
        "triton",
        "--json",
        str(tmp_path / "out.json"),
    ]
    assert bench.main(argv) == 0
    first_flex = events.index(("check", "flex-paged"))
    # checked and timed before
    assert {name for _, name in events[:first_flex]} == {"sdpa", "triton"}
    assert {name for _, name in events[first_flex:]} == {"flex-paged"}
    row = json.loads((tmp_path / "out.json").read_text())["decode"][0]
    # reported in the order asked
    assert list(row["methods"]) == ["flex-paged", "sdpa", "triton"]


def test_a_device_fault_in_flex_keeps_what_was_measured(
    bench, monkeypatch, tmp_path, capsys
):
    """A flex failure that leaves the device unusable (simulated: device_works says so) stops the sweep:
    the point's other methods keep their times, the later points say why they were not run."""

    def faulting(point, shared, first, args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(bench.FACTORIES, "flex-paged", faulting)
    monkeypatch.setattr(bench, "device_works", lambda device: False)
    path = tmp_path / "out.json"
    argv = [
        *QUICK,
        "--dtypes",
        "fp16",
        "--batches",
        "1",
        "--contexts",
        "16",
        "40",
        "--skip-prefill",
    ]
    assert bench.main([*argv, "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    first, second = report["decode"]
    assert all(
        first["methods"][m]["time_us"] > 0
        for m in ("triton", "triton-kernel", "reference", "sdpa")
    )
    assert first["methods"]["flex-paged"]["skipped"].startswith(
        "failed: RuntimeError: CUDA error"
    )
    assert (
        "the device stopped working after flex-paged failed at decode fp16 batch=1 ctx=16"
        in (report["device_fault"])
    )
    assert (
        second["skipped"].startswith("not run: the device stopped working")
        and second["methods"] == {}
    )
    assert "stopped early: the device stopped working" in capsys.readouterr().out


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_the_full_sweep_needs_a_gpu(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args([])
    assert "--quick runs tiny shapes on the CPU" in capsys.readouterr().err


@pytest.mark.gpu
def test_a_small_real_point_on_cuda(bench, tmp_path):
    path = tmp_path / "out.json"
    argv = [
        "--dtypes",
        "fp16",
        "--batches",
        "2",
        "--contexts",
        "4096",
        "--prefill-batches",
        "1",
    ]
    argv += [
        "--prefixes",
        "1024",
        "--new-tokens",
        "64",
        "--warmup-ms",
        "5",
        "--rep-ms",
        "20",
    ]
    assert (
        bench.main([*argv, "--copy-mib", "256", "--no-progress", "--json", str(path)])
        == 0
    )
    report = json.loads(path.read_text())
    assert report["config"]["flex_compiled"] and report["copy_bandwidth"]["gbps"] > 100
    (decode,) = report["decode"]
    for name in ("triton", "triton-kernel", "reference", "sdpa"):
        assert decode["methods"][name]["time_us"] > 0, name
    flex = decode["methods"]["flex-paged"]
    # timed, or the reason it could not be
    assert flex.get("time_us", 0) > 0 or flex["skipped"]
    assert decode["goal"]["triton-kernel"] in (
        "pass",
        "miss bw",
        "miss sdpa",
        "miss bw+sdpa",
    )
    (prefill,) = report["prefill"]
    assert prefill["methods"]["triton"]["tflops"] > 0
