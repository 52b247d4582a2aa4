"""Start-up time: how long `import minipaged` and `minipaged --help` take, and what they import.

OS idea: a program should not pay for what it does not use; demand paging loads a page when it is
first touched, and a dynamic linker can bind a symbol at its first call (lazy binding), so a program
that never calls a function never loads it (OSTEP ch. 21). Python counterpart: a module imported
inside the function that needs it (or through a module's `__getattr__`, PEP 562) loads at first use.
torch takes a second or more to import and transformers several, so `minipaged --help` imports
neither: only a command that runs a model does.

Each case runs in a fresh Python process (nothing is cached in the process between repeats; the OS
file cache is warm after the first), `--repeats` times; the table shows the median wall time, the
fastest and the slowest. A second, untimed run of each case reports which of the heavy modules
(torch, transformers, triton, matplotlib, fastapi) ended up in sys.modules.

Run from the repository root (minipaged must be installed, `pip install -e .`, for the console script):

    python benchmarks/import_time.py                 # 5 repeats
    python benchmarks/import_time.py --repeats 9 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import bench_common
from bench_common import machine, positive, utc_now

HEAVY_MODULES = ("torch", "transformers", "triton", "matplotlib", "fastapi")
# the probe's last stderr line: the heavy modules it found in sys.modules
MARKER = "HEAVY_MODULES="

# What each case runs, as Python code for the probe: the same work as the command line beside it.
CASES = {
    "import minipaged": ("import minipaged", None),
    "minipaged --help": (
        "from minipaged.cli import main\nmain(['--help'])",
        ["--help"],
    ),
    "minipaged --version": (
        "from minipaged.cli import main\nmain(['--version'])",
        ["--version"],
    ),
    "from minipaged import LLM": ("from minipaged import LLM", None),
}


def console_script() -> list[str]:
    """The `minipaged` command beside this Python (a virtualenv's bin/), else `python -m minipaged`."""
    script = Path(sys.executable).parent / "minipaged"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "minipaged"]


def command_of(case: str) -> list[str]:
    """The command line that is timed: the console script for a CLI case, `python -c` otherwise."""
    code, cli_args = CASES[case]
    return (
        console_script() + cli_args
        if cli_args is not None
        else [sys.executable, "-c", code]
    )


def probe_code(case: str) -> str:
    """Python code that does the case's work, then prints the heavy modules it imported (to stderr)."""
    code = CASES[case][0]
    return (
        "import json, sys\n"
        # --help and --version exit
        f"try:\n{_indent(code)}\nexcept SystemExit:\n    pass\n"
        f"print({MARKER!r} + json.dumps([m for m in {HEAVY_MODULES!r} if m in sys.modules]), file=sys.stderr)"
    )


def _indent(code: str) -> str:
    return "\n".join("    " + line for line in code.splitlines())


def heavy_modules_of(case: str) -> list[str]:
    """The heavy modules in sys.modules after the case's work, in a fresh process.

    Raises:
        RuntimeError: if the probe fails (its stderr is in the message).
    """
    result = subprocess.run(
        [sys.executable, "-c", probe_code(case)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith(MARKER)]
    if result.returncode != 0 or not lines:
        raise RuntimeError(
            f"{case!r} failed (status {result.returncode}): {result.stderr.strip()}"
        )
    return json.loads(lines[-1][len(MARKER) :])


def time_command(command: list[str]) -> float:
    """Seconds of wall time of one fresh process running `command` (its output is discarded)."""
    start = time.perf_counter()
    subprocess.run(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=600,
        check=True,
    )
    return time.perf_counter() - start


def measure(case: str, repeats: int) -> dict:
    """One row: the case's median, fastest and slowest wall time, and the heavy modules it imports."""
    command = command_of(case)
    times = [time_command(command) for _ in range(repeats)]
    return {
        "case": case,
        "command": " ".join(
            Path(command[0]).name if i == 0 else part for i, part in enumerate(command)
        ),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "heavy_modules": heavy_modules_of(case),
    }


def run(args: argparse.Namespace, command: str = "") -> dict:
    """Every case of args.cases, measured; the report that the table and the JSON show."""
    date = utc_now()
    rows = [measure(case, args.repeats) for case in args.cases]
    return {
        "benchmark": "import_time",
        "command": command,
        "machine": machine(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": date,
        "python": platform.python_version(),
        "repeats": args.repeats,
        "rows": rows,
    }


def format_table(report: dict) -> str:
    """The report as header lines and a Markdown table."""
    load = report["load_average"]
    lines = [
        f"command: {report['command']}",
        f"machine: {report['machine']}; Python {report['python']}; date {report['date']}",
        f"load average at the end: {', '.join(f'{x:.2f}' for x in load) if load else 'n/a'}; "
        f"{report['repeats']} fresh processes a case",
        "",
        "| case | median s | min s | max s | heavy modules imported |",
        "|---|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        heavy = ", ".join(r["heavy_modules"]) or "none"
        times = f"{r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f}"
        lines.append(f"| `{r['case']}` | {times} | {heavy} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats", type=positive, default=5, help="fresh processes a case (default 5)"
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=list(CASES),
        default=list(CASES),
        help="what to time (default: all)",
    )
    parser.add_argument(
        "--json", metavar="PATH", help="also write the report as JSON to PATH"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON."""
    return bench_common.main("import_time.py", argv, parse_args, run, format_table)


if __name__ == "__main__":
    raise SystemExit(main())
