"""What the benchmark scripts share: the machine line, the UTC date, a positive-int argparse type, the
refusal to time a wrong computation, the order of a round, and the entry point that prints the
table and writes the JSON.

The scripts import it from beside themselves (`python benchmarks/NAME.py` puts benchmarks/ first on
sys.path; the tests do the same).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence


class DisagreementError(AssertionError):
    """The measured system gave a wrong answer: the benchmark refuses to report its time."""


def machine() -> str:
    """The CPU model (from /proc/cpuinfo where there is one), the CPU count and the OS."""
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
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()} {platform.machine()}"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def rotated(systems: Sequence[str], round_: int) -> list[str]:
    """The order of one round: each round starts one system later, so none always runs first."""
    k = round_ % len(systems)
    return [*systems[k:], *systems[:k]]


def main(
    script: str,
    argv: Sequence[str] | None,
    parse_args: Callable[[Sequence[str]], argparse.Namespace],
    run: Callable[[argparse.Namespace, str], dict],
    format_table: Callable[[dict], str],
) -> int:
    """Run a benchmark, print its table, write its JSON; on a DisagreementError report nothing, return 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        report = run(args, shlex.join(["python", f"benchmarks/{script}", *argv]))
    except DisagreementError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0
