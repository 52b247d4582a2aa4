"""The command line's user errors: a value the engine refuses, a model folder that cannot load, an
output path that cannot be written, Ctrl-C. Each ends with status 2 (130 for Ctrl-C) and one line on
stderr, never a traceback; an output path is checked before the experiment runs; a genuine bug still
shows its traceback."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import string
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from minipaged import cli
from minipaged.cli import main
from minipaged.experiments import ExperimentResult

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def rng() -> random.Random:
    # fresh inputs every run
    return random.Random(int.from_bytes(os.urandom(8), "little"))


def _one_line_exit(argv: list[str], capsys, status: int = 2) -> str:
    """Run `minipaged ARGV`, expect SystemExit(status) and one line on stderr; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == status
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"minipaged {argv[0]}: error: "), lines[0]
    return lines[0]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def no_server(monkeypatch):
    """`minipaged serve` must stop before serving: a serving module whose serve() fails the test."""

    def serve(*args, **kwargs):
        raise AssertionError("serve() must not be reached with a bad option")

    monkeypatch.setitem(
        sys.modules, "minipaged.serving", types.SimpleNamespace(serve=serve)
    )


def _random_word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=6))


# ---- values the engine refuses: generate and serve alike --------------------------------------


def _bad_engine_options(
    rng: random.Random, tmp_path: Path
) -> list[tuple[list[str], str]]:
    """(options, what the line must name): each a value LLM refuses with a ValueError/TypeError."""
    garbage = tmp_path / "garbage"  # config.json that is not JSON
    garbage.mkdir()
    (garbage / "config.json").write_text("{" + _random_word(rng) + ": [")
    nonsense = tmp_path / "nonsense"  # valid JSON, no such architecture
    nonsense.mkdir()
    (nonsense / "config.json").write_text(
        json.dumps({"model_type": "nope-" + _random_word(rng)})
    )
    no_config = tmp_path / "no_config"  # a folder without a checkpoint
    no_config.mkdir()
    huge = 10**9 + rng.randrange(10**6)
    return [
        # no such GPU, here or anywhere
        (["--device", f"cuda:{torch.cuda.device_count()}"], "device"),
        (["--device", "cpu" + _random_word(rng)], "device"),
        (["--model", str(garbage)], str(garbage)),
        (["--model", str(nonsense)], str(nonsense)),
        (["--model", str(no_config)], str(no_config)),
        (["--model", str(tmp_path / "missing")], "model"),
        (["--num-gpu-blocks", str(huge)], "num_gpu_blocks"),
        (["--num-gpu-blocks", "64", "--num-cpu-blocks", str(huge)], "num_cpu_blocks"),
        (["--block-size", str(-rng.randrange(1, 9))], "block_size"),
        (["--max-num-seqs", "0"], "max_num_seqs"),
        (["--max-model-len", str(10**7 + rng.randrange(1000))], "max_model_len"),
    ]


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_values_the_engine_refuses_exit_2_with_one_line(
    command, rng, tmp_path, capsys, no_server
):
    head = (
        ["generate", "Paging is", "--max-tokens", "2"]
        if command == "generate"
        else ["serve"]
    )
    port = ["--port", str(_free_port())] if command == "serve" else []
    for options, named in _bad_engine_options(rng, tmp_path):
        line = _one_line_exit([*head, *port, *options], capsys)
        assert named in line, (options, line)


def test_a_temperature_below_the_floor_exits_2_with_one_line(rng, capsys):
    # > 0 and < 0.01: the scaled logits would overflow
    temperature = 10 ** -rng.uniform(2.5, 300)
    line = _one_line_exit(["generate", "x", "--temperature", repr(temperature)], capsys)
    assert "temperature" in line and repr(temperature) in line


def test_a_prompt_that_never_fits_exits_2_with_one_line(rng, capsys):
    prompt = "".join(rng.choices(string.ascii_letters, k=rng.randrange(40, 80)))
    line = _one_line_exit(
        ["generate", prompt, "--block-size", "4", "--num-gpu-blocks", "2"], capsys
    )
    assert "can never fit" in line


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "LLM", interrupted)
    assert main(["generate", "x"]) == 130
    assert capsys.readouterr().err.splitlines() == ["minipaged generate: interrupted"]


def test_a_genuine_bug_is_not_hidden(monkeypatch):
    """Only user errors become one line: anything else keeps its traceback for the bug report."""
    message = "a bug " + str(random.random())

    def buggy(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(cli, "LLM", buggy)
    with pytest.raises(RuntimeError, match=message):
        main(["generate", "x"])


def test_python_dash_m_prints_one_line_for_a_bad_model_folder(rng, tmp_path):
    """The real process: status 2, stderr is one line, no traceback (nothing caught by pytest)."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text("not json " + _random_word(rng))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
        ),
    }
    result = subprocess.run(
        [sys.executable, "-m", "minipaged", "generate", "x", "--model", str(folder)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("minipaged generate: error: ") and str(folder) in line


# ---- experiment: output paths are checked before the run ----------------------------------------


class FakeExperiment:
    """Stands in for an experiment module: records that it ran, returns random rows."""

    def __init__(self, during_run=None) -> None:
        self.ran = False
        self.during_run = during_run

    def run(self, scale, seed, progress):
        self.ran = True
        if self.during_run is not None:
            self.during_run()
        return ExperimentResult(
            "memory-waste", [{"x": random.random()}], {"figure": "2"}
        )

    def plot(self, result, path):
        Path(path).write_bytes(b"picture")


@pytest.fixture
def experiment(monkeypatch) -> FakeExperiment:
    fake = FakeExperiment()
    monkeypatch.setattr(cli, "get_experiment", lambda name: fake)
    return fake


def _unwritable_paths(tmp_path: Path, suffix: str) -> list[tuple[str, str]]:
    """(path, what the line says): a folder, a path under a regular file, a missing folder."""
    regular = tmp_path / "somefile.txt"
    regular.write_text("a file, not a folder")
    return [
        (str(tmp_path), "is a folder"),
        # as root too: no permission bit involved
        (str(regular / f"out{suffix}"), "cannot write"),
        (str(tmp_path / "missing" / f"out{suffix}"), "does not exist"),
    ]


@pytest.mark.parametrize(
    ("option", "suffix"), [("--json", ".json"), ("--plot", ".png")]
)
def test_an_unwritable_output_path_is_refused_before_the_run(
    option, suffix, experiment, tmp_path, capsys
):
    for path, says in _unwritable_paths(tmp_path, suffix):
        line = _one_line_exit(
            ["experiment", "memory-waste", "--no-progress", option, path], capsys
        )
        assert f"{option}: " in line and says in line and repr(path) in line, line
        assert not experiment.ran, f"{option} {path} was found only after the run"


def test_the_path_check_leaves_nothing_behind_and_keeps_an_existing_file(
    experiment, tmp_path, capsys
):
    """The check creates and removes a new file; an existing one keeps its content until rewritten."""
    existing, fresh = tmp_path / "old.json", tmp_path / "new.png"
    old = json.dumps({"kept": random.random()})
    existing.write_text(old)
    argv = [
        "experiment",
        "memory-waste",
        "--no-progress",
        "--json",
        str(existing),
        "--plot",
        str(fresh),
    ]
    seen_during_run = []
    experiment.during_run = lambda: seen_during_run.append(
        (existing.read_text(), fresh.exists())
    )
    assert main(argv) == 0
    assert seen_during_run == [(old, False)], "the check changed the files"
    assert experiment.ran
    assert json.loads(existing.read_text())["experiment"] == "memory-waste"
    assert fresh.read_bytes() == b"picture"
    out = capsys.readouterr().out
    assert f"wrote {existing}" in out and f"wrote {fresh}" in out


def test_a_folder_gone_during_the_run_is_one_line(experiment, tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    experiment.during_run = lambda: shutil.rmtree(folder)
    argv = [
        "experiment",
        "memory-waste",
        "--no-progress",
        "--json",
        str(folder / "x.json"),
    ]
    line = _one_line_exit(argv, capsys)
    assert experiment.ran and "--json: cannot write" in line


def test_ctrl_c_during_an_experiment_exits_130(experiment, capsys):
    def interrupt():
        raise KeyboardInterrupt

    experiment.during_run = interrupt
    assert main(["experiment", "memory-waste", "--no-progress"]) == 130
    assert capsys.readouterr().err.splitlines() == ["minipaged experiment: interrupted"]
