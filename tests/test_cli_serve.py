"""`minipaged serve`: its options reach the engine and the server, a bad option or a busy port is one
line before the model loads, and the real command answers an OpenAI client and stops on Ctrl-C."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import pytest

from minipaged import LLM, SamplingParams, cli
from minipaged.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def rng() -> random.Random:
    # fresh inputs every run
    return random.Random(int.from_bytes(os.urandom(8), "little"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def served(monkeypatch) -> list[tuple[object, dict]]:
    """A stand-in for minipaged.serving: serve() records what it was given and returns at once."""
    calls: list[tuple[object, dict]] = []
    module = types.SimpleNamespace(
        serve=lambda llm, **options: calls.append((llm, options))
    )
    monkeypatch.setitem(sys.modules, "minipaged.serving", module)
    return calls


def test_serve_help_names_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in [
        "--model",
        "--host",
        "--port",
        "--served-model-name",
        "--max-queued-requests",
    ]:
        assert option in out, option
    for option in [
        "--num-gpu-blocks",
        "--preemption-mode",
        "--device",
        "--dtype",
        "--max-num-seqs",
    ]:
        assert option in out, option


def test_serve_builds_the_engine_of_its_options_and_serves_it(served, rng):
    port, block_size = _free_port(), rng.choice([4, 8, 16])
    gpu, cpu, seqs = rng.randrange(32, 200), rng.randrange(8, 100), rng.randrange(1, 64)
    name, queued = f"model-{rng.randrange(10**6)}", rng.randrange(1, 5000)
    argv = [
        "serve",
        "--port",
        str(port),
        "--block-size",
        str(block_size),
        "--num-gpu-blocks",
        str(gpu),
    ]
    argv += [
        "--num-cpu-blocks",
        str(cpu),
        "--max-num-seqs",
        str(seqs),
        "--preemption-mode",
        "swap",
    ]
    argv += [
        "--enable-prefix-caching",
        "--served-model-name",
        name,
        "--max-queued-requests",
        str(queued),
    ]
    assert main(argv) == 0
    ((llm, options),) = served
    assert options == {
        "host": "127.0.0.1",
        "port": port,
        "served_model_name": name,
        "max_queued_requests": queued,
    }
    cache = llm.cache_config
    assert (cache.block_size, cache.num_gpu_blocks, cache.num_cpu_blocks) == (
        block_size,
        gpu,
        cpu,
    )
    assert (
        cache.enable_prefix_caching and llm.scheduler_config.preemption_mode == "swap"
    )
    assert llm.scheduler_config.max_num_seqs == seqs
    assert llm.max_step_stats == 1000, "a server keeps only recent step stats"


def test_serve_names_the_model_as_given_by_default(served):
    assert (
        main(
            [
                "serve",
                "--port",
                str(_free_port()),
                "--model",
                "tiny-qwen2",
                "--num-gpu-blocks",
                "32",
            ]
        )
        == 0
    )
    ((_, options),) = served
    assert (
        options["served_model_name"] == "tiny-qwen2"
        and "max_queued_requests" not in options
    )


def test_a_busy_port_is_one_line_before_the_model_loads(monkeypatch, served, capsys):
    loaded = []
    monkeypatch.setattr(cli, "LLM", lambda *args, **kwargs: loaded.append(args))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", "--port", str(port)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"minipaged serve: error: --port {port} is in use (on --host 127.0.0.1)"
    ]
    assert not loaded and not served


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--max-queued-requests", "0"],
            "--max-queued-requests must be an int >= 1, got 0",
        ),
        (
            ["--host", "no-such-host.invalid"],
            "--host 'no-such-host.invalid' is not an address",
        ),
        (["--num-gpu-blocks", "0"], "num_gpu_blocks"),
    ],
)
def test_serve_refuses_bad_values_with_one_line(options, message, served, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", str(_free_port()), *options])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("minipaged serve: error: ") and message in line
    assert not served


@pytest.mark.parametrize("port", ["0", "65536", "http"])
def test_serve_refuses_a_malformed_port_with_the_usage(port, served, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", port])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: minipaged serve" in err and "argument --port" in err and not served


def test_a_value_the_server_refuses_is_one_line(monkeypatch, capsys):
    def serve(llm, **options):
        raise ValueError("served_model_name must not be empty")

    monkeypatch.setitem(
        sys.modules, "minipaged.serving", types.SimpleNamespace(serve=serve)
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", str(_free_port()), "--num-gpu-blocks", "32"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "minipaged serve: error: served_model_name must not be empty"
    ]


def _wait_for_health(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"the server exited with {process.returncode}: {process.stderr.read()}"
            )
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet
            time.sleep(0.2)
    pytest.fail(f"no /health from {url} in {timeout} s")


def test_the_serve_command_answers_an_openai_client_and_stops_on_ctrl_c(rng):
    import openai  # a dev dependency (pyproject.toml): the official client

    port, name = _free_port(), f"served-{rng.randrange(10**6)}"
    prompt, max_tokens = (
        "".join(rng.choices("abcdefghij klmnop", k=rng.randrange(3, 20))),
        rng.randrange(2, 8),
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
        ),
    }
    argv = [
        sys.executable,
        "-m",
        "minipaged",
        "serve",
        "--port",
        str(port),
        "--num-gpu-blocks",
        "64",
    ]
    server = subprocess.Popen(
        [*argv, "--served-model-name", name],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for_health(url, server, timeout=120)
        client = openai.OpenAI(
            base_url=url + "/v1", api_key="none", max_retries=0, timeout=60
        )
        completion = client.completions.create(
            model=name, prompt=prompt, max_tokens=max_tokens, temperature=0
        )
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            _, stderr = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            _, stderr = server.communicate()
            pytest.fail(f"the server did not stop on Ctrl-C: {stderr}")
    (expected,) = LLM("tiny-llama", num_gpu_blocks=64).generate(
        prompt, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False
    )
    assert completion.model == name
    assert completion.choices[0].text == expected.outputs[0].text, (
        "the server runs the same engine"
    )
    assert completion.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert completion.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert server.returncode == 0, stderr
    assert "Traceback" not in stderr and "Application shutdown complete" in stderr
