"""The `minipaged` command line.

The idea: a student's first contact with the library should be one command that shows something
happening. `minipaged memory` prints the step-by-step walk-through of the paged KV-cache manager
(walkthrough.py): admission, demand paging, fork, copy-on-write, prefix caching, swapping, freeing.
`minipaged demo` runs the same walk-through today; once the engine lands it will generate text with
paged attention instead, and `memory` stays the tour of the memory manager. `minipaged assignment
DEST` writes the student version of the project (assignments.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from minipaged import __version__
from minipaged.assignments import make_student_copy
from minipaged.walkthrough import check_sizes
from minipaged.walkthrough import run as run_walkthrough


def _add_memory_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block-size", type=int, default=4, help="tokens per KV block (default: 4)")
    parser.add_argument(
        "--num-gpu-blocks", type=int, default=16, help="blocks in the device pool (default: 16, minimum 12)"
    )
    parser.add_argument(
        "--num-cpu-blocks", type=int, default=8, help="blocks in the host swap pool (default: 8, minimum 6)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: `minipaged [--version] {demo,memory} [options]`."""
    parser = argparse.ArgumentParser(
        prog="minipaged",
        description="PagedAttention built twice (readable PyTorch and Triton), for learning.",
    )
    parser.add_argument("--version", action="version", version=f"minipaged {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run the demo (today: the memory-manager walk-through)",
        description="Run the demo. Until the engine lands, this is the memory-manager walk-through.",
    )
    memory = commands.add_parser(
        "memory",
        help="walk through the paged KV-cache manager step by step",
        description="Admit, grow, fork, copy-on-write, prefix-cache hit, swap and free, with pictures.",
    )
    for sub in (demo, memory):
        _add_memory_options(sub)
    assignment = commands.add_parser(
        "assignment",
        help="make the student version: a copy of the project with every solution stripped",
        description="Copy the project to DEST with the bodies between '# BEGIN SOLUTION' and "
        "'# END SOLUTION' replaced by a NotImplementedError stub (see docs/assignments.md).",
    )
    assignment.add_argument("dest", help="the folder to create (must not exist)")
    assignment.add_argument("--source", default=".", help="the project checkout to copy (default: .)")
    return parser


def _make_assignment(parser: argparse.ArgumentParser, source: str, dest: str) -> int:
    if not (Path(source) / "pyproject.toml").is_file() or not (Path(source) / "minipaged").is_dir():
        parser.error(
            f"--source must be a minipaged checkout (with pyproject.toml and minipaged/), got {source!r}"
        )
    try:
        stripped = make_student_copy(source, dest)
    except FileExistsError as error:
        parser.error(str(error))
    print(f"wrote the student version to {dest}; solutions stripped in {len(stripped)} files:")
    for path in stripped:
        print(f"  {path.relative_to(dest)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments after the program name; None reads sys.argv.

    Returns:
        The exit status (0 on success). Bad arguments exit through SystemExit with status 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "assignment":
        return _make_assignment(parser, args.source, args.dest)
    sizes = {
        "block_size": args.block_size,
        "num_gpu_blocks": args.num_gpu_blocks,
        "num_cpu_blocks": args.num_cpu_blocks,
    }
    try:
        check_sizes(**sizes)
    except ValueError as error:
        parser.error(str(error))
    try:
        run_walkthrough(**sizes)
    except BrokenPipeError:  # `minipaged demo | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
