"""The `minipaged` command line.

The idea: a student's first contact with the library should be one command that shows something
happening.

- `minipaged demo` runs the engine on a small mixed workload (questions after a shared system prompt,
  parallel sampling, beam search, a pool small enough to force a preemption) and prints the outputs,
  what happened to memory and the throughput (demo.py).
- `minipaged generate "prompt" ...` generates with the engine, the knobs of LLM and SamplingParams
  as options, and prints each output's text and token ids.
- `minipaged memory` prints the step-by-step walk-through of the paged KV-cache manager alone
  (walkthrough.py): admission, demand paging, fork, copy-on-write, prefix caching, swapping, freeing.
- `minipaged assignment DEST` writes the student version of the project (assignments.py).
- `minipaged experiment NAME` runs one of the paper's experiments (experiments/) and prints what it
  measured beside what the paper reports; `--json` and `--plot` save the rows and the figure, and
  `minipaged experiment --list` names them all. `--backend` and `--device` choose the kernels and the
  device of an experiment that runs tensors; the simulations refuse them.

Bad arguments exit with status 2 and a one-line reason (argparse's, or the engine's ValueError),
never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

from minipaged import __version__
from minipaged.assignments import make_student_copy
from minipaged.demo import DemoConfig, format_report, run_demo
from minipaged.engine import LLM
from minipaged.experiments import EXPERIMENTS, ExperimentResult, get_experiment, runs_tensors
from minipaged.sampling import SamplingParams
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


def _add_demo_options(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument(
        "--block-size", type=int, default=d.block_size, help=f"tokens per KV block (default: {d.block_size})"
    )
    parser.add_argument(
        "--num-gpu-blocks",
        type=int,
        default=d.num_gpu_blocks,
        help=f"blocks in the device pool (default: {d.num_gpu_blocks}, small enough to force a preemption)",
    )
    parser.add_argument(
        "--num-cpu-blocks",
        type=int,
        default=d.num_cpu_blocks,
        help=f"blocks in the host swap pool (default: {d.num_cpu_blocks})",
    )


def _add_generate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts (strings)")
    parser.add_argument(
        "--model",
        default="tiny-llama",
        help="a preset (tiny-llama, small-llama, tiny-qwen2, ...) or a local checkpoint directory "
        "(default: tiny-llama, random weights)",
    )
    parser.add_argument("--backend", choices=["reference", "triton"], default="reference")
    parser.add_argument("--n", type=int, default=1, help="parallel samples per prompt (default: 1)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens to generate (default: 16)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep (default: 1, all)")
    parser.add_argument("--top-k", type=int, default=0, help="most likely tokens to keep (default: 0, all)")
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the sampling (default: from the engine's seed, 0)"
    )
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating past the end token")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    parser.add_argument(
        "--num-gpu-blocks", type=int, default=None, help="blocks in the device pool (default: from 64 MiB)"
    )
    parser.add_argument(
        "--num-cpu-blocks", type=int, default=None, help="blocks in the host swap pool (default: as many)"
    )
    parser.add_argument("--preemption-mode", choices=["recompute", "swap"], default="recompute")
    parser.add_argument("--enable-prefix-caching", action="store_true", help="share full prompt blocks")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")


def _add_experiment_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", metavar="NAME", help="the experiment to run (see --list)")
    parser.add_argument("--list", action="store_true", help="name every experiment and stop")
    parser.add_argument(
        "--json", metavar="PATH", help='write {"experiment", "rows", "paper", "settings"} to PATH'
    )
    parser.add_argument("--plot", metavar="PATH", help="draw the figure to PATH (.png, .svg or .pdf)")
    parser.add_argument(
        "--scale",
        choices=["small", "full"],
        default="full",
        help="full: the documented run; small: seconds, same rows and keys (default: full)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds workloads, weights and tokens (default: 0)"
    )
    parser.add_argument(
        "--backend",
        choices=["reference", "triton"],
        default=None,
        help="the kernels of an experiment that runs tensors (default: reference); --list marks them",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="cpu or cuda[:N], for an experiment that runs tensors (default: cpu)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="serving: the simulated model (opt-13b, opt-66b, opt-175b) or, with --measured, a preset",
    )
    parser.add_argument(
        "--measured",
        action="store_true",
        help="serving: replay the arrivals in real time on this machine instead of simulating them",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: `minipaged [--version] {demo,generate,memory,assignment,experiment} [options]`."""
    parser = argparse.ArgumentParser(
        prog="minipaged",
        description="PagedAttention built twice (readable PyTorch and Triton), for learning.",
    )
    parser.add_argument("--version", action="version", version=f"minipaged {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run the engine on a small mixed workload and report what happened to memory",
        description="Generate for questions sharing a system prompt (prefix caching), a parallel-sampling "
        "request (n=3) and a beam search, on a device pool small enough to force a swap; print the "
        "outputs, a memory report and the throughput.",
    )
    _add_demo_options(demo)
    demo.set_defaults(run=_demo, subparser=demo)
    generate = commands.add_parser(
        "generate",
        help="generate text with the engine",
        description="Generate for each PROMPT and print each output's text and token ids.",
    )
    _add_generate_options(generate)
    generate.set_defaults(run=_generate, subparser=generate)
    memory = commands.add_parser(
        "memory",
        help="walk through the paged KV-cache manager step by step",
        description="Admit, grow, fork, copy-on-write, prefix-cache hit, swap and free, with pictures.",
    )
    _add_memory_options(memory)
    memory.set_defaults(run=_memory, subparser=memory)
    assignment = commands.add_parser(
        "assignment",
        help="make the student version: a copy of the project with every solution stripped",
        description="Copy the project to DEST with the bodies between '# BEGIN SOLUTION' and "
        "'# END SOLUTION' replaced by a NotImplementedError stub (see docs/assignments.md).",
    )
    assignment.add_argument("dest", help="the folder to create (must not exist)")
    assignment.add_argument("--source", default=".", help="the project checkout to copy (default: .)")
    experiment = commands.add_parser(
        "experiment",
        help="run one of the paper's experiments and print it beside the paper's figures",
        description="Run experiment NAME, print its measured rows beside what the paper reports, and "
        "optionally save them as JSON and draw the figure (docs/experiments/index.md).",
    )
    _add_experiment_options(experiment)
    experiment.set_defaults(run=_experiment, subparser=experiment)
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


def _memory(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    sizes = {
        "block_size": args.block_size,
        "num_gpu_blocks": args.num_gpu_blocks,
        "num_cpu_blocks": args.num_cpu_blocks,
    }
    try:
        check_sizes(**sizes)
    except ValueError as error:
        parser.error(str(error))
    run_walkthrough(**sizes)
    return 0


def _demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    config = DemoConfig(
        block_size=args.block_size, num_gpu_blocks=args.num_gpu_blocks, num_cpu_blocks=args.num_cpu_blocks
    )
    try:
        report = run_demo(config)
    except ValueError as error:  # the engine refuses a setting: say which, no traceback
        parser.error(str(error))
    for line in format_report(report):
        print(line)
    return 0


def _generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        params = SamplingParams(
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_tokens=args.max_tokens,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
        )
        llm = LLM(
            args.model,
            backend=args.backend,
            block_size=args.block_size,
            num_gpu_blocks=args.num_gpu_blocks,
            num_cpu_blocks=args.num_cpu_blocks,
            preemption_mode=args.preemption_mode,
            enable_prefix_caching=args.enable_prefix_caching,
            device=args.device,
        )
        outputs = llm.generate(args.prompts, params, use_tqdm=False)
    except (ValueError, ImportError) as error:  # ImportError: the triton backend without triton
        parser.error(str(error))
    for request in outputs:
        print(f"prompt: {request.prompt!r} ({len(request.prompt_token_ids)} tokens)")
        for completion in request.outputs:
            print(
                f"  output {completion.index}: {len(completion.token_ids)} tokens, finish_reason "
                f"{completion.finish_reason}, cumulative_logprob {completion.cumulative_logprob:.3f}"
            )
            print(f"    text: {completion.text!r}")
            print(f"    token_ids: {completion.token_ids}")
    return 0


TAKES_TENSOR_OPTIONS = "  [--backend, --device]"  # the mark of --list for an experiment that runs tensors
HAS_MEASURED_RUN = "  [--measured]"  # ... and for one with a measured run beside its simulation


def _takes(module, parameter: str) -> bool:
    """Does the experiment's run() take `parameter` (`measured`: a real-time run beside its
    simulation; `model`: a choice of model)?"""
    try:
        return parameter in inspect.signature(module.run).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def _experiment_list() -> list[str]:
    width = max(len(name) for name in EXPERIMENTS)
    lines = []
    for name, (module, title) in EXPERIMENTS.items():
        line = f"{name:<{width}}  {title}"
        if importlib.util.find_spec(f"minipaged.experiments.{module}") is None:
            lines.append(line + "  (not written yet)")
            continue
        try:
            module = get_experiment(name)
            marks = (TAKES_TENSOR_OPTIONS if runs_tensors(module) else "") + (
                HAS_MEASURED_RUN if _takes(module, "measured") else ""
            )
        except ImportError:  # a dependency is missing: running it will say which
            marks = ""
        lines.append(line + marks)
    return lines


def _cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(rows: list[dict]) -> list[str]:
    """Rows with the same keys as a plain-text table; a column with one value is said once above it."""
    columns = list(rows[0])
    same = [k for k in columns if len(rows) > 1 and len({json.dumps(r[k]) for r in rows}) == 1]
    lines = [", ".join(f"{k} {_cell(rows[0][k])}" for k in same)] if same else []
    columns = [k for k in columns if k not in same]
    cells = [[_cell(r[k]) for k in columns] for r in rows]
    widths = [max(len(k), *(len(row[i]) for row in cells)) for i, k in enumerate(columns)]
    numeric = [all(isinstance(r[k], (int, float)) for r in rows) for k in columns]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return lines + [line(columns), line(["-" * w for w in widths])] + [line(row) for row in cells]


def format_experiment(result: ExperimentResult) -> list[str]:
    """The lines `minipaged experiment` prints: one table per kind of row, then the paper's figures."""
    groups: dict[tuple[str, ...], list[dict]] = {}
    for row in result.rows:
        groups.setdefault(tuple(row), []).append(row)
    lines = []
    for rows in groups.values():
        lines += ["", "measured:", *(f"  {text}" for text in _table(rows))]
    lines += ["", "the paper:"]
    for key, value in result.paper.items():
        text = value if isinstance(value, str) else json.dumps(value)
        lines += textwrap.wrap(f"{key}: {text}", width=98, initial_indent="  ", subsequent_indent="    ")
    return lines


def _experiment(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.list:
        print("\n".join(_experiment_list()))
        return 0
    if args.name is None:
        parser.error("give an experiment NAME, or --list to see them")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            parser.error(f"{option}: the folder of {path!r} does not exist")
    if args.plot is not None:  # before the run: a bad suffix must not cost a full run
        try:
            from minipaged.experiments.plotting import check_plot_path

            check_plot_path(args.plot)
        except ImportError as error:
            parser.error(f"--plot needs matplotlib (pip install matplotlib): {error}")
        except ValueError as error:
            parser.error(f"--plot: {error}")
    if args.name not in EXPERIMENTS:
        parser.error(f"unknown experiment {args.name!r}; expected one of {', '.join(EXPERIMENTS)}")
    try:
        module = get_experiment(args.name)
    except ModuleNotFoundError as error:
        expected = f"minipaged.experiments.{EXPERIMENTS[args.name][0]}"
        if error.name == expected:
            parser.error(f"experiment {args.name!r} is not written yet (no module {expected})")
        parser.error(f"experiment {args.name!r} cannot run: {error}")
    # Only the options given are passed: an experiment's run() keeps its own defaults.
    run_options = {k: v for k, v in (("backend", args.backend), ("device", args.device)) if v is not None}
    if args.model is not None:
        if not _takes(module, "model"):
            parser.error(f"experiment {args.name!r} takes no --model (only `serving` does)")
        run_options["model"] = args.model
    if args.measured:
        if not _takes(module, "measured"):
            parser.error(f"experiment {args.name!r} has no measured run (only `serving` has one)")
        run_options["measured"] = True
    if set(run_options) & {"backend", "device"} and not runs_tensors(module):
        given = " and ".join(f"--{k}" for k in run_options if k in ("backend", "device"))
        parser.error(
            f"experiment {args.name!r} runs no tensors (it is a simulation: no model, no kernel), so "
            f"{given} cannot apply to it; `minipaged experiment --list` marks the experiments that take them"
        )
    start = time.perf_counter()
    try:
        result = module.run(args.scale, args.seed, not args.no_progress, **run_options)
    except (ValueError, ImportError) as error:  # ImportError: backend triton without triton
        parser.error(str(error))
    elapsed = time.perf_counter() - start
    result.settings = {"scale": args.scale, "seed": args.seed, **result.settings}  # the run's own wins
    print(f"{args.name}: {EXPERIMENTS[args.name][1]}")
    settings = ", ".join(f"{key} {value}" for key, value in result.settings.items())
    print(f"{settings}, ran in {elapsed:.1f} s")
    print("\n".join(format_experiment(result)))
    if args.json is not None:
        result.save_json(args.json)
        print(f"wrote {args.json}")
    if args.plot is not None:
        try:
            module.plot(result, args.plot)
        except ImportError as error:
            parser.error(f"--plot needs matplotlib (pip install matplotlib): {error}")
        print(f"wrote {args.plot}")
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
    try:
        return args.run(args.subparser, args)  # the subcommand's parser: its usage line heads errors
    except BrokenPipeError:  # `minipaged demo | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
