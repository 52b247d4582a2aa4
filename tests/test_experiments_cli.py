"""`minipaged experiment`: --list, running an experiment (table, JSON, plot) and every refusal, which
exits with status 2 and a one-line reason, never a traceback.

Only block-size and swap-vs-recompute are run (their small scale); the tests do not depend on the
other experiments' modules existing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from minipaged import cli
from minipaged.cli import main
from minipaged.experiments import EXPERIMENTS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _exit_2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: minipaged experiment" in err and "Traceback" not in err
    return err


def test_list_names_every_experiment(capsys):
    assert main(["experiment", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(EXPERIMENTS)
    for line, (name, (_, title)) in zip(lines, EXPERIMENTS.items(), strict=True):
        assert line.startswith(name) and title in line
    assert not any("not written yet" in line for line in lines if line.startswith(("block-size", "swap-")))


def test_unknown_name_names_the_known_ones(capsys):
    err = _exit_2(["experiment", "no-such-experiment"], capsys)
    assert "unknown experiment 'no-such-experiment'" in err
    assert all(name in err for name in EXPERIMENTS)


def test_no_name_asks_for_one(capsys):
    assert "give an experiment NAME, or --list" in _exit_2(["experiment"], capsys)


def test_an_experiment_not_written_yet_says_so(monkeypatch, capsys):
    monkeypatch.setitem(EXPERIMENTS, "ghost", ("no_such_module_for_tests", "an experiment still to write"))
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
    argv = ["experiment", name, "--scale", "small", "--no-progress", "--json", str(out_json)]
    assert main([*argv, "--plot", str(out_png)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{name}: {EXPERIMENTS[name][1]}\nscale small, seed 0, ran in ")
    assert "measured:" in out and "block_size" in out and "the paper:" in out and "finding: " in out
    assert f"wrote {out_json}" in out and f"wrote {out_png}" in out
    data = json.loads(out_json.read_text())
    assert set(data) == {"experiment", "rows", "paper"} and data["experiment"] == name
    assert data["rows"] and all(isinstance(row, dict) and "block_size" in row for row in data["rows"])
    assert data["paper"]["finding"] and data["paper"]["section"] in ("7.2", "7.3")
    assert out_png.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--json", "no/such/dir/out.json"], "--json: the folder of 'no/such/dir/out.json' does not exist"),
        (["--plot", "no/such/dir/out.png"], "--plot: the folder of 'no/such/dir/out.png' does not exist"),
        (["--scale", "huge"], "argument --scale: invalid choice: 'huge'"),
        (["--seed", "-1"], "seed must be an int >= 0, got -1"),
        (["--seed", "one"], "argument --seed: invalid int value: 'one'"),
    ],
)
def test_bad_options_exit_2_before_running(extra, message, capsys):
    assert message in _exit_2(["experiment", "swap-vs-recompute", "--scale", "small", *extra], capsys)


@pytest.mark.parametrize(("name", "found"), [("out.xyz", "the suffix '.xyz'"), ("out", "no suffix")])
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
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_experiment_figures.py"
    spec = importlib.util.spec_from_file_location("make_experiment_figures", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--scale", "small", "--only", "swap-vs-recompute", "--out", str(tmp_path)]
    assert module.main(argv) == 0
    assert "swap-vs-recompute: ran in" in capsys.readouterr().out
    assert json.loads((tmp_path / "swap-vs-recompute.json").read_text())["experiment"] == "swap-vs-recompute"
    assert (tmp_path / "swap-vs-recompute.png").read_bytes()[:8] == PNG_SIGNATURE
