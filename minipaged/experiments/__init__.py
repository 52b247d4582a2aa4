"""The paper's memory experiments, each runnable from the CLI: `minipaged experiment NAME`.

Each experiment is a module of this package with two functions:

- `run(scale="full", seed=0, progress=True) -> ExperimentResult`: runs it. `scale="small"` is a
  seconds-long version with the same rows and keys, for the tests and a first look.
- `plot(result, path)`: draws its figure with matplotlib and saves it to `path`.

An experiment that runs tensors (a model, the kernels, the KV pools) also takes the keyword arguments
`backend: str = "reference"` and `device: str = "cpu"` in its run(), checks them first with
`check_tensor_args`, and passes them to all of its tensor work: `LLM(..., backend=backend,
device=device)` for the engine, `get_backend(backend)` for a kernel called directly, tensors made on
`device`. Those two parameters are how it opts in: `runs_tensors(module)` reads them from run()'s
signature, so the CLI offers `--backend` and `--device` to exactly these experiments and refuses them,
with a message, for the others (the simulations, whose numbers no backend or device can change).

The result is plain data, written as JSON by `minipaged experiment NAME --json out.json`:
`{"experiment": name, "rows": [ {...}, ... ], "paper": {...}, "settings": {...}}`, where each row is
one measured point (its keys documented on the experiment's docs page), "paper" holds the figures the
paper reports for the same experiment, so the two can be printed side by side, and "settings" says how
the run was made: its scale and seed, and the backend and device of an experiment that runs tensors.
JSON written before "settings" existed has none; readers take it as empty.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# name -> (module, one-line title); the order is the paper's order and `minipaged experiment --list`'s
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "memory-waste": (
        "memory_waste",
        "KV memory split into token states and waste per allocator (Fig. 2)",
    ),
    "serving": (
        "serving_latency",
        "normalized latency against request rate, vLLM vs Orca (Fig. 12)",
    ),
    "decoding": (
        "decoding",
        "parallel sampling and beam search: latency against rate (Fig. 14)",
    ),
    "batch-size": (
        "batch_size",
        "batch size and requests served per allocator under one budget",
    ),
    "sharing": (
        "sharing",
        "memory saved by sharing: parallel sampling and beam search (Fig. 15)",
    ),
    "shared-prefix": (
        "shared_prefix",
        "blocks and prefill tokens saved by prefix caching (Fig. 16)",
    ),
    "block-size": (
        "block_size",
        "block size 1 to 256: waste, capacity and time per step (Fig. 18b)",
    ),
    "swap-vs-recompute": (
        "swap_vs_recompute",
        "restoring a preempted sequence: swap vs recompute (Fig. 19)",
    ),
    "chunked-prefill": (
        "chunked_prefill",
        "time to first token and per output token against the chunk budget",
    ),
}
# the devices an experiment accepts: "cpu", "cuda", "cuda:N"
DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass
class ExperimentResult:
    """What an experiment measured (`rows`) beside what the paper reports (`paper`), and how it ran."""

    experiment: str  # its name in EXPERIMENTS
    rows: list[dict[str, Any]]  # one dict per measured point, plain JSON values
    # the paper's figures for the same thing
    paper: dict[str, Any] = field(default_factory=dict)
    # scale, seed; backend, device if it has them
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The documented JSON form: {"experiment", "rows", "paper", "settings"}."""
        return {
            "experiment": self.experiment,
            "rows": self.rows,
            "paper": self.paper,
            "settings": self.settings,
        }

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExperimentResult:
        """The result that `to_json` wrote; JSON older than "settings" gives empty settings."""
        return cls(
            data["experiment"],
            data["rows"],
            data.get("paper", {}),
            data.get("settings", {}),
        )


def check_run_args(scale: str, seed: int, scales: dict) -> None:
    """The checks every experiment's run() makes on its arguments.

    Raises:
        ValueError: for a scale not in `scales`, or a seed that is not an int >= 0.
    """
    if scale not in scales:
        raise ValueError(f"scale must be 'small' or 'full', got {scale!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


def check_tensor_args(backend: str, device: str) -> None:
    """The checks an experiment that runs tensors makes on `backend` and `device`, before any work.

    Args:
        backend: "reference" or "triton" (minipaged.backend.get_backend).
        device: "cpu", "cuda" or "cuda:N". The Triton backend runs on "cpu" only through Triton's
            interpreter, which `import minipaged` switches on where there is no GPU.

    Raises:
        ValueError: naming the argument: an unknown backend (get_backend's message), a device that is
            not "cpu" or "cuda[:N]", a CUDA device that torch cannot see, or backend "triton" on the
            CPU with the interpreter off (the engine's message).
        ImportError: for backend "triton" when the triton package is not installed.
    """
    from minipaged.backend import get_backend
    from minipaged.engine import _check_backend_device

    get_backend(backend)  # ValueError naming `backend` for an unknown name
    if not isinstance(device, str) or DEVICE.fullmatch(device) is None:
        raise ValueError(
            f"device must be 'cpu' or 'cuda[:N]' (N a GPU's index), got {device!r}"
        )
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device {device!r} needs a CUDA GPU, and torch sees none here: use device='cpu'"
            )
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise ValueError(
                f"device {device!r}: torch sees {count} GPU(s), cuda:0 to cuda:{count - 1}"
            )
    _check_backend_device(backend, device)  # triton on the CPU needs the interpreter


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread for the block, then back to what it was.

    The simulations' tensors are tiny (the null policy's logits are a few numbers per sequence), and
    on a busy machine a second OpenMP thread turns each tiny op from about 2 us into 10-500 us; the
    measured runs want one thread for every system alike, as the benchmarks do.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def runs_tensors(module) -> bool:
    """Does experiment `module` run tensors, so that it takes a backend and a device?

    True when its run() has the parameters `backend` and `device` (the convention above): the signature
    is the declaration, so this answer cannot drift from what run() accepts.
    """
    try:
        parameters = inspect.signature(module.run).parameters
    # no run, or one that inspect cannot read
    except (AttributeError, TypeError, ValueError):
        return False
    return "backend" in parameters and "device" in parameters


def synchronize(device: str) -> None:
    """Wait for the work queued on `device`, so that a wall time covers it (CUDA runs asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def get_experiment(name: str):
    """The module of experiment `name` (it has `run` and `plot`).

    Raises:
        ValueError: for a name not in EXPERIMENTS, listing the known ones.
    """
    if name not in EXPERIMENTS:
        raise ValueError(
            f"experiment: expected one of {', '.join(EXPERIMENTS)}, got {name!r}"
        )
    return importlib.import_module(f"minipaged.experiments.{EXPERIMENTS[name][0]}")


__all__ = [
    "EXPERIMENTS",
    "ExperimentResult",
    "check_run_args",
    "check_tensor_args",
    "get_experiment",
    "one_thread",
    "runs_tensors",
    "synchronize",
]
