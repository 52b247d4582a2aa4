"""`minipaged experiment`: --list, running an experiment (table, JSON, plot), --backend and --device,
and every refusal, which exits with status 2 and a one-line reason, never a traceback.

Only block-size and swap-vs-recompute are run (their small scale); the tests do not depend on the
other experiments' modules existing (a stand-in plays a simulation where one is needed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minipaged import cli
from minipaged.cli import main
from minipaged.experiments import (
    EXPERIMENTS,
    ExperimentResult,
    get_experiment,
    runs_tensors,
)

# serving: its --measured run
TENSOR_EXPERIMENTS = ("serving", "block-size", "swap-vs-recompute")
SIMULATIONS = ("memory-waste", "batch-size", "sharing", "shared-prefix")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _exit_2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith(
        "minipaged experiment: error: "
    )
    return err


def test_list_names_every_experiment(capsys):
    assert main(["experiment", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(EXPERIMENTS)
    for line, (name, (_, title)) in zip(lines, EXPERIMENTS.items(), strict=True):
        assert line.startswith(name) and title in line
        assert ("[--backend, --device]" in line) == (name in TENSOR_EXPERIMENTS), line
        assert ("[--measured]" in line) == (name == "serving"), line
    assert not any(
        "not written yet" in line
        for line in lines
        if line.startswith(("block-size", "swap-"))
    )


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_runs_tensors_reads_the_run_signature(name):
    module_name = EXPERIMENTS[name][0]
    if importlib.util.find_spec(f"minipaged.experiments.{module_name}") is None:
        pytest.skip(f"{module_name} is not written yet")
    assert runs_tensors(get_experiment(name)) == (name in TENSOR_EXPERIMENTS)


def test_runs_tensors_wants_both_parameters():
    def both(
        scale="full", seed=0, progress=True, *, backend="reference", device="cpu"
    ): ...
    def one(scale="full", seed=0, progress=True, *, backend="reference"): ...

    assert runs_tensors(SimpleNamespace(run=both))
    assert not runs_tensors(SimpleNamespace(run=one)) and not runs_tensors(
        SimpleNamespace()
    )


def test_unknown_name_names_the_known_ones(capsys):
    err = _exit_2(["experiment", "no-such-experiment"], capsys)
    assert "unknown experiment 'no-such-experiment'" in err
    assert all(name in err for name in EXPERIMENTS)


def test_no_name_asks_for_one(capsys):
    assert "give an experiment NAME, or --list" in _exit_2(["experiment"], capsys)


def test_an_experiment_not_written_yet_says_so(monkeypatch, capsys):
    monkeypatch.setitem(
        EXPERIMENTS,
        "ghost",
        ("no_such_module_for_tests", "an experiment still to write"),
    )
    err = _exit_2(["experiment", "ghost"], capsys)
    assert "experiment 'ghost' is not written yet" in err
    assert "(no module minipaged.experiments.no_such_module_for_tests)" in err
    assert main(["experiment", "--list"]) == 0
    assert "an experiment still to write  (not written yet)" in capsys.readouterr().out


def test_a_missing_dependency_says_which(monkeypatch, capsys):
    def missing(name):
        raise ModuleNotFoundError("No module named 'somelib'", name="somelib")

    monkeypatch.setattr(cli, "get_experiment", missing)
    assert "experiment 'block-size' cannot run: No module named 'somelib'" in _exit_2(
        ["experiment", "block-size"], capsys
    )


@pytest.mark.parametrize("name", ["block-size", "swap-vs-recompute"])
def test_run_prints_the_table_and_writes_json_and_png(name, tmp_path, capsys):
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    argv = [
        "experiment",
        name,
        "--scale",
        "small",
        "--no-progress",
        "--json",
        str(out_json),
    ]
    assert main([*argv, "--plot", str(out_png)]) == 0
    out = capsys.readouterr().out
    heading = f"{name}: {EXPERIMENTS[name][1]}\nscale small, seed 0, backend reference, device cpu, ran in "
    assert out.startswith(heading)
    assert (
        "measured:" in out
        and "block_size" in out
        and "the paper:" in out
        and "finding: " in out
    )
    assert f"wrote {out_json}" in out and f"wrote {out_png}" in out
    data = json.loads(out_json.read_text())
    assert (
        set(data) == {"experiment", "rows", "paper", "settings"}
        and data["experiment"] == name
    )
    assert data["settings"] == {
        "scale": "small",
        "seed": 0,
        "backend": "reference",
        "device": "cpu",
    }
    assert data["rows"] and all(
        isinstance(row, dict) and "block_size" in row for row in data["rows"]
    )
    assert data["paper"]["finding"] and data["paper"]["section"] in ("7.2", "7.3")
    assert out_png.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--json", "no/such/dir/out.json"],
            "--json: the folder of 'no/such/dir/out.json' does not exist",
        ),
        (
            ["--plot", "no/such/dir/out.png"],
            "--plot: the folder of 'no/such/dir/out.png' does not exist",
        ),
        (["--scale", "huge"], "argument --scale: invalid choice: 'huge'"),
        (["--seed", "-1"], "seed must be an int >= 0, got -1"),
        (["--seed", "one"], "argument --seed: invalid int value: 'one'"),
        (["--backend", "cuda"], "argument --backend: invalid choice: 'cuda'"),
        (
            ["--device", "gpu"],
            "device must be 'cpu' or 'cuda[:N]' (N a GPU's index), got 'gpu'",
        ),
        (
            ["--device", "cuda:x"],
            "device must be 'cpu' or 'cuda[:N]' (N a GPU's index), got 'cuda:x'",
        ),
    ],
)
def test_bad_options_exit_2_before_running(extra, message, capsys):
    assert message in _exit_2(
        ["experiment", "swap-vs-recompute", "--scale", "small", *extra], capsys
    )


def _recording_experiment(ran: list, *, tensors: bool) -> SimpleNamespace:
    """A stand-in experiment module whose run() records how the CLI called it."""

    def simulation(scale="full", seed=0, progress=True):
        ran.append({"scale": scale, "seed": seed})
        return ExperimentResult("stand-in", [{"block_size": 16}], {"finding": "-"})

    def tensor_run(
        scale="full", seed=0, progress=True, *, backend="reference", device="cpu"
    ):
        ran.append({"scale": scale, "seed": seed, "backend": backend, "device": device})
        settings = {"scale": scale, "seed": seed, "backend": backend, "device": device}
        return ExperimentResult(
            "stand-in", [{"block_size": 16}], {"finding": "-"}, settings
        )

    return SimpleNamespace(run=tensor_run if tensors else simulation)


@pytest.mark.parametrize("name", TENSOR_EXPERIMENTS)
def test_backend_and_device_reach_run_and_the_json(name, monkeypatch, tmp_path, capsys):
    """The values go to run() as given (run checks them: a stand-in run here, so cuda needs no GPU),
    and the JSON's "settings" holds them with the scale and the seed."""
    ran: list[dict] = []
    monkeypatch.setattr(
        cli, "get_experiment", lambda _: _recording_experiment(ran, tensors=True)
    )
    out_json = tmp_path / "out.json"
    argv = [
        "experiment",
        name,
        "--scale",
        "small",
        "--seed",
        "3",
        "--no-progress",
        "--json",
        str(out_json),
    ]
    assert main([*argv, "--backend", "triton", "--device", "cuda:1"]) == 0
    assert ran == [
        {"scale": "small", "seed": 3, "backend": "triton", "device": "cuda:1"}
    ]
    assert (
        "scale small, seed 3, backend triton, device cuda:1, ran in "
        in capsys.readouterr().out
    )
    settings = json.loads(out_json.read_text())["settings"]
    assert settings == {
        "scale": "small",
        "seed": 3,
        "backend": "triton",
        "device": "cuda:1",
    }


def test_without_the_options_run_keeps_its_defaults(monkeypatch):
    ran: list[dict] = []
    monkeypatch.setattr(
        cli, "get_experiment", lambda _: _recording_experiment(ran, tensors=True)
    )
    assert main(["experiment", "block-size", "--scale", "small", "--no-progress"]) == 0
    assert ran == [
        {"scale": "small", "seed": 0, "backend": "reference", "device": "cpu"}
    ]


@pytest.mark.parametrize("name", SIMULATIONS)
def test_a_simulation_runs_without_the_options_and_records_scale_and_seed(
    name, monkeypatch, tmp_path
):
    """The defaults are not passed to a run() that does not take them; the CLI records scale and seed."""
    ran: list[dict] = []
    monkeypatch.setattr(
        cli, "get_experiment", lambda _: _recording_experiment(ran, tensors=False)
    )
    out_json = tmp_path / "out.json"
    assert (
        main(
            [
                "experiment",
                name,
                "--scale",
                "small",
                "--no-progress",
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    assert ran == [{"scale": "small", "seed": 0}]
    assert json.loads(out_json.read_text())["settings"] == {"scale": "small", "seed": 0}


@pytest.mark.parametrize("name", SIMULATIONS)
@pytest.mark.parametrize(
    ("extra", "given"),
    [
        (["--backend", "reference"], "--backend"),
        (["--device", "cpu"], "--device"),
        (["--backend", "triton", "--device", "cuda"], "--backend and --device"),
    ],
)
def test_a_simulation_refuses_backend_and_device(
    name, extra, given, monkeypatch, capsys
):
    """Even the default values are refused when given: they would change nothing, silently."""
    ran: list[dict] = []
    monkeypatch.setattr(
        cli, "get_experiment", lambda _: _recording_experiment(ran, tensors=False)
    )
    err = _exit_2(["experiment", name, "--scale", "small", *extra], capsys)
    assert (
        f"experiment {name!r} runs no tensors (it is a simulation: no model, no kernel)"
        in err
    )
    assert (
        f"so {given} cannot apply to it; `minipaged experiment --list` marks the experiments"
        in err
    )
    assert not ran


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="the refusal is for a machine without a GPU"
)
def test_cuda_without_a_gpu_is_refused(capsys):
    err = _exit_2(
        ["experiment", "swap-vs-recompute", "--scale", "small", "--device", "cuda"],
        capsys,
    )
    assert (
        "device 'cuda' needs a CUDA GPU, and torch sees none here: use device='cpu'"
        in err
    )


def test_a_missing_triton_is_one_line(monkeypatch, capsys):
    """backend triton where triton is not installed: get_backend's ImportError, as a one-line exit."""
    import minipaged.backend

    real_find_spec = importlib.util.find_spec

    def no_triton(name, *args):
        return None if name == "triton" else real_find_spec(name, *args)

    monkeypatch.setattr(minipaged.backend.importlib.util, "find_spec", no_triton)
    err = _exit_2(
        ["experiment", "swap-vs-recompute", "--scale", "small", "--backend", "triton"],
        capsys,
    )
    assert "backend 'triton' needs the triton package, which is not installed" in err


@pytest.mark.parametrize(
    ("name", "found"), [("out.xyz", "the suffix '.xyz'"), ("out", "no suffix")]
)
def test_a_plot_format_matplotlib_cannot_write_is_refused_before_the_run(
    name, found, monkeypatch, tmp_path, capsys
):
    """A typo in --plot's suffix exits 2 at once: the experiment never runs and no JSON is written."""
    ran = []

    class Experiment:
        @staticmethod
        def run(*args):
            ran.append(args)
            raise AssertionError("the experiment must not run")

    monkeypatch.setattr(cli, "get_experiment", lambda name: Experiment)
    out_json = tmp_path / "out.json"
    argv = ["experiment", "swap-vs-recompute", "--no-progress", "--json", str(out_json)]
    err = _exit_2([*argv, "--plot", str(tmp_path / name)], capsys)
    assert "--plot: " in err and found in err and ".png" in err
    assert not ran and not out_json.exists()


def test_the_figure_script_writes_json_and_png(tmp_path, capsys):
    script = (
        Path(__file__).resolve().parents[1] / "scripts" / "make_experiment_figures.py"
    )
    spec = importlib.util.spec_from_file_location("make_experiment_figures", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--scale", "small", "--only", "swap-vs-recompute", "--out", str(tmp_path)]
    assert module.main(argv) == 0
    assert "swap-vs-recompute: ran in" in capsys.readouterr().out
    assert (
        json.loads((tmp_path / "swap-vs-recompute.json").read_text())["experiment"]
        == "swap-vs-recompute"
    )
    assert (tmp_path / "swap-vs-recompute.png").read_bytes()[:8] == PNG_SIGNATURE
