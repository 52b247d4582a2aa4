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

- `minipaged homework memory|scheduler --seed N` prints a random problem to work out by hand,
  OSTEP-style; `--solve` prints its answers, from the real managers (homework.py).
- `minipaged serve` serves the engine over HTTP, OpenAI-compatible (`/v1/completions`, streaming
  included, `/v1/models`, `/health`, `/metrics`; minipaged/serving/), with the engine's knobs as options.

Bad arguments exit with status 2 and a one-line reason, never a traceback: argparse's (with the usage
above it) for a malformed command line, `minipaged COMMAND: error: ...` alone for a value the engine
refuses (its ValueError or TypeError), a model folder that cannot be loaded, an output path that
cannot be written (checked before the run) or a port in use. Ctrl-C stops a command with status 130.

Start-up is kept short: building the parser imports neither torch nor transformers (seconds), so
`minipaged --help` answers at once; each command imports what it runs when it runs.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import inspect
import json
import os
import socket
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from minipaged import __version__
from minipaged.assignments import make_student_copy

if TYPE_CHECKING:
    from minipaged.engine import LLM
    from minipaged.experiments import ExperimentResult

# Names imported at their first use (PEP 562 `__getattr__` below), and kept as attributes of this
# module, where a test may replace them (the others are imported inside the commands that use them).
_LAZY = {"LLM": "minipaged.engine", "get_experiment": "minipaged.experiments"}


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def _lazy(name: str):
    """A name of _LAZY, as this module holds it now (imported at the first call, or replaced by a test)."""
    return globals()[name] if name in globals() else __getattr__(name)


def _add_memory_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--block-size", type=int, default=4, help="tokens per KV block (default: 4)"
    )
    parser.add_argument(
        "--num-gpu-blocks",
        type=int,
        default=16,
        help="blocks in the device pool (default: 16, minimum 12)",
    )
    parser.add_argument(
        "--num-cpu-blocks",
        type=int,
        default=8,
        help="blocks in the host swap pool (default: 8, minimum 6)",
    )


class DemoDefault:
    """The default of a demo option, read from DemoConfig only when help shows it.

    minipaged.demo imports the engine (and torch): building the parser must not, so the option's
    default is this placeholder; `%(default)s` in the help calls str(), and _demo leaves out the
    options still holding one, so DemoConfig's own defaults apply.
    """

    def __init__(self, field: str) -> None:
        self.field = field

    def __str__(self) -> str:
        from minipaged.demo import DemoConfig

        return str(getattr(DemoConfig, self.field))


def _add_demo_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--block-size",
        type=int,
        default=DemoDefault("block_size"),
        help="tokens per KV block (default: %(default)s)",
    )
    parser.add_argument(
        "--num-gpu-blocks",
        type=int,
        default=DemoDefault("num_gpu_blocks"),
        help="blocks in the device pool (default: %(default)s, small enough to force a preemption)",
    )
    parser.add_argument(
        "--num-cpu-blocks",
        type=int,
        default=DemoDefault("num_cpu_blocks"),
        help="blocks in the host swap pool (default: %(default)s)",
    )


# auto: the model's own; the others name a torch dtype
DTYPES = ("auto", "float32", "float16", "bfloat16")


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    """The knobs of LLM that generate and serve share (vLLM's engine arguments, by the same names)."""
    parser.add_argument(
        "--model",
        default="tiny-llama",
        help="a preset (tiny-llama, small-llama, tiny-qwen2, ...) or a local checkpoint directory "
        "(default: tiny-llama, random weights)",
    )
    parser.add_argument(
        "--backend", choices=["reference", "triton"], default="reference"
    )
    parser.add_argument(
        "--block-size", type=int, default=16, help="tokens per KV block (default: 16)"
    )
    parser.add_argument(
        "--num-gpu-blocks",
        type=int,
        default=None,
        help="blocks in the device pool (default: 64 MiB of them on cpu, half the free memory on cuda)",
    )
    parser.add_argument(
        "--num-cpu-blocks",
        type=int,
        default=None,
        help="blocks in the host swap pool (default: as many)",
    )
    parser.add_argument(
        "--preemption-mode", choices=["recompute", "swap"], default="recompute"
    )
    parser.add_argument(
        "--enable-prefix-caching", action="store_true", help="share full prompt blocks"
    )
    parser.add_argument(
        "--enable-chunked-prefill",
        action="store_true",
        help="compute long prompts in chunks that fill each step's token budget "
        "(--max-num-batched-tokens, default then 512) beside the decodes",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="ranks that split the model, each with its share of the KV heads; the engine "
        "starts the other ranks itself, or joins torchrun's group (default: 1)",
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda[:N] (default: cpu)"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="of weights and KV cache (default: auto)",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=256,
        help="sequences in one batch at most (default: 256)",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens in one step at most (default: max(max model len, 2048))",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="prompt + output tokens at most (default: the model's positions)",
    )


def _add_generate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "prompts", nargs="+", metavar="PROMPT", help="one or more prompts (strings)"
    )
    _add_engine_options(parser)
    parser.add_argument(
        "--n", type=int, default=1, help="parallel samples per prompt (default: 1)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=16, help="tokens to generate (default: 16)"
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0 is greedy (default: 0)"
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus mass to keep (default: 1, all)",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="most likely tokens to keep (default: 0, all)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the sampling (default: from the engine's seed, 0)",
    )
    parser.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past the end token"
    )


def _port(text: str) -> int:
    port = int(text)  # argparse turns a ValueError into "invalid _port value"
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 1..65535, got {port}")
    return port


def _add_serve_options(parser: argparse.ArgumentParser) -> None:
    _add_engine_options(parser)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the engine's seed: preset weights, requests without a seed (default: 0)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=_port, default=8000, help="port to listen on (default: 8000)"
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help='the "model" clients name in requests and /v1/models lists (default: --model)',
    )
    parser.add_argument(
        "--max-queued-requests",
        type=int,
        default=None,
        metavar="N",
        help="requests submitted and not finished at most; beyond, HTTP 503 (default: the server's)",
    )


def _add_experiment_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name", nargs="?", metavar="NAME", help="the experiment to run (see --list)"
    )
    parser.add_argument(
        "--list", action="store_true", help="name every experiment and stop"
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help='write {"experiment", "rows", "paper", "settings"} to PATH',
    )
    parser.add_argument(
        "--plot", metavar="PATH", help="draw the figure to PATH (.png, .svg or .pdf)"
    )
    parser.add_argument(
        "--scale",
        choices=["small", "full"],
        default="full",
        help="full: the documented run; small: seconds, same rows and keys (default: full)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds workloads, weights and tokens (default: 0)",
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
    """The argument parser: `minipaged [--version] COMMAND [options]`, one subparser a command."""
    parser = argparse.ArgumentParser(
        prog="minipaged",
        description="PagedAttention built twice (readable PyTorch and Triton), for learning.",
    )
    parser.add_argument(
        "--version", action="version", version=f"minipaged {__version__}"
    )
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
    memory.add_argument(
        "--html",
        metavar="PATH",
        help="also write the walk-through as one interactive page (Next/Back, a playground), "
        "self-contained: open it in a browser, offline",
    )
    memory.set_defaults(run=_memory, subparser=memory)
    assignment = commands.add_parser(
        "assignment",
        help="make the student version: a copy of the project with every solution stripped",
        description="Copy the project to DEST with the bodies between '# BEGIN SOLUTION' and "
        "'# END SOLUTION' replaced by a NotImplementedError stub (see docs/assignments/index.md).",
    )
    assignment.add_argument("dest", help="the folder to create (must not exist)")
    assignment.add_argument(
        "--source", default=".", help="the project checkout to copy (default: .)"
    )
    assignment.set_defaults(run=_assignment, subparser=assignment)
    grade = commands.add_parser(
        "grade",
        help="grade a student copy task by task; Gradescope's results.json with --json",
        description="Splice each task's bodies from the copy at PATH into the reference code, run "
        "that task's tests, and score only the tests that fail on the task's stub and pass on "
        "the reference (docs/assignments/index.md).",
    )
    _add_grade_options(grade)
    grade.set_defaults(run=_grade, subparser=grade)
    experiment = commands.add_parser(
        "experiment",
        help="run one of the paper's experiments and print it beside the paper's figures",
        description="Run experiment NAME, print its measured rows beside what the paper reports, and "
        "optionally save them as JSON and draw the figure (docs/experiments/index.md).",
    )
    _add_experiment_options(experiment)
    experiment.set_defaults(run=_experiment, subparser=experiment)
    serve = commands.add_parser(
        "serve",
        help="serve the engine over HTTP, OpenAI-compatible (/v1/completions, /v1/models, /health, /metrics)",
        description="Load the model, then answer OpenAI completion requests (streaming too) on "
        "http://HOST:PORT until Ctrl-C; every request joins the engine's one batch.",
    )
    _add_serve_options(serve)
    serve.set_defaults(run=_serve, subparser=serve)
    homework = commands.add_parser(
        "homework",
        help="print a random paging or scheduling problem to work out by hand (--solve: answers)",
        description="OSTEP-style homework: a seeded random problem on the KV-cache manager "
        "(memory) or the scheduler (scheduler); --solve prints the real managers' answers "
        "(docs/homework.md).",
    )
    homework.add_argument("kind", choices=("memory", "scheduler"), help="the problem")
    homework.add_argument(
        "--seed", type=int, default=0, help="the problem's seed, >= 0 (default: 0)"
    )
    homework.add_argument(
        "--solve", action="store_true", help="print the answers under the questions"
    )
    homework.set_defaults(run=_homework, subparser=homework)
    return parser


# ---- errors: one line, no traceback ----------------------------------------------------------

# ImportError: the triton backend without triton
USER_ERRORS = (ValueError, TypeError, ImportError)


def _fail(parser: argparse.ArgumentParser, message: object) -> NoReturn:
    """Exit 2 with `minipaged COMMAND: error: MESSAGE` on one line, as argparse words its errors.

    The usage block argparse adds is left out: the command line parsed, a value was refused.
    """
    parser.exit(2, f"{parser.prog}: error: {' '.join(str(message).split())}\n")


def _build_llm(
    parser: argparse.ArgumentParser, args: argparse.Namespace, **extra
) -> LLM:
    """The LLM of the engine options (_add_engine_options); exit 2 with one line if it is refused."""
    import torch

    try:
        return _lazy("LLM")(
            args.model,
            backend=args.backend,
            block_size=args.block_size,
            num_gpu_blocks=args.num_gpu_blocks,
            num_cpu_blocks=args.num_cpu_blocks,
            preemption_mode=args.preemption_mode,
            enable_prefix_caching=args.enable_prefix_caching,
            enable_chunked_prefill=args.enable_chunked_prefill,
            tensor_parallel_size=args.tensor_parallel_size,
            device=args.device,
            dtype=None if args.dtype == "auto" else getattr(torch, args.dtype),
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
            **extra,
        )
    except USER_ERRORS as error:
        _fail(parser, error)
    # transformers: a checkpoint folder with a missing or broken file
    except OSError as error:
        _fail(parser, f"--model {args.model!r} cannot be loaded: {error}")
    except (MemoryError, torch.OutOfMemoryError) as error:
        _fail(
            parser,
            f"the KV pools do not fit in memory (lower --num-gpu-blocks/--num-cpu-blocks): {error}",
        )


def _check_output_path(parser: argparse.ArgumentParser, option: str, path: str) -> None:
    """Refuse now, not after the run, a path that cannot be written: create it and remove it again."""
    target = Path(path)
    if target.is_dir():
        _fail(parser, f"{option}: {path!r} is a folder; give a file path")
    if not target.resolve().parent.exists():
        _fail(parser, f"{option}: the folder of {path!r} does not exist")
    existed = target.exists()
    try:
        # "a": an existing file keeps its content until the run rewrites it
        with open(target, "a"):
            pass
    except OSError as error:  # a parent that is a file, a read-only disk, no permission
        _fail(parser, f"{option}: cannot write {path!r}: {error.strerror or error}")
    if not existed:
        target.unlink()


def _check_port(parser: argparse.ArgumentParser, host: str, port: int) -> None:
    """Bind HOST:PORT and let go, so that a busy port is one line before the model loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        )[0]
    except socket.gaierror as error:
        _fail(
            parser,
            f"--host {host!r} is not an address of this machine: {error.strerror}",
        )
    with socket.socket(family, kind, proto) as probe:
        # as uvicorn binds: TIME_WAIT is free
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                _fail(parser, f"--port {port} is in use (on --host {host})")
            _fail(
                parser,
                f"cannot listen on --host {host} --port {port}: {error.strerror or error}",
            )


def _assignment(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    source, dest = args.source, args.dest
    if (
        not (Path(source) / "pyproject.toml").is_file()
        or not (Path(source) / "minipaged").is_dir()
    ):
        _fail(
            parser,
            f"--source must be a minipaged checkout (pyproject.toml, minipaged/), got {source!r}",
        )
    try:
        stripped = make_student_copy(source, dest)
    except FileExistsError as error:
        _fail(parser, error)
    print(
        f"wrote the student version to {dest}; solutions stripped in {len(stripped)} files:"
    )
    for path in stripped:
        print(f"  {path.relative_to(dest)}")
    return 0


def _homework(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.seed < 0:
        _fail(parser, f"--seed must be >= 0, got {args.seed}")
    from minipaged.homework import make_problem, render

    print(render(make_problem(args.kind, args.seed), solve=args.solve), end="")
    return 0


def _add_grade_options(grade: argparse.ArgumentParser) -> None:
    grade.add_argument(
        "path", nargs="?", default=".", help="the student copy to grade (default: .)"
    )
    which = grade.add_mutually_exclusive_group()
    which.add_argument(
        "--assignment", type=int, help="grade only this assignment's tasks (1-4)"
    )
    which.add_argument(
        "--task", action="append", help="grade only this task (M.N); repeat for more"
    )
    grade.add_argument(
        "--json", metavar="PATH", help="write Gradescope's results.json to PATH"
    )
    grade.add_argument(
        "--extra-tests",
        metavar="DIR",
        help="hidden tests: a folder of test files marked with the task markers",
    )
    grade.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="pytest runs at once, each in its own copy of the reference (default: 2)",
    )
    grade.add_argument(
        "--reference",
        metavar="DIR",
        help="the checkout with the solutions (default: the one minipaged runs from)",
    )


def _grade(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import json

    from minipaged import course
    from minipaged.grading import Grader, gradescope_results

    if not (Path(args.path) / "minipaged").is_dir():
        _fail(
            parser, f"PATH must be a student copy (with minipaged/), got {args.path!r}"
        )
    try:
        if args.task:
            tasks = [course.task(t) for t in args.task]
        elif args.assignment is not None:
            tasks = list(course.tasks_of(args.assignment))
            if not tasks:
                numbers = ", ".join(str(a.number) for a in course.ASSIGNMENTS)
                raise ValueError(
                    f"--assignment must be one of {numbers}, got {args.assignment}"
                )
        else:
            tasks = list(course.TASKS)
        if args.json:
            _check_output_path(parser, "--json", args.json)
        grader = Grader(args.reference, args.extra_tests, tasks=tasks, jobs=args.jobs)
    except ValueError as error:
        _fail(parser, error)

    def report(result) -> None:
        tally = f"{len(result.passed)}/{result.num_counted} tests"
        note = f"  ({result.error})" if result.error else ""
        print(
            f"task {result.task.id:<4} {result.task.title:<38} "
            f"{result.score:6.2f} / {result.task.points:<3} {tally}{note}",
            flush=True,
        )

    with grader:
        results = grader.grade(args.path, tasks, progress=report)
    total = sum(r.score for r in results)
    print(f"total {total:.2f} / {sum(t.points for t in tasks)}")
    if args.json:
        Path(args.json).write_text(json.dumps(gradescope_results(results), indent=2))
        print(f"wrote {args.json}")
    return 0


def _memory(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from minipaged.walkthrough import check_sizes
    from minipaged.walkthrough import run as run_walkthrough

    sizes = {
        "block_size": args.block_size,
        "num_gpu_blocks": args.num_gpu_blocks,
        "num_cpu_blocks": args.num_cpu_blocks,
    }
    try:
        check_sizes(**sizes)
    except ValueError as error:
        _fail(parser, error)
    if args.html:
        _check_output_path(parser, "--html", args.html)
    run_walkthrough(**sizes)
    if args.html:
        from minipaged.walkthrough_html import write_walkthrough_html

        print(
            f"\nwrote the interactive walk-through to {write_walkthrough_html(args.html, **sizes)}"
        )
    return 0


def _demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from minipaged.demo import DemoConfig, format_report, run_demo

    given = {
        k: getattr(args, k) for k in ("block_size", "num_gpu_blocks", "num_cpu_blocks")
    }
    config = DemoConfig(
        **{k: v for k, v in given.items() if not isinstance(v, DemoDefault)}
    )
    try:
        report = run_demo(config)
    # the engine refuses a setting: say which, no traceback
    except USER_ERRORS as error:
        _fail(parser, error)
    for line in format_report(report):
        print(line)
    return 0


def _generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from minipaged.sampling import SamplingParams

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
    except USER_ERRORS as error:
        _fail(parser, error)
    llm = _build_llm(parser, args)
    try:
        outputs = llm.generate(args.prompts, params, use_tqdm=False)
    # a prompt that can never be served: too long, never fits
    except USER_ERRORS as error:
        _fail(parser, error)
    finally:
        llm.close()  # tensor-parallel workers stop here
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


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`minipaged serve`: check the address, load the engine, then serve until Ctrl-C."""
    if args.max_queued_requests is not None and args.max_queued_requests < 1:
        _fail(
            parser,
            f"--max-queued-requests must be an int >= 1, got {args.max_queued_requests}",
        )
    # before the model loads: a busy port is found in a blink
    _check_port(parser, args.host, args.port)
    # a server keeps recent steps
    llm = _build_llm(parser, args, seed=args.seed, max_step_stats=1000)
    # here: fastapi and uvicorn load only for this command
    from minipaged.serving import serve

    # as vLLM: clients name the model as it was given
    name = args.served_model_name or args.model
    options = {"host": args.host, "port": args.port, "served_model_name": name}
    if args.max_queued_requests is not None:
        options["max_queued_requests"] = args.max_queued_requests
    try:
        serve(llm, **options)
    except USER_ERRORS as error:
        _fail(parser, error)
    # Ctrl-C is how a server stops: uvicorn shut down, then re-raised it
    except KeyboardInterrupt:
        pass
    finally:
        llm.close()  # tensor-parallel workers stop here
    return 0


# the mark of --list for an experiment that runs tensors
TAKES_TENSOR_OPTIONS = "  [--backend, --device]"
# ... and for one with a measured run beside its simulation
HAS_MEASURED_RUN = "  [--measured]"


def _takes(module, parameter: str) -> bool:
    """Does the experiment's run() take `parameter` (`measured`: a real-time run beside its
    simulation; `model`: a choice of model)?"""
    try:
        return parameter in inspect.signature(module.run).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def _experiment_list() -> list[str]:
    from minipaged.experiments import EXPERIMENTS, runs_tensors

    width = max(len(name) for name in EXPERIMENTS)
    lines = []
    for name, (module, title) in EXPERIMENTS.items():
        line = f"{name:<{width}}  {title}"
        if importlib.util.find_spec(f"minipaged.experiments.{module}") is None:
            lines.append(line + "  (not written yet)")
            continue
        try:
            module = _lazy("get_experiment")(name)
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
    same = [
        k
        for k in columns
        if len(rows) > 1 and len({json.dumps(r[k]) for r in rows}) == 1
    ]
    lines = [", ".join(f"{k} {_cell(rows[0][k])}" for k in same)] if same else []
    columns = [k for k in columns if k not in same]
    cells = [[_cell(r[k]) for k in columns] for r in rows]
    widths = [
        max(len(k), *(len(row[i]) for row in cells)) for i, k in enumerate(columns)
    ]
    numeric = [all(isinstance(r[k], (int, float)) for r in rows) for k in columns]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return (
        lines
        + [line(columns), line(["-" * w for w in widths])]
        + [line(row) for row in cells]
    )


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
        lines += textwrap.wrap(
            f"{key}: {text}", width=98, initial_indent="  ", subsequent_indent="    "
        )
    return lines


def _experiment(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from minipaged.experiments import EXPERIMENTS, runs_tensors

    if args.list:
        print("\n".join(_experiment_list()))
        return 0
    if args.name is None:
        _fail(parser, "give an experiment NAME, or --list to see them")
    if args.name not in EXPERIMENTS:
        _fail(
            parser,
            f"unknown experiment {args.name!r}; expected one of {', '.join(EXPERIMENTS)}",
        )
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        # before the run: a path it cannot write must not cost a full run
        if path is not None:
            _check_output_path(parser, option, path)
    if args.plot is not None:  # ... nor a suffix matplotlib cannot draw
        try:
            from minipaged.experiments.plotting import check_plot_path

            check_plot_path(args.plot)
        except ImportError as error:
            _fail(parser, f"--plot needs matplotlib (pip install matplotlib): {error}")
        except ValueError as error:
            _fail(parser, f"--plot: {error}")
    try:
        module = _lazy("get_experiment")(args.name)
    except ModuleNotFoundError as error:
        expected = f"minipaged.experiments.{EXPERIMENTS[args.name][0]}"
        if error.name == expected:
            _fail(
                parser,
                f"experiment {args.name!r} is not written yet (no module {expected})",
            )
        _fail(parser, f"experiment {args.name!r} cannot run: {error}")
    # Only the options given are passed: an experiment's run() keeps its own defaults.
    run_options = {
        k: v
        for k, v in (("backend", args.backend), ("device", args.device))
        if v is not None
    }
    if args.model is not None:
        if not _takes(module, "model"):
            _fail(
                parser,
                f"experiment {args.name!r} takes no --model (only `serving` does)",
            )
        run_options["model"] = args.model
    if args.measured:
        if not _takes(module, "measured"):
            _fail(
                parser,
                f"experiment {args.name!r} has no measured run (only `serving` has one)",
            )
        run_options["measured"] = True
    if set(run_options) & {"backend", "device"} and not runs_tensors(module):
        given = " and ".join(
            f"--{k}" for k in run_options if k in ("backend", "device")
        )
        _fail(
            parser,
            f"experiment {args.name!r} runs no tensors (it is a simulation: no model, no kernel), so "
            f"{given} cannot apply to it; `minipaged experiment --list` marks the experiments that take them",
        )
    start = time.perf_counter()
    try:
        result = module.run(args.scale, args.seed, not args.no_progress, **run_options)
    except USER_ERRORS as error:  # ImportError: backend triton without triton
        _fail(parser, error)
    elapsed = time.perf_counter() - start
    # the run's own wins
    result.settings = {"scale": args.scale, "seed": args.seed, **result.settings}
    print(f"{args.name}: {EXPERIMENTS[args.name][1]}")
    settings = ", ".join(f"{key} {value}" for key, value in result.settings.items())
    print(f"{settings}, ran in {elapsed:.1f} s")
    print("\n".join(format_experiment(result)))
    _save(parser, "--json", args.json, result.save_json)
    _save(parser, "--plot", args.plot, lambda path: module.plot(result, path))
    return 0


def _save(
    parser: argparse.ArgumentParser, option: str, path: str | None, write
) -> None:
    """Write an output checked before the run; the disk may still fill or vanish meanwhile."""
    if path is None:
        return
    try:
        write(path)
    except ImportError as error:
        _fail(parser, f"{option} needs matplotlib (pip install matplotlib): {error}")
    except OSError as error:
        _fail(parser, f"{option}: cannot write {path!r}: {error.strerror or error}")
    print(f"wrote {path}")


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
    try:
        # the subcommand's parser: its name heads errors
        return args.run(args.subparser, args)
    except BrokenPipeError:  # `minipaged demo | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    # Ctrl-C: the user stopped it; 130 = 128 + SIGINT, as a shell reports
    except KeyboardInterrupt:
        print(f"{args.subparser.prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
