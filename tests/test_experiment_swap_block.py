"""The block-size and swap-vs-recompute experiments (vLLM paper sections 7.2-7.3): their small runs
return the documented rows, the counts in them are exact, and the figures are drawn; both run on the
Triton backend too (through Triton's interpreter on a machine without a GPU), with the same rows, and
refuse a bad backend or device before any work.

Times are only checked to be positive: benchmarks are benchmarks, not timed assertions."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from minipaged.backend import get_backend
from minipaged.experiments import (
    ExperimentResult,
    block_size,
    block_size_time,
    swap_vs_recompute,
)
from minipaged.presets import load_preset
from minipaged.testing import device_for

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WASTE_KEYS = {
    "part",
    "block_size",
    "workload",
    "num_seqs",
    "mean_len",
    "allocated_slots",
    "wasted_slots",
    "waste_fraction",
}
TIME_KEYS = {
    "part",
    "block_size",
    "model",
    "num_seqs",
    "mean_context_len",
    "decode_steps",
    "seconds_per_step",
    "model_seconds_per_step",
}
LOAD_KEYS = {
    "part",
    "block_size",
    "workload",
    "rate",
    "kv_slots",
    "window_s",
    "mean_batch_size",
    "mean_waiting",
    "throughput_rps",
    "token_states",
    "internal_fragmentation",
    "stranded",
    "preemptions",
}
SWAP_KEYS = {
    "model",
    "block_size",
    "seq_len",
    "blocks",
    "bytes",
    "swap_out_s",
    "swap_in_s",
    "swap_out_per_block_s",
    "swap_in_per_block_s",
    "recompute_s",
}
# K and V x 2 layers x 2 KV heads x 16 dims x fp32
TINY_LLAMA_KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4


@pytest.fixture(scope="module")
def block_result():
    return block_size.run("small", seed=0, progress=False)


@pytest.fixture(scope="module")
def swap_result():
    return swap_vs_recompute.run("small", seed=0, progress=False)


def _positive(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_internal_fragmentation_by_hand():
    # 11 + 0 + 15 empty slots
    assert block_size.internal_fragmentation([5, 16, 17], 16) == (64, 26)
    assert block_size.internal_fragmentation([5, 16, 17], 1) == (38, 0)


def test_block_size_rows_have_the_documented_keys(block_result):
    assert block_result.experiment == "block-size"
    waste = [r for r in block_result.rows if r["part"] == "waste"]
    times = [r for r in block_result.rows if r["part"] == "time"]
    loads = [r for r in block_result.rows if r["part"] == "load"]
    assert len(waste) + len(times) + len(loads) == len(block_result.rows)
    assert all(set(r) == WASTE_KEYS for r in waste) and all(
        set(r) == TIME_KEYS for r in times
    )
    assert all(set(r) == LOAD_KEYS for r in loads)
    assert (
        {r["workload"] for r in waste}
        == {r["workload"] for r in loads}
        == {"sharegpt-like", "alpaca-like"}
    )
    assert sorted({r["block_size"] for r in waste}) == list(block_size.BLOCK_SIZES)
    assert [r["block_size"] for r in times] == list(
        block_size.SCALES["small"].time_block_sizes
    )
    for workload in ("sharegpt-like", "alpaca-like"):
        sizes = [r["block_size"] for r in loads if r["workload"] == workload]
        assert sizes == list(block_size.SCALES["small"].load_block_sizes)
    json.dumps(block_result.to_json())  # plain JSON values


def test_waste_shrinks_with_the_block_size(block_result):
    for workload in ("sharegpt-like", "alpaca-like"):
        rows = sorted(
            (
                r
                for r in block_result.rows
                if r["part"] == "waste" and r["workload"] == workload
            ),
            key=lambda r: r["block_size"],
        )
        fractions = [r["waste_fraction"] for r in rows]
        assert fractions[0] == 0.0, "blocks of one token waste nothing"
        assert fractions == sorted(fractions) and fractions[-1] > fractions[0]
        for r in rows:
            total = round(r["mean_len"] * r["num_seqs"])
            assert r["allocated_slots"] - r["wasted_slots"] == total
            assert r["allocated_slots"] % r["block_size"] == 0
            assert r["waste_fraction"] == pytest.approx(
                r["wasted_slots"] / r["allocated_slots"]
            )
    waste = [r for r in block_result.rows if r["part"] == "waste"]
    by = {(r["workload"], r["block_size"]): r["waste_fraction"] for r in waste}
    assert by["alpaca-like", 256] > by["sharegpt-like", 256], (
        "short sequences waste more of a large block"
    )


def test_block_size_times_are_positive(block_result):
    for r in (r for r in block_result.rows if r["part"] == "time"):
        assert _positive(r["seconds_per_step"]) and _positive(
            r["model_seconds_per_step"]
        )
        small = block_size.SCALES["small"]
        assert r["decode_steps"] == small.decode_steps * small.rounds


def test_large_blocks_shrink_what_the_budget_serves(block_result):
    """Fig. 18b's memory side: blocks larger than the sequences waste most of each block, so fewer
    requests fit the budget and fewer are served per second; the offered load exceeds what is served."""
    loads = {
        (r["workload"], r["block_size"]): r
        for r in block_result.rows
        if r["part"] == "load"
    }
    for workload in ("sharegpt-like", "alpaca-like"):
        small, default, large = (loads[workload, b] for b in (1, 16, 256))
        assert small["internal_fragmentation"] == 0.0, (
            "blocks of one token waste nothing"
        )
        assert large["internal_fragmentation"] > default["internal_fragmentation"] > 0.0
        assert (
            large["mean_batch_size"]
            < default["mean_batch_size"]
            <= small["mean_batch_size"] * 1.001
        )
        assert large["throughput_rps"] < small["throughput_rps"] < small["rate"], (
            "saturated: a queue stays"
        )
        assert small["mean_waiting"] > 0
        for r in (small, default, large):
            shares = r["token_states"] + r["internal_fragmentation"] + r["stranded"]
            assert shares == pytest.approx(1.0), (
                "paged memory in use: tokens, last-block tails, stranded"
            )
            assert r["kv_slots"] == 15_000 // r["block_size"] * r["block_size"]
    alpaca_loss = (
        1
        - loads["alpaca-like", 256]["throughput_rps"]
        / loads["alpaca-like", 1]["throughput_rps"]
    )
    sharegpt_loss = (
        1
        - loads["sharegpt-like", 256]["throughput_rps"]
        / loads["sharegpt-like", 1]["throughput_rps"]
    )
    assert alpaca_loss > sharegpt_loss, "short sequences lose more to large blocks"


def test_swap_rows_count_blocks_and_bytes(swap_result):
    seq_len = swap_vs_recompute.SCALES["small"].seq_len
    assert swap_result.experiment == "swap-vs-recompute"
    assert [r["block_size"] for r in swap_result.rows] == list(
        swap_vs_recompute.SCALES["small"].block_sizes
    )
    for r in swap_result.rows:
        assert (
            set(r) == SWAP_KEYS
            and r["seq_len"] == seq_len
            and r["model"] == "tiny-llama"
        )
        b = r["block_size"]
        assert r["blocks"] == math.ceil(seq_len / b)
        assert r["bytes"] == r["blocks"] * b * TINY_LLAMA_KV_BYTES_PER_TOKEN, (
            "whole blocks, tails included"
        )
        for key in SWAP_KEYS - {"model", "block_size", "seq_len", "blocks", "bytes"}:
            assert _positive(r[key]), key
    json.dumps(swap_result.to_json())


@pytest.mark.parametrize("fixture", ["block_result", "swap_result"])
def test_settings_record_the_defaults(fixture, request):
    result = request.getfixturevalue(fixture)
    assert result.settings == {
        "scale": "small",
        "seed": 0,
        "backend": "reference",
        "device": "cpu",
    }
    assert result.to_json()["settings"] == result.settings


def test_json_without_settings_still_loads():
    """JSON written before "settings" existed (the committed docs/experiments/img/*.json) loads."""
    old = {
        "experiment": "swap-vs-recompute",
        "rows": [{"block_size": 1}],
        "paper": {"section": "7.3"},
    }
    result = ExperimentResult.from_json(old)
    assert (
        result.settings == {}
        and result.rows == old["rows"]
        and result.paper == old["paper"]
    )
    assert ExperimentResult.from_json(result.to_json()) == result


@pytest.mark.parametrize("module", [block_size, swap_vs_recompute])
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"backend": "cuda"},
            "backend must be one of 'reference', 'triton'; got 'cuda'",
        ),
        (
            {"device": "gpu"},
            r"device must be 'cpu' or 'cuda\[:N\]' \(N a GPU's index\), got 'gpu'",
        ),
        ({"device": "cuda:99"}, "device 'cuda:99'"),
    ],
)
def test_a_bad_backend_or_device_is_refused_before_any_work(
    module, arguments, message, monkeypatch
):
    def no_work(*args, **kwargs):
        raise AssertionError("the arguments must be checked before any work")

    monkeypatch.setattr(
        module, "load_preset" if module is swap_vs_recompute else "waste_rows", no_work
    )
    with pytest.raises(ValueError, match=message):
        module.run("small", progress=False, **arguments)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="the refusal is for a machine without a GPU"
)
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(
        ValueError, match="device 'cuda' needs a CUDA GPU, and torch sees none here"
    ):
        swap_vs_recompute.run("small", progress=False, device="cuda")


# the interpreter is slow
TINY_SWAP = swap_vs_recompute.Scale(seq_len=24, block_sizes=(1, 16), repeats=1)
# the time part small for the interpreter; the other parts (no tensors) shortened too
TINY_BLOCK = {
    "num_requests": 100,
    "time_block_sizes": (1, 16),
    "prompt_lens": (5, 9),
    "decode_steps": 2,
    "load_block_sizes": (16,),
    "load_end": {"sharegpt-like": 12.0, "alpaca-like": 4.0},
    "load_warmup": {"sharegpt-like": 4.0, "alpaca-like": 1.0},
}


def _spy_on_llm(monkeypatch, module) -> list[tuple[str, str]]:
    """Record the (backend, device) of every LLM that `module` builds."""
    seen: list[tuple[str, str]] = []
    real = module.LLM

    def llm(*args, **kwargs):
        seen.append((kwargs.get("backend", "reference"), kwargs.get("device", "cpu")))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "LLM", llm)
    return seen


def _same_rows_but_times(
    triton_rows: list[dict], reference_rows: list[dict], time_keys: set[str]
) -> None:
    assert len(triton_rows) == len(reference_rows)
    for got, want in zip(triton_rows, reference_rows, strict=True):
        assert set(got) == set(want)
        assert {k: v for k, v in got.items() if k not in time_keys} == {
            k: v for k, v in want.items() if k not in time_keys
        }
        assert all(_positive(got[k]) for k in time_keys & set(got)), got


def test_swap_vs_recompute_runs_on_triton(monkeypatch):
    """The engine on the Triton backend (interpreted without a GPU): the same rows as the reference, and
    the experiment's own check, that the K/V read back after a swap out and in is exactly what was
    there before, passes (a failure raises)."""
    pytest.importorskip("triton")
    device = str(device_for("triton"))
    monkeypatch.setitem(swap_vs_recompute.SCALES, "small", TINY_SWAP)
    reference = swap_vs_recompute.run("small", progress=False)
    seen = _spy_on_llm(monkeypatch, swap_vs_recompute)
    triton = swap_vs_recompute.run(
        "small", progress=False, backend="triton", device=device
    )
    # warm-up
    assert set(seen) == {("triton", device)} and len(seen) == 1 + len(
        TINY_SWAP.block_sizes
    )
    assert triton.settings == {
        "scale": "small",
        "seed": 0,
        "backend": "triton",
        "device": device,
    }
    times = SWAP_KEYS - {"model", "block_size", "seq_len", "blocks", "bytes"}
    _same_rows_but_times(triton.rows, reference.rows, times)
    assert [r["blocks"] for r in triton.rows] == [24, 2]


def test_block_size_time_part_runs_on_triton(monkeypatch):
    """The time part on the Triton backend: the same rows as the reference (the engine's own check
    holds: every step decodes every sequence, nothing is preempted); the other parts are unchanged."""
    pytest.importorskip("triton")
    device = str(device_for("triton"))
    tiny = dataclasses.replace(block_size.SCALES["small"], **TINY_BLOCK)
    monkeypatch.setitem(block_size.SCALES, "small", tiny)
    reference = block_size.run("small", progress=False)
    seen = _spy_on_llm(monkeypatch, block_size_time)
    triton = block_size.run("small", progress=False, backend="triton", device=device)
    # warm-up
    assert set(seen) == {("triton", device)} and len(seen) == 1 + len(
        tiny.time_block_sizes
    )
    assert triton.settings == {
        "scale": "small",
        "seed": 0,
        "backend": "triton",
        "device": device,
    }
    _same_rows_but_times(
        triton.rows, reference.rows, {"seconds_per_step", "model_seconds_per_step"}
    )
    assert [r["block_size"] for r in triton.rows if r["part"] == "time"] == [1, 16]


def test_per_block_swap_moves_what_swap_blocks_moves():
    gen = torch.Generator().manual_seed(3)
    # [num_blocks, block_size, num_kv_heads, head_dim]
    src = torch.randn(6, 4, 2, 8, generator=gen)
    mapping = [(4, 0), (1, 2), (5, 1)]
    expected = torch.full((3, 4, 2, 8), float("nan"))
    got = expected.clone()
    get_backend("reference").swap_blocks(
        src, expected, torch.tensor(mapping, dtype=torch.int64)
    )
    swap_vs_recompute.swap_blocks_per_block(src, got, mapping)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("module", [block_size, swap_vs_recompute])
def test_run_refuses_an_unknown_scale(module):
    with pytest.raises(ValueError, match="scale must be 'small' or 'full'"):
        module.run("medium", progress=False)


def test_plots_are_pngs(block_result, swap_result, tmp_path):
    for module, result in (
        (block_size, block_result),
        (swap_vs_recompute, swap_result),
    ):
        path = tmp_path / f"{result.experiment}.png"
        module.plot(result, path)
        assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_exercise_block_size_page():
    """docs/experiments/block-size.md, exercise: 100 tokens in blocks of 16 and of 64."""
    assert block_size.internal_fragmentation([100], 16) == (112, 12)
    assert block_size.internal_fragmentation([100], 64) == (128, 28)


def test_exercise_swap_vs_recompute_page():
    """docs/experiments/swap-vs-recompute.md, exercise: 512 tokens of tiny-llama in blocks of 8."""
    model = load_preset("tiny-llama")
    row = swap_vs_recompute.measure(model, 8, list(range(3, 3 + 256)) * 2, repeats=1)
    assert row["blocks"] == 64 and row["bytes"] == 256 * 1024
    assert row["bytes"] // (row["blocks"] * 2 * 2) == 1024, (
        "one block of one pool: 8 x 2 x 16 x 4 bytes"
    )
