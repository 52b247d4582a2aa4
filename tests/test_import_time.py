"""Start-up loads only what it uses: `import minipaged` and `minipaged --help` import no transformers.

Each check runs in a fresh Python process, since this one has long imported everything. Times are never
asserted (they depend on the machine): the set of heavy modules in sys.modules is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import minipaged
from minipaged._triton_env import GPU_DEVICE_FILES, no_gpu_device_file

ROOT = Path(__file__).resolve().parents[1]
NEVER_AT_START = ("transformers", "triton", "matplotlib", "fastapi", "uvicorn")


def modules_after(code: str, **env: str) -> dict:
    """Run `code` in a fresh interpreter; return the heavy modules it left loaded and TRITON_INTERPRET."""
    probe = (
        "import json, os, sys\n"
        # --help and --version exit
        f"try:\n    exec({code!r})\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', *"
        + repr(NEVER_AT_START)
        + ") if m in sys.modules]\n"
        "print('RESULT=' + json.dumps({'heavy': heavy, 'interpret': os.environ.get('TRITON_INTERPRET')}))"
    )
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    (line,) = [
        line for line in result.stdout.splitlines() if line.startswith("RESULT=")
    ]
    return json.loads(line.removeprefix("RESULT="))


@pytest.mark.parametrize(
    "code",
    [
        "import minipaged",
        "from minipaged.cli import main; main(['--help'])",
        "from minipaged.cli import main; main(['--version'])",
        "from minipaged.cli import main; main(['experiment', '--help'])",
        "import minipaged.cli",
    ],
)
def test_start_up_imports_no_heavy_module(code):
    heavy = modules_after(code)["heavy"]
    assert not set(heavy) & set(NEVER_AT_START), heavy
    # torch is asked about a CUDA device only where a GPU device file exists
    if no_gpu_device_file():
        assert "torch" not in heavy


def test_the_demo_help_shows_the_demo_config_defaults_without_transformers(capsys):
    from minipaged.cli import main
    from minipaged.demo import DemoConfig

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    config = DemoConfig()
    assert f"tokens per KV block (default: {config.block_size})" in text
    assert f"device pool (default: {config.num_gpu_blocks}, small enough" in text
    assert f"swap pool (default: {config.num_cpu_blocks})" in text
    demo_help = modules_after(
        "from minipaged.cli import main; main(['demo', '--help'])"
    )
    assert "transformers" not in demo_help["heavy"]


def test_the_engine_imports_transformers_only_to_load_a_model():
    loaded = modules_after("from minipaged import LLM, SamplingParams")["heavy"]
    assert "torch" in loaded and "transformers" not in loaded
    code = (
        "from minipaged import LLM, SamplingParams\n"
        "llm = LLM('tiny-llama', block_size=4, num_gpu_blocks=8)\n"
        "params = SamplingParams(max_tokens=2)\n"
        "(out,) = llm.generate({'prompt_token_ids': [1, 5, 9]}, params, use_tqdm=False)\n"
        "assert len(out.outputs[0].token_ids) == 2"
    )
    assert "transformers" in modules_after(code)["heavy"]


needs_triton_on_cpu = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not no_gpu_device_file(),
    reason="checks the Triton interpreter switch: needs triton and a machine without a GPU device file",
)


@needs_triton_on_cpu
def test_transformers_imported_after_minipaged_finds_triton_in_interpreter_mode():
    code = (
        "import minipaged, transformers\n"
        "from transformers import LlamaForCausalLM\n"  # this import brings triton in
        "import triton.runtime.interpreter, sys\n"
        "assert 'triton' in sys.modules"
    )
    assert modules_after(code)["interpret"] == "1"


def test_no_gpu_device_file_looks_for_each_driver(monkeypatch):
    import glob

    for pattern in GPU_DEVICE_FILES:
        monkeypatch.setattr(
            glob, "glob", lambda p, pattern=pattern: [p] if p == pattern else []
        )
        monkeypatch.setattr(sys, "platform", "linux")
        assert not no_gpu_device_file(), pattern
    monkeypatch.setattr(glob, "glob", lambda p: [])
    assert no_gpu_device_file()
    monkeypatch.setattr(sys, "platform", "darwin")  # off Linux, torch is asked
    assert not no_gpu_device_file()


def test_every_public_name_resolves_lazily():
    assert set(minipaged.__all__) == {*minipaged._EXPORTS, "__version__"}
    for name in minipaged.__all__:
        assert getattr(minipaged, name) is not None, name
        assert name in dir(minipaged)
    from minipaged.engine import LLM

    assert minipaged.LLM is LLM
    # a submodule loads on first use too
    assert minipaged.walkthrough.__name__ == "minipaged.walkthrough"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(
        AttributeError, match="module 'minipaged' has no attribute 'no_such_name'"
    ):
        _ = minipaged.no_such_name
    assert not hasattr(minipaged, "no_such_name")


def test_the_import_time_benchmark_reports_each_case_and_its_modules(tmp_path):
    path = tmp_path / "report.json"
    cases = ["import minipaged", "minipaged --version"]
    script = "benchmarks/import_time.py"
    result = subprocess.run(
        [
            sys.executable,
            script,
            "--repeats",
            "1",
            "--json",
            str(path),
            "--cases",
            *cases,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(path.read_text())
    assert report["benchmark"] == "import_time" and report["repeats"] == 1
    assert [row["case"] for row in report["rows"]] == cases
    for row in report["rows"]:
        assert 0 < row["min_s"] <= row["median_s"] <= row["max_s"]
        assert not set(row["heavy_modules"]) & set(NEVER_AT_START), row
        assert f"| `{row['case']}` |" in result.stdout
