"""Regenerate the experiments' figures and data for the docs: docs/experiments/img/NAME.png and NAME.json.

    PYTHONPATH=. python scripts/make_experiment_figures.py              # every experiment, scale full
    PYTHONPATH=. python scripts/make_experiment_figures.py --only block-size swap-vs-recompute
    PYTHONPATH=. python scripts/make_experiment_figures.py --only serving          # Fig. 12, a few minutes
    PYTHONPATH=. python scripts/make_experiment_figures.py --pages-only  # re-render the pages, run nothing

Each experiment of minipaged.experiments.EXPERIMENTS runs once (`run(scale, seed)`), its rows are written
as `NAME.json` ({"experiment", "rows", "paper"}, as `minipaged experiment NAME --json` writes them) and its
figure as `NAME.png`; then the generated tables and numbers of its docs page are rewritten from that JSON
(minipaged.experiments.pages; only when writing to docs/experiments/img). An experiment whose module is
not written yet is skipped with a note. The header names the machine, torch and the date, for the docs
pages to quote: the times are this machine's.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from minipaged.experiments import EXPERIMENTS, get_experiment
from minipaged.experiments.pages import sync_pages

OUT = Path(__file__).resolve().parents[1] / "docs" / "experiments" / "img"


def machine() -> str:
    """The CPU model (from /proc/cpuinfo where there is one), the CPU count and torch's version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                line.split(":", 1)[1].strip()
                for line in f
                if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="these experiments only (default: all)",
    )
    parser.add_argument(
        "--scale", choices=["small", "full"], default="full", help="default: full"
    )
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    parser.add_argument(
        "--out",
        type=Path,
        default=OUT,
        help="the folder to write (default: docs/experiments/img)",
    )
    parser.add_argument(
        "--pages-only",
        action="store_true",
        help="run nothing: rewrite the docs pages' generated parts from the JSON in docs/experiments/img",
    )
    args = parser.parse_args(argv)
    names = args.only or list(EXPERIMENTS)
    unknown = [name for name in names if name not in EXPERIMENTS]
    if unknown:
        parser.error(
            f"unknown experiment(s) {', '.join(unknown)}; expected some of {', '.join(EXPERIMENTS)}"
        )
    if args.pages_only:
        for page in sync_pages(names):
            print(f"rewrote {page}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    today = datetime.date.today().isoformat()
    print(f"{machine()}; {today}; scale {args.scale}, seed {args.seed}")
    for name in names:
        if (
            importlib.util.find_spec(f"minipaged.experiments.{EXPERIMENTS[name][0]}")
            is None
        ):
            print(f"{name}: skipped, its module is not written yet", file=sys.stderr)
            continue
        module = get_experiment(name)
        start = time.perf_counter()
        result = module.run(args.scale, args.seed, progress=False)
        elapsed = time.perf_counter() - start
        result.save_json(args.out / f"{name}.json")
        module.plot(result, args.out / f"{name}.png")
        print(f"{name}: ran in {elapsed:.1f} s; wrote {args.out / name}.json and .png")
        if args.out.resolve() == OUT:  # the docs' own JSON: their pages follow it
            for page in sync_pages([name]):
                print(f"{name}: rewrote {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
