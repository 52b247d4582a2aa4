"""get_backend and the Protocol: names, errors, and that each backend keeps the contract's shape."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from minipaged.backend import (
    BACKENDS,
    KVBackend,
    ReferenceBackend,
    available_backends,
    get_backend,
)


def test_reference_is_always_available():
    assert available_backends()[0] == "reference"
    backend = get_backend("reference")
    assert isinstance(backend, ReferenceBackend) and backend.name == "reference"


@pytest.mark.parametrize("name", available_backends())
def test_every_available_backend_satisfies_the_protocol(name):
    backend = get_backend(name)
    assert isinstance(backend, KVBackend)
    assert backend.name == name
    for op in ("write_kv", "paged_attention", "copy_blocks", "swap_blocks"):
        assert callable(getattr(backend, op)), op


def test_a_missing_op_breaks_the_protocol():
    class Partial:
        name = "partial"

        def write_kv(self, *args):
            pass

    assert not isinstance(Partial(), KVBackend)


@pytest.mark.parametrize("name", ["Reference", "cuda", "", "flash"])
def test_unknown_name_lists_the_backends(name):
    with pytest.raises(
        ValueError,
        match=r"backend must be one of 'reference', 'triton'; got " + repr(name),
    ):
        get_backend(name)


def test_backends_lists_what_get_backend_accepts():
    assert BACKENDS == ("reference", "triton")


def test_triton_without_triton_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "triton" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(
        ImportError,
        match=r"needs the triton package.*pip install 'minipaged\[triton\]'",
    ):
        get_backend("triton")
    assert available_backends() == ["reference"]


needs_triton_on_cpu = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or torch.cuda.is_available(),
    reason="checks how minipaged switches Triton to its interpreter: needs triton and no CUDA device",
)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run(
        [sys.executable, "-c", code],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


@needs_triton_on_cpu
def test_importing_minipaged_switches_triton_to_its_interpreter_without_a_gpu():
    result = run_python(
        "import os, minipaged; print(os.environ.get('TRITON_INTERPRET'))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


@needs_triton_on_cpu
def test_triton_imported_first_without_the_interpreter_says_what_to_set():
    result = run_python("import triton, minipaged; minipaged.get_backend('triton')")
    assert result.returncode != 0
    assert "set TRITON_INTERPRET=1" in result.stderr


@needs_triton_on_cpu
def test_an_explicit_choice_is_left_alone():
    result = run_python(
        "import os, minipaged; print(os.environ.get('TRITON_INTERPRET'))",
        TRITON_INTERPRET="0",
    )
    assert result.stdout.strip() == "0"


# ---- where a backend's tests put their tensors (minipaged.testing.device_for) -------------------------


@pytest.mark.parametrize(
    "gpu, interpret, expected",
    [
        # a GPU machine: import minipaged leaves the interpreter off
        (True, None, "cuda"),
        (True, "0", "cuda"),
        # a GPU machine with the interpreter asked for: CPU tensors run
        (True, "1", "cpu"),
        (False, "1", "cpu"),  # no GPU: import minipaged switched the interpreter on
    ],
)
def test_device_for_puts_triton_on_cuda_where_it_compiles(
    monkeypatch, gpu, interpret, expected
):
    """Simulates a GPU machine on any machine: torch.cuda.is_available is what device_for consults."""
    from minipaged.testing import device_for, interpreted

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert device_for("triton") == torch.device(expected)
    assert interpreted("triton") == (expected == "cpu")
    assert device_for("reference") == torch.device("cpu") and not interpreted(
        "reference"
    )
