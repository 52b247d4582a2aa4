"""The serving experiment (Fig. 12): its rows, its latency curves, max_rate, its docs page."""

from __future__ import annotations

import copy
import itertools
import json

import pytest

from minipaged.experiments import EXPERIMENTS, get_experiment, serving_latency
from minipaged.experiments import latency as lat
from minipaged.experiments.pages import DOCS, page_parts, render, stale_parts


@pytest.fixture(scope="module")
def small():
    return serving_latency.run("small", seed=0, progress=False)


def _curves(rows):
    points, _ = lat.split(rows)
    curves = {}
    for r in sorted(points, key=lambda r: r["rate"]):
        curves.setdefault((r["system"], r["workload"]), []).append(r)
    return curves


def test_registered_and_listed():
    assert "serving" in EXPERIMENTS
    assert get_experiment("serving") is serving_latency


def test_rows_have_exactly_the_documented_keys(small):
    points, summaries = lat.split(small.rows)
    assert points and all(tuple(r) == lat.ROW_KEYS for r in points)
    assert all(tuple(r) == lat.SUMMARY_KEYS for r in summaries)
    pairs = {(r["system"], r["workload"]) for r in points}
    assert {(r["system"], r["workload"]) for r in summaries} == pairs
    assert len(summaries) == len(pairs) == len(serving_latency.SYSTEMS) * 2
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


def test_vllm_sustains_at_least_orca_max(small):
    best = {
        (r["system"], r["workload"]): r["max_rate"] for r in lat.split(small.rows)[1]
    }
    for workload in ("ShareGPT", "Alpaca"):
        assert best["vLLM", workload] >= best["Orca (Max)", workload] > 0


def test_max_rate_on_hand_made_rows():
    def rows(*pairs):
        return [{"rate": rate, "normalized_latency": nl} for rate, nl in pairs]

    # the first crossing
    assert lat.max_rate(rows((1, 0.02), (2, 0.05), (3, 0.2), (4, 0.05))) == 2
    assert lat.max_rate(rows((3, 0.2), (1, 0.02), (2, 0.05))) == 2  # any order
    # reaching the threshold counts as over
    assert lat.max_rate(rows((1, 0.02), (2, 0.1))) == 1
    assert lat.max_rate(rows((1, 0.3), (2, 0.5))) == 0.0  # none under
    assert lat.max_rate(rows((1, 0.02), (2, 0.03))) == 2  # all under
    assert lat.max_rate(rows((1, 0.02), (2, 0.3)), threshold=0.5) == 2
    made = [{"system": "a", "workload": "w", **r} for r in rows((1, 0.02), (2, 0.3))]
    assert lat.summaries(made) == [{"system": "a", "workload": "w", "max_rate": 1}]


def test_deterministic_under_a_seed(monkeypatch):
    tiny = {
        "small": {
            "ShareGPT": serving_latency.Scale(8.0, (1.0, 4.0)),
            "Alpaca": serving_latency.Scale(2.0, (10.0,)),
        }
    }
    monkeypatch.setattr(serving_latency, "SCALES", tiny)
    first = serving_latency.run("small", seed=0, progress=False).rows
    assert serving_latency.run("small", seed=0, progress=False).rows == first
    assert serving_latency.run("small", seed=1, progress=False).rows != first


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"model": "opt-1b"}, "model"),
        ({"scale": "medium"}, "scale"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        serving_latency.run(**{"progress": False, **kwargs})


def test_the_page_says_what_its_json_says():
    data = json.loads((DOCS / "img" / "serving.json").read_text())
    text = (DOCS / "serving.md").read_text()
    assert not stale_parts(text, page_parts("serving"))
    changed = copy.deepcopy(data)
    summary = next(
        r for r in changed["rows"] if r.get("system") == "vLLM" and "max_rate" in r
    )
    summary["max_rate"] += 1.0
    assert stale_parts(text, render("serving", changed))


def test_vllm_sustains_more_than_fastertransformer(small):
    """FasterTransformer: Orca (Max)'s reservations and static batches, the lowest rate of all."""
    best = {
        (r["system"], r["workload"]): r["max_rate"] for r in lat.split(small.rows)[1]
    }
    for workload in ("ShareGPT", "Alpaca"):
        assert best["vLLM", workload] > best["FasterTransformer", workload]
        assert best["FasterTransformer", workload] <= best["Orca (Max)", workload]


# ---- serving --measured: the same arrivals in real time on this machine ---------------------------


@pytest.fixture(scope="module")
def measured_small():
    return serving_latency.run("small", seed=0, progress=False, measured=True)


def test_measured_run_has_every_system_and_the_documented_keys(measured_small):
    from minipaged.experiments import measured

    points, summaries = lat.split(measured_small.rows)
    assert [r["system"] for r in points] == [
        measured.LABELS[s] for s in measured.SYSTEMS
    ]
    assert all(tuple(r) == lat.ROW_KEYS for r in points)
    assert all(r["normalized_latency"] > 0 and r["throughput"] > 0 for r in points)
    assert all(r["mean_batch_size"] >= 1 for r in points)
    assert len(summaries) == len(measured.SYSTEMS)
    settings = measured_small.settings
    assert settings["measured"] and (settings["backend"], settings["device"]) == (
        "reference",
        "cpu",
    )
    assert settings["threshold"] == serving_latency.MEASURED_THRESHOLD


def test_the_padded_stand_in_batches_at_most_what_max_reservations_fit():
    from minipaged.experiments import measured

    assert (
        measured.PADDED_BATCH
        == measured.NUM_GPU_BLOCKS * measured.BLOCK_SIZE // measured.MAX_MODEL_LEN
    )
    row = measured.measure("padded", 200.0, 0.5)
    assert 1 <= row["mean_batch_size"] <= measured.PADDED_BATCH


def test_backend_and_device_need_the_measured_run():
    with pytest.raises(
        ValueError, match="backend and device apply to the measured run only"
    ):
        serving_latency.run("small", progress=False, backend="reference")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda"):
        serving_latency.run("small", progress=False, measured=True, device="gpu")
    from minipaged.experiments import measured

    with pytest.raises(ValueError, match="system must be one of"):
        measured.measure("orca", 1.0, 1.0)


def test_cli_measured_flag(capsys):
    from minipaged import cli

    assert cli.main(["experiment", "--list"]) == 0
    listing = capsys.readouterr().out
    assert (
        "serving" in listing
        and "[--measured]" in listing.split("serving", 1)[1].splitlines()[0]
    )
    with pytest.raises(SystemExit):
        cli.main(["experiment", "batch-size", "--measured"])
    assert "has no measured run" in capsys.readouterr().err


@pytest.mark.parametrize(("model", "gpus"), [("opt-66b", 4), ("opt-175b", 8)])
def test_the_larger_models_are_there_when_asked_for(monkeypatch, model, gpus):
    tiny = {
        "small": {
            "ShareGPT": serving_latency.Scale(4.0, (1.0,)),
            "Alpaca": serving_latency.Scale(2.0, (5.0,)),
        }
    }
    monkeypatch.setattr(serving_latency, "SCALES", tiny)
    result = serving_latency.run("small", progress=False, model=model)
    assert (result.settings["model"], result.settings["tensor_parallel_size"]) == (
        model,
        gpus,
    )
    assert lat.split(result.rows)[0] and all(
        r["normalized_latency"] > 0 for r in result.rows if "rate" in r
    )


def test_cli_model_flag(capsys):
    from minipaged import cli

    for argv, message in (
        (["experiment", "batch-size", "--model", "opt-66b"], "takes no --model"),
        (
            ["experiment", "serving", "--model", "opt-1b", "--scale", "small"],
            "model must be one of",
        ),
        (
            ["experiment", "serving", "--measured", "--model", "opt-13b"],
            "must be a preset",
        ),
    ):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert message in capsys.readouterr().err


def test_measured_run_on_the_triton_backend():
    """The measured engine runs on the chosen backend (here Triton's interpreter: slow, so a short
    trace); its rows are the same kind as the reference's."""
    pytest.importorskip("triton")
    from minipaged.experiments import measured

    row = measured.measure("paged", 10.0, 0.3, backend="triton")
    assert (
        tuple(row) == lat.ROW_KEYS
        and row["normalized_latency"] > 0
        and row["mean_batch_size"] >= 1
    )
