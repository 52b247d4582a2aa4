"""The decoding experiment (Fig. 14): its rows, its latency curves, max_rate, its docs page and the
page's exercise."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch

from minipaged.experiments import EXPERIMENTS, decoding, get_experiment
from minipaged.experiments import latency as lat
from minipaged.experiments.pages import DOCS, page_parts, render, stale_parts
from minipaged.experiments.simulator import simulate
from minipaged.workloads import Request

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def small():
    threads = torch.get_num_threads()
    result = decoding.run("small", seed=0, progress=False)
    assert torch.get_num_threads() == threads  # run() gives back the threads it pinned
    return result


def _curves(rows):
    points, _ = lat.split(rows)
    curves = {}
    for r in sorted(points, key=lambda r: r["rate"]):
        curves.setdefault((r["system"], r["workload"]), []).append(r)
    return curves


def test_registered_after_serving():
    names = list(EXPERIMENTS)
    assert names.index("decoding") == names.index("serving") + 1
    assert "Fig. 14" in EXPERIMENTS["decoding"][1]
    assert get_experiment("decoding") is decoding


def test_rows_have_exactly_the_documented_keys(small):
    points, summaries = lat.split(small.rows)
    assert points and all(tuple(r) == lat.ROW_KEYS for r in points)
    assert all(tuple(r) == lat.SUMMARY_KEYS for r in summaries)
    pairs = {(r["system"], r["workload"]) for r in points}
    assert {(r["system"], r["workload"]) for r in summaries} == pairs
    assert {w for _, w in pairs} == {f"parallel n={n}" for n in (2, 4, 6)} | {
        f"beam width={w}" for w in (2, 4, 6)
    }
    assert {s for s, _ in pairs} == {"vLLM", "Orca (Oracle)"} and len(summaries) == 12
    json.dumps(small.to_json())  # plain JSON values
    assert (
        small.settings["threshold"] == lat.THRESHOLD
        and small.settings["model"] == "opt-13b"
    )


def test_latency_rises_with_rate(small):
    for (system, workload), rows in _curves(small.rows).items():
        latencies = [r["normalized_latency"] for r in rows]
        for before, after in itertools.pairwise(latencies):
            assert after >= before - 2e-3, (system, workload, latencies)
        assert latencies[-1] > 1.05 * latencies[0], (system, workload, latencies)


def test_max_rate_is_read_from_the_rows(small):
    for summary in lat.split(small.rows)[1]:
        curve = _curves(small.rows)[summary["system"], summary["workload"]]
        assert summary["max_rate"] == lat.max_rate(curve)


def test_vllm_sustains_at_least_orca_oracle_at_beam_width_6(small):
    best = {
        (r["system"], r["workload"]): r["max_rate"] for r in lat.split(small.rows)[1]
    }
    assert best["vLLM", "beam width=6"] >= best["Orca (Oracle)", "beam width=6"] > 0


def test_deterministic_under_a_seed(monkeypatch):
    tiny = {
        "small": {
            w: decoding.Scale(2.0, (20.0,)) for w in ("parallel n=2", "beam width=2")
        }
    }
    monkeypatch.setattr(decoding, "SCALES", tiny)
    monkeypatch.setattr(
        decoding, "WORKLOADS", {w: decoding.WORKLOADS[w] for w in tiny["small"]}
    )
    first = decoding.run("small", seed=0, progress=False).rows
    assert decoding.run("small", seed=0, progress=False).rows == first
    assert decoding.run("small", seed=1, progress=False).rows != first


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"scale": "medium"}, "scale"), ({"seed": -1}, "seed")]
)
def test_bad_arguments_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        decoding.run(**{"progress": False, **kwargs})


def test_plot_writes_a_png(small, tmp_path):
    decoding.plot(small, tmp_path / "decoding.png")
    assert (tmp_path / "decoding.png").read_bytes().startswith(PNG_SIGNATURE)


def test_the_page_says_what_its_json_says():
    data = json.loads((DOCS / "img" / "decoding.json").read_text())
    text = (DOCS / "decoding.md").read_text()
    assert not stale_parts(text, page_parts("decoding"))
    assert data["settings"]["scale"] == "full"
    # every measured number of every row is on the page
    for i, row in enumerate(data["rows"]):
        changed = copy.deepcopy(data)
        key = "max_rate" if "max_rate" in row else "normalized_latency"
        changed["rows"][i][key] = row[key] * 1.37 + 1.0
        assert stale_parts(text, render("decoding", changed)), row


@pytest.mark.parametrize(
    ("n", "paged_slots", "orca_slots"), [(4, 160, 256), (6, 224, 384)]
)
def test_the_pages_exercise(n, paged_slots, orca_slots):
    """One request, prompt 40, output 24, n samples, block size 16: the KV slots each system holds
    at the request's last step (docs/experiments/decoding.md, "Predict, then check")."""
    request = Request("r0", 0.0, prompt_len=40, output_len=24, n=n)
    paged = simulate([request], "paged", kv_slots=15_837, block_size=16).records[-1]
    assert paged.blocks_used * 16 == paged_slots
    # two shared prompt blocks, two of each sample's own
    assert paged.blocks_used == 2 + 2 * n
    orca = simulate([request], "orca-oracle", kv_slots=15_837).records[-1].breakdown
    # one range of prompt + output per sample
    assert orca.used == orca_slots == n * (40 + 24)
