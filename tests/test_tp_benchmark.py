"""benchmarks/tensor_parallel.py runs at a tiny scale and reports what tensor parallelism does.

Benchmarks are not timed assertions (DESIGN.md): this runs the script on tiny-llama (2 layers,
2 KV heads) with two short requests at TP = 1 and 2, and checks what it reports: the tokens agreed,
each TP = 2 rank holds half the KV pool, a decode step all-reduces twice a layer, and the step
inputs were broadcast. Never how fast. It starts a worker process (marked `multiprocess`).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from minipaged.presets import CONFIGS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tensor_parallel.py"
TINY = [
    "--model",
    "tiny-llama",
    "--num-requests",
    "2",
    "--prompt-lens",
    "4",
    "12",
    "--max-tokens",
    "4",
    "--block-size",
    "4",
    "--no-progress",
]


def _load():
    """The script imported as a module (benchmarks/ is not a package)."""
    # as `python benchmarks/...` does: bench_common sits beside it
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("tensor_parallel_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.mark.multiprocess
def test_tiny_run_reports_what_each_rank_sent_and_holds(tmp_path, capsys):
    bench = _load()
    path = tmp_path / "tp.json"
    threads = torch.get_num_threads()
    assert bench.main([*TINY, "--json", str(path)]) == 0
    assert torch.get_num_threads() == threads  # the thread count does not leak out
    report = json.loads(path.read_text())
    assert report["benchmark"] == "tensor_parallel" and report["checked"]
    assert report["command"].startswith(
        "python benchmarks/tensor_parallel.py --model tiny-llama"
    )
    assert "checked: every size's tokens == TP=1's" in capsys.readouterr().out

    rows = {r["tp"]: r for r in report["rows"]}
    assert sorted(rows) == [1, 2]
    for row in rows.values():
        assert tuple(row) == bench.ROW_KEYS
        # 2 requests: one prefill step, then 3 decode-only steps (4 tokens out each)
        assert (row["prefill_steps"], row["decode_steps"]) == (1, 3)
        assert row["step_ms"] > 0 and row["wall_s"] > 0
    # tiny-llama has 2 KV heads: one each at TP = 2, half the bytes, in the same blocks
    assert (rows[1]["kv_heads_per_rank"], rows[2]["kv_heads_per_rank"]) == (2, 1)
    pools = [p for p in report["pools"] if p["tp"] == 2]
    assert [p["rank"] for p in pools] == [0, 1]
    for p in pools:
        assert 2 * p["bytes"] == rows[1]["kv_pool_bytes_per_rank"]
        assert p["shape"][:2] == [report["config"]["num_blocks"], 4]

    layers = CONFIGS["tiny-llama"]().num_hidden_layers
    comm = {r["kind"]: r for r in report["comm"]}
    assert sorted(comm) == ["decode", "prefill"]
    for row in comm.values():
        assert tuple(row) == bench.COMM_KEYS and row["tp"] == 2
        # Megatron: one all-reduce after the attention, one after the MLP, every layer
        assert row["allreduce_calls"]["mean"] == row["allreduce_calls"]["max"]
        assert row["allreduce_calls"]["max"] == 2 * layers
        assert row["broadcast_bytes"]["mean"] > 0 and row["allreduce_bytes"]["mean"] > 0
    # a prefill step all-reduces every prompt token, a decode step one token a sequence
    assert (
        comm["prefill"]["allreduce_bytes"]["max"]
        > comm["decode"]["allreduce_bytes"]["max"]
    )


@pytest.mark.multiprocess
def test_different_tokens_are_refused(monkeypatch, capsys, tmp_path):
    bench = _load()
    path = tmp_path / "tp.json"
    real = bench.run_size

    def wrong_at_tp2(tp, *args):
        tokens, *rest = real(tp, *args)
        if tp == 2:
            tokens[1] = [t + 1 for t in tokens[1]]
        return tokens, *rest

    monkeypatch.setattr(bench, "run_size", wrong_at_tp2)
    assert bench.main([*TINY, "--json", str(path)]) == 1
    captured = capsys.readouterr()
    assert "request 1: tensor_parallel_size=2 and 1 differ from token 0" in captured.err
    assert captured.out == "" and not path.exists()
