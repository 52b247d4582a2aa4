"""The paper's memory experiments, each runnable from the CLI: `minipaged experiment NAME`.

Each experiment is a module of this package with two functions:

- `run(scale="full", seed=0, progress=True) -> ExperimentResult`: runs it. `scale="small"` is a
  seconds-long version with the same rows and keys, for the tests and a first look.
- `plot(result, path)`: draws its figure with matplotlib and saves it to `path`.

The result is plain data, written as JSON by `minipaged experiment NAME --json out.json`:
`{"experiment": name, "rows": [ {...}, ... ], "paper": {...}}`, where each row is one measured point
(its keys documented on the experiment's docs page) and "paper" holds the figures the paper reports
for the same experiment, so the two can be printed side by side.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# name -> (module, one-line title); the order is the paper's order and `minipaged experiment --list`'s
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "memory-waste": ("memory_waste", "KV memory split into token states and waste per allocator (Fig. 2)"),
    "batch-size": ("batch_size", "batch size and requests served per allocator under one budget"),
    "sharing": ("sharing", "memory saved by sharing: parallel sampling and beam search (Fig. 15)"),
    "shared-prefix": ("shared_prefix", "blocks and prefill tokens saved by prefix caching (Fig. 16)"),
    "block-size": ("block_size", "block size 1 to 256: waste, capacity and time per step (Fig. 18b)"),
    "swap-vs-recompute": ("swap_vs_recompute", "restoring a preempted sequence: swap vs recompute (Fig. 19)"),
}


@dataclass
class ExperimentResult:
    """What an experiment measured (`rows`) beside what the paper reports (`paper`)."""

    experiment: str  # its name in EXPERIMENTS
    rows: list[dict[str, Any]]  # one dict per measured point, plain JSON values
    paper: dict[str, Any] = field(default_factory=dict)  # the paper's figures for the same thing

    def to_json(self) -> dict[str, Any]:
        """The documented JSON form: {"experiment", "rows", "paper"}."""
        return {"experiment": self.experiment, "rows": self.rows, "paper": self.paper}

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def check_run_args(scale: str, seed: int, scales: dict) -> None:
    """The checks every experiment's run() makes on its arguments.

    Raises:
        ValueError: for a scale not in `scales`, or a seed that is not an int >= 0.
    """
    if scale not in scales:
        raise ValueError(f"scale must be 'small' or 'full', got {scale!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


def get_experiment(name: str):
    """The module of experiment `name` (it has `run` and `plot`).

    Raises:
        ValueError: for a name not in EXPERIMENTS, listing the known ones.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"experiment: expected one of {', '.join(EXPERIMENTS)}, got {name!r}")
    return importlib.import_module(f"minipaged.experiments.{EXPERIMENTS[name][0]}")


__all__ = ["EXPERIMENTS", "ExperimentResult", "check_run_args", "get_experiment"]
