"""Serving throughput and KV memory: minipaged's engine against transformers' two ways of batching.

OS idea: a time-shared system keeps the CPU busy by switching to whoever is ready, and hands out memory
in pages as it is touched, not in one contiguous piece sized for the worst case (OSTEP ch. 7, 18).
KV counterpart: vLLM paper sections 4 and 6: iteration-level scheduling (a finished request leaves the
batch and a waiting one joins at once) with a paged KV cache, against a static batch that is padded to
its longest prompt and runs until its longest output is done, with a contiguous cache sized for that.

On one mixed-length workload (prompt and output lengths each varying tenfold; greedy; ignore_eos, so
every request generates exactly its own number of tokens) this script runs, in rounds (each round
runs every system once, the order rotated by one from round to round):

- minipaged: `LLM(...).generate` on the reference backend, one SamplingParams per request;
- padded generate: transformers' `model.generate` on the whole workload as one batch, left padding,
  max_new_tokens = the longest output (static batching). Only each request's own tokens count as
  useful: the rest is what static batching wastes;
- continuous batching: transformers' paged continuous batching (the engine behind `generate_batch`).
  generate_batch takes one max_new_tokens for every request, so the script drives the same manager
  through `continuous_batching_context_manager` and `add_request(..., max_new_tokens=...)`, which is
  what generate_batch does inside, with each request's own length.

Speed is reported as ratios taken round by round: minipaged's tokens per second over each peer's in
the same round, then the median of those ratios and their spread. For each system it also reports,
from its median round, useful tokens per second (the requests' own tokens / wall time), the wall time,
and KV memory: the peak in use (minipaged: peak_blocks_used x bytes per block; padded: the
DynamicCache at its largest, batch x (longest prompt + max_new_tokens - 1) x bytes per token, read
from the cache; continuous batching: the most blocks its allocator's block tables held, recorded after
every allocation, x bytes per block) and what each allocates up front (minipaged's and continuous
batching's pools, sized to the same number of blocks; the padded cache allocates as it grows).

Before reporting, minipaged's greedy outputs are checked token for token against transformers'
unbatched `generate` for a sample of requests (the longest prompt, the longest output, and more);
on a mismatch it prints the error, reports nothing and exits with status 1. How many requests the
two transformers runs agree with minipaged on is reported too (batching can flip a near-tie).

`--profile` adds where minipaged's time goes: one `generate` of the workload under cProfile, split
into the model's linear layers, minipaged's attention, building each step's inputs, sampling, the
scheduler and the step's statistics (PROFILE_PARTS).

Run from the repository root (minipaged must be importable: `pip install -e .` or PYTHONPATH=.):

    python benchmarks/engine_throughput.py                       # 32 requests of small-llama
    python benchmarks/engine_throughput.py --num-requests 8 --json out.json
    python benchmarks/engine_throughput.py --rounds 5 --profile      # the benchmarks page's run
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import bench_common
import torch
import transformers
from bench_common import DisagreementError, machine, positive, rotated, utc_now
from tqdm import tqdm

from minipaged import LLM, SamplingParams
from minipaged.config import kv_cache_bytes_per_block, kv_cache_bytes_per_token
from minipaged.experiments import measured
from minipaged.model_runner import kv_shape
from minipaged.presets import PAD_ID, PRESETS, load_preset

BENCHMARK = "engine_throughput"
SYSTEMS = ("minipaged", "padded", "continuous")
SYSTEM_NAMES = {
    "minipaged": "minipaged LLM.generate (reference)",
    "padded": "transformers generate, padded batch",
    "continuous": "transformers continuous batching",
}
ROW_KEYS = (
    "system",
    "useful_tokens",
    "computed_tokens",
    "wall_s",
    "tokens_per_s",
    "kv_peak_bytes",
    "kv_allocated_bytes",
    "matches_minipaged",
)
GOALS = (
    "minipaged tokens/s >= 1.5x continuous batching's",
    "minipaged tokens/s >= 1.3x padded generate's",
    "minipaged peak KV memory < padded generate's",
)
PEERS = (
    "continuous",
    "padded",
)  # the systems minipaged's speed is compared with, per round


@dataclass
class Request:
    """One request of the workload: its prompt and exactly how many tokens it generates."""

    prompt_token_ids: list[int]
    max_tokens: int


@dataclass
class SystemResult:
    """What one system did with the workload."""

    system: str
    outputs: list[list[int]]  # each request's generated tokens, in workload order
    wall_s: float
    useful_tokens: int  # the requests' own tokens
    computed_tokens: int  # tokens the system generated, wasted ones included
    kv_peak_bytes: int
    kv_allocated_bytes: int
    notes: list[str] = field(default_factory=list)


def make_workload(
    num_requests: int,
    prompt_lens: tuple[int, int],
    output_lens: tuple[int, int],
    vocab_size: int,
    seed: int = 0,
    bos_token_id: int = 1,
    first_token_id: int = 3,
) -> list[Request]:
    """Requests whose prompt and output lengths are spread evenly over the ranges, in shuffled order.

    Prompts are a BOS then random tokens in [first_token_id, vocab_size) (no special tokens inside).
    """
    gen = torch.Generator().manual_seed(seed)

    # evenly over [low, high], both ends included
    def spread(low: int, high: int) -> list[int]:
        values = torch.linspace(low, high, num_requests).round().long()
        return values[torch.randperm(num_requests, generator=gen)].tolist()

    requests = []
    for p, o in zip(spread(*prompt_lens), spread(*output_lens), strict=True):
        body = torch.randint(
            first_token_id, vocab_size, (p - 1,), generator=gen
        ).tolist()
        requests.append(Request([bos_token_id, *body], o))
    return requests


def load_model(
    name: str, seed: int, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """A fresh copy of the model: a preset with weights from `seed`, or a local checkpoint directory."""
    if name in PRESETS:
        return load_preset(name, seed, dtype)
    if os.path.isdir(name):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, local_files_only=True
        )
        return model.eval()
    raise ValueError(
        f"--model must be a preset ({', '.join(PRESETS)}) or a local directory, got {name!r}"
    )


def bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of K and V that one token keeps across all layers (minipaged.config)."""
    num_layers, num_kv_heads, head_dim = kv_shape(model.config)
    return kv_cache_bytes_per_token(
        num_layers, num_kv_heads, head_dim, next(model.parameters()).dtype.itemsize
    )


def warmup_workload(vocab_size: int) -> list[Request]:
    """Two short requests that each system runs before it is timed (first calls pay one-off costs)."""
    return make_workload(2, (4, 8), (2, 4), vocab_size, seed=12345)


# ---- the three systems ---------------------------------------------------------------------------


def run_minipaged(
    model: torch.nn.Module,
    workload: list[Request],
    block_size: int,
    num_gpu_blocks: int,
    repeats: int = 1,
) -> SystemResult:
    """minipaged's LLM on the reference backend: one generate call for the whole workload.

    With `repeats` > 1 the call is timed that many times and the fastest is kept.
    """
    llm = LLM(
        model, backend="reference", block_size=block_size, num_gpu_blocks=num_gpu_blocks
    )
    vocab = llm.vocab_size

    def generate(requests: list[Request]) -> list[list[int]]:
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
        params = [
            SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)
            for r in requests
        ]
        return [
            out.outputs[0].token_ids
            for out in llm.generate(prompts, params, use_tqdm=False)
        ]

    generate(warmup_workload(vocab))
    walls = []
    for _ in range(repeats):
        steps_before = llm.stats.steps
        start = time.perf_counter()
        outputs = generate(workload)
        walls.append(time.perf_counter() - start)
    num_layers, num_kv_heads, head_dim = kv_shape(model.config)
    per_block = kv_cache_bytes_per_block(
        block_size, num_layers, num_kv_heads, head_dim, llm.runner.dtype.itemsize
    )
    useful = sum(len(o) for o in outputs)
    stats = llm.stats
    notes = [
        f"minipaged: {stats.steps - steps_before} steps, peak {stats.peak_blocks_used} of "
        f"{num_gpu_blocks} blocks of {block_size} tokens, preemptions {stats.num_preemptions}"
    ]
    return SystemResult(
        "minipaged",
        outputs,
        min(walls),
        useful,
        useful,
        stats.peak_blocks_used * per_block,
        num_gpu_blocks * per_block,
        notes,
    )


def left_padded(requests: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask `[batch, longest prompt]`, padded on the left with PAD_ID."""
    return measured.left_padded([r.prompt_token_ids for r in requests])


def cache_bytes(cache: object) -> int:
    """Bytes held by a transformers DynamicCache (its keys and values, every layer)."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def run_padded(
    model: torch.nn.Module, workload: list[Request], repeats: int = 1
) -> SystemResult:
    """transformers' generate on one left-padded batch, until the longest output is done.

    With `repeats` > 1 the call is timed that many times and the fastest is kept.
    """

    def generate(requests: list[Request]):
        ids, mask = left_padded(requests)
        config = transformers.GenerationConfig(
            do_sample=False,
            max_new_tokens=max(r.max_tokens for r in requests),
            eos_token_id=None,  # ignore_eos: run to max_new_tokens
            pad_token_id=PAD_ID,
            return_dict_in_generate=True,  # to read the cache it grew
        )
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config
            )
        return out, ids.shape[1]

    generate(warmup_workload(model.config.get_text_config().vocab_size))
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        out, width = generate(workload)
        walls.append(time.perf_counter() - start)
    outputs = [
        out.sequences[i, width : width + r.max_tokens].tolist()
        for i, r in enumerate(workload)
    ]
    max_new = max(r.max_tokens for r in workload)
    kv = cache_bytes(out.past_key_values)
    notes = [
        f"padded: batch {len(workload)} x (prompt {width} + max_new_tokens {max_new}); its DynamicCache "
        f"ends at {kv / 2**20:.1f} MiB = {len(workload)} x {kv // (len(workload) * bytes_per_token(model))} "
        f"tokens x {bytes_per_token(model)} bytes"
    ]
    return SystemResult(
        "padded",
        outputs,
        min(walls),
        sum(len(o) for o in outputs),
        len(workload) * max_new,
        kv,
        kv,
        notes,
    )


def run_continuous(
    model: torch.nn.Module,
    workload: list[Request],
    block_size: int,
    num_blocks: int,
    repeats: int = 1,
) -> SystemResult:
    """transformers' continuous batching with a paged cache, each request with its own max_new_tokens.

    Each run is a session of its manager; the wall time counts from the first add_request to the
    last result, not the session's setup. With `repeats` > 1 the fastest of that many runs is kept.
    """
    cb_config = transformers.ContinuousBatchingConfig(
        page_size=block_size, num_blocks=num_blocks
    )
    config = transformers.GenerationConfig(
        do_sample=False,
        max_new_tokens=max(r.max_tokens for r in workload),
        eos_token_id=-1,
        pad_token_id=PAD_ID,
    )
    peak = {"blocks": 0}
    lock = threading.Lock()

    def session(
        requests: list[Request], record: bool
    ) -> tuple[list[list[int]], float, int, int]:
        with model.continuous_batching_context_manager(
            generation_config=config,
            continuous_batching_config=cb_config,
            block=True,
            timeout=5,
        ) as manager:
            cache = manager.batch_processor.cache
            if record:
                _record_peak_blocks(cache, peak, lock)
            start = time.perf_counter()
            ids = [
                manager.add_request(
                    r.prompt_token_ids, max_new_tokens=r.max_tokens, eos_token_id=-1
                )
                for r in requests
            ]
            results = {}
            while len(results) < len(ids):
                result = manager.get_result(timeout=1)
                if result is not None and result.is_finished():
                    results[result.request_id] = result
                elif result is None and not manager.is_running():
                    raise RuntimeError(
                        "transformers' continuous batching thread stopped early"
                    )
            wall = time.perf_counter() - start
            allocated = cache.cache_tensor.nbytes
            bytes_per_block = next(
                iter(cache.cache_allocators.values())
            ).bytes_per_block
        return (
            [list(results[i].generated_tokens) for i in ids],
            wall,
            allocated,
            bytes_per_block,
        )

    verbosity = transformers.logging.get_verbosity()
    # its info and warnings about flash attention on CPU
    transformers.logging.set_verbosity_error()
    try:
        session(
            warmup_workload(model.config.get_text_config().vocab_size), record=False
        )
        walls = []
        for _ in range(repeats):
            outputs, wall, allocated, per_block = session(workload, record=True)
            walls.append(wall)
    finally:
        transformers.logging.set_verbosity(verbosity)
    useful = sum(len(o) for o in outputs)
    notes = [
        "continuous: generate_batch takes one max_new_tokens for all requests; per-request lengths go "
        "through its manager (continuous_batching_context_manager + add_request), as generate_batch does",
        f"continuous: page_size {block_size}, num_blocks {num_blocks}; allocated = its cache tensor "
        f"(trash sectors included); peak = the most blocks its allocator's tables held ({peak['blocks']})",
    ]
    return SystemResult(
        "continuous",
        outputs,
        min(walls),
        useful,
        useful,
        peak["blocks"] * per_block,
        allocated,
        notes,
    )


def _record_peak_blocks(cache: object, peak: dict, lock: threading.Lock) -> None:
    """Wrap each allocator's allocate_cache_to_request to record the most blocks its tables hold.

    The wrapper runs in the generation thread, right after each allocation; it only reads.
    """
    for allocator in cache.cache_allocators.values():
        original = allocator.allocate_cache_to_request

        def wrapped(*args, _original=original, _allocator=allocator, **kwargs):
            result = _original(*args, **kwargs)
            used = len({b for table in _allocator.block_table.values() for b in table})
            with lock:
                peak["blocks"] = max(peak["blocks"], used)
            return result

        allocator.allocate_cache_to_request = wrapped


# ---- checks and the report -----------------------------------------------------------------------


def sample_indices(workload: list[Request], num_checked: int) -> list[int]:
    """The requests to check against unbatched generate: the longest prompt, the longest output, more."""
    longest_prompt = max(
        range(len(workload)), key=lambda i: len(workload[i].prompt_token_ids)
    )
    longest_output = max(range(len(workload)), key=lambda i: workload[i].max_tokens)
    chosen = list(
        dict.fromkeys([longest_prompt, longest_output, *range(len(workload))])
    )
    return sorted(chosen[: max(num_checked, 0)])


def check_minipaged(
    model: torch.nn.Module, workload: list[Request], outputs: list[list[int]], indices
) -> None:
    """Raise DisagreementError unless minipaged's tokens equal unbatched greedy generate's for `indices`."""
    for i in indices:
        r = workload[i]
        with torch.inference_mode():
            expected = model.generate(
                torch.tensor([r.prompt_token_ids]),
                attention_mask=torch.ones(
                    1, len(r.prompt_token_ids), dtype=torch.int64
                ),
                do_sample=False,
                max_new_tokens=r.max_tokens,
                eos_token_id=None,
                pad_token_id=PAD_ID,
            )[0, len(r.prompt_token_ids) :].tolist()
        if outputs[i] != expected:
            first = next(
                j
                for j, (a, b) in enumerate(zip(outputs[i], expected, strict=False))
                if a != b
            )
            raise DisagreementError(
                f"request {i} (prompt {len(r.prompt_token_ids)} tokens, {r.max_tokens} out): minipaged and "
                f"transformers' generate differ from token {first} on; refusing to report.\n"
                f"minipaged:    {outputs[i]}\ntransformers: {expected}"
            )


# where a step's time goes: (label, file, function, which time); "own" for a builtin's own
# time, "cumulative" for a function and all it calls
PROFILE_PARTS = (
    ("the whole `generate`", "minipaged/engine.py", "generate", "cumulative"),
    (
        "the model's linear layers (`torch._C._nn.linear`)",
        "~",
        "<built-in method torch._C._nn.linear>",
        "own",
    ),
    (
        "minipaged's attention function (write_kv + paged attention)",
        "minipaged/model_runner.py",
        "paged_attention_forward",
        "cumulative",
    ),
    (
        "of which `decode_attention`, a step's decode rows together",
        "minipaged/reference/attention.py",
        "decode_attention",
        "cumulative",
    ),
    (
        "building the step's inputs (`ModelRunner.prepare`)",
        "minipaged/model_runner.py",
        "prepare",
        "cumulative",
    ),
    (
        "sampling and bookkeeping after the model (`LLM._process`)",
        "minipaged/engine.py",
        "_process",
        "cumulative",
    ),
    ("of which sampling (`sample`)", "minipaged/sampling.py", "sample", "cumulative"),
    (
        "the scheduler (`schedule()`)",
        "minipaged/reference/scheduler.py",
        "schedule",
        "cumulative",
    ),
    (
        "the step's statistics (`LLM._record`)",
        "minipaged/engine.py",
        "_record",
        "cumulative",
    ),
)


def profile_minipaged(
    model: torch.nn.Module,
    workload: list[Request],
    block_size: int,
    num_gpu_blocks: int,
) -> list[dict]:
    """Where minipaged's time goes: one LLM.generate of the workload under cProfile, after a
    warm-up, split into PROFILE_PARTS. The profiler slows Python calls more than tensor work,
    so the shares, not the seconds, are what to read."""
    llm = LLM(
        model, backend="reference", block_size=block_size, num_gpu_blocks=num_gpu_blocks
    )
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in workload]
    params = [
        SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)
        for r in workload
    ]
    warm = warmup_workload(llm.vocab_size)
    llm.generate(
        [{"prompt_token_ids": r.prompt_token_ids} for r in warm],
        [SamplingParams(temperature=0.0, max_tokens=r.max_tokens) for r in warm],
        use_tqdm=False,
    )
    profiler = cProfile.Profile()
    profiler.enable()
    llm.generate(prompts, params, use_tqdm=False)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO()).stats
    found = {}
    for (path, _, name), (_, _, own, cumulative, _) in stats.items():
        for label, file, function, which in PROFILE_PARTS:
            if name == function and path.replace(os.sep, "/").endswith(file):
                seconds = own if which == "own" else cumulative
                found[label] = found.get(label, 0.0) + seconds
    total = found.get(PROFILE_PARTS[0][0]) or 1.0
    return [
        {
            "part": label,
            "seconds": found.get(label, 0.0),
            "share": found.get(label, 0.0) / total,
        }
        for label, *_ in PROFILE_PARTS
    ]


def per_round_ratios(rounds: dict[str, list[SystemResult]]) -> dict[str, dict]:
    """minipaged's tokens/s over each peer's, round by round, and their median and spread.

    Both ran in the same round, minutes apart at most, so a ratio cancels most of what the
    machine's load did to that round; the median of the rounds' ratios then resists one bad
    round. (Run after run in a fixed order, the ratios moved by 0.3 on this shared machine.)
    """
    ratios = {}
    for peer in PEERS:
        if "minipaged" not in rounds or peer not in rounds:
            continue
        each = [
            (mp.useful_tokens / mp.wall_s) / (other.useful_tokens / other.wall_s)
            for mp, other in zip(rounds["minipaged"], rounds[peer], strict=True)
        ]
        ratios[f"minipaged/{peer}"] = {
            "median": statistics.median(each),
            "min": min(each),
            "max": max(each),
            "per_round": each,
        }
    return ratios


def goals(rows: dict[str, dict], ratios: dict[str, dict]) -> list[dict]:
    """The project's goals beside the figures (stated, not asserted): speed as the median of the
    per-round ratios, memory from the median round's rows."""
    out = []
    for goal, peer, target in (
        (GOALS[0], "continuous", 1.5),
        (GOALS[1], "padded", 1.3),
    ):
        ratio = ratios.get(f"minipaged/{peer}")
        if ratio:
            value = (
                f"{ratio['median']:.2f}x (rounds {ratio['min']:.2f}-{ratio['max']:.2f})"
            )
            out.append({"goal": goal, "value": value, "met": ratio["median"] >= target})
    mp, pad = rows.get("minipaged"), rows.get("padded")
    if mp and pad:
        ratio = mp["kv_peak_bytes"] / pad["kv_peak_bytes"]
        out.append(
            {"goal": GOALS[2], "value": f"{ratio:.2f}x of padded", "met": ratio < 1.0}
        )
    return out


def run(args: argparse.Namespace, command: str = "") -> dict:
    """Build the workload, run each system, check minipaged's outputs, and assemble the report."""
    date = utc_now()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        hf_model = load_model(args.model, args.seed)
        vocab = hf_model.config.get_text_config().vocab_size
        workload = make_workload(
            args.num_requests,
            tuple(args.prompt_lens),
            tuple(args.output_lens),
            vocab,
            seed=args.seed,
        )
        per_block = args.block_size * bytes_per_token(hf_model)
        num_blocks = args.num_gpu_blocks
        # room for every request at once (and the 1% watermark): nobody preempts
        if num_blocks is None:
            num_blocks = sum(
                -(-(len(r.prompt_token_ids) + r.max_tokens) // args.block_size)
                for r in workload
            )
            num_blocks += -(-num_blocks // 99)
        rounds: dict[str, list[SystemResult]] = {s: [] for s in args.systems}
        runs = [(r, s) for r in range(args.rounds) for s in rotated(args.systems, r)]
        for round_, system in tqdm(
            runs, desc="runs", file=sys.stderr, disable=args.no_progress
        ):
            if system == "minipaged":
                result = run_minipaged(
                    load_model(args.model, args.seed),
                    workload,
                    args.block_size,
                    num_blocks,
                    args.repeats,
                )
                if round_ == 0:  # the same engine, the same tokens every round
                    check_minipaged(
                        hf_model,
                        workload,
                        result.outputs,
                        sample_indices(workload, args.num_checked),
                    )
            elif system == "padded":
                result = run_padded(hf_model, workload, args.repeats)
            else:
                result = run_continuous(
                    hf_model, workload, args.block_size, num_blocks, args.repeats
                )
            rounds[system].append(result)
        profile = (
            profile_minipaged(
                load_model(args.model, args.seed), workload, args.block_size, num_blocks
            )
            if args.profile
            else None
        )
    finally:
        torch.set_num_threads(previous_threads)
    # each system's median round (by wall time) stands for it in the table
    results = {
        system: sorted(rs, key=lambda r: r.wall_s)[(len(rs) - 1) // 2]
        for system, rs in rounds.items()
    }
    ratios = per_round_ratios(rounds)
    reference = results.get("minipaged")
    rows = {}
    for system, r in results.items():
        matches = (
            sum(a == b for a, b in zip(r.outputs, reference.outputs, strict=True))
            if reference
            else None
        )
        rows[system] = {
            "system": system,
            "useful_tokens": r.useful_tokens,
            "computed_tokens": r.computed_tokens,
            "wall_s": r.wall_s,
            "tokens_per_s": r.useful_tokens / r.wall_s,
            "kv_peak_bytes": r.kv_peak_bytes,
            "kv_allocated_bytes": r.kv_allocated_bytes,
            "matches_minipaged": matches,
        }
    prompt_lens = [len(r.prompt_token_ids) for r in workload]
    output_lens = [r.max_tokens for r in workload]
    return {
        "benchmark": BENCHMARK,
        "command": command,
        "machine": machine(),
        "date": date,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": args.threads,
        "config": {
            "model": args.model,
            "num_requests": args.num_requests,
            "prompt_lens": [min(prompt_lens), max(prompt_lens)],
            "output_lens": [min(output_lens), max(output_lens)],
            "block_size": args.block_size,
            "num_blocks": num_blocks,
            "bytes_per_block": per_block,
            "seed": args.seed,
            "repeats": args.repeats,
            "rounds": args.rounds,
            "checked_requests": sample_indices(workload, args.num_checked)
            if reference
            else [],
        },
        "rows": list(rows.values()),
        "ratios": ratios,
        "goals": goals(rows, ratios),
        "profile": profile,
        "notes": [note for r in results.values() for note in r.notes],
        "workload": [
            asdict(r) | {"prompt_len": len(r.prompt_token_ids)} for r in workload
        ]
        if args.json_workload
        else None,
    }


def format_table(report: dict) -> str:
    """The report as header lines, a Markdown table, the goals and the notes."""
    c = report["config"]
    lines = [
        f"command: {report['command']}",
        f"machine: {report['machine']}; torch {report['torch']}; transformers {report['transformers']}; "
        f"threads {report['threads']}; date {report['date']}",
        f"workload: {c['model']}, {c['num_requests']} requests, prompts {c['prompt_lens'][0]}-"
        f"{c['prompt_lens'][1]} tokens, outputs {c['output_lens'][0]}-{c['output_lens'][1]} tokens, greedy, "
        f"ignore_eos; block size {c['block_size']}, paged pools of {c['num_blocks']} blocks "
        f"({c['bytes_per_block'] / 2**10:.0f} KiB each); {c.get('rounds', 1)} round(s), the order rotated "
        f"each round, fastest of {c['repeats']} timed run(s) per system a round; the table shows each "
        "system's median round",
        f"checked: minipaged == transformers' unbatched generate, token for token, for requests "
        f"{c['checked_requests']}",
        "",
        "| system | useful tokens | tokens computed | wall s | useful tokens/s | KV peak MiB "
        "| KV allocated MiB | same tokens as minipaged |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    n = c["num_requests"]
    for r in report["rows"]:
        matches = (
            "-" if r["matches_minipaged"] is None else f"{r['matches_minipaged']}/{n}"
        )
        lines.append(
            f"| {SYSTEM_NAMES[r['system']]} | {r['useful_tokens']} | {r['computed_tokens']} "
            f"| {r['wall_s']:.2f} | {r['tokens_per_s']:.1f} | {r['kv_peak_bytes'] / 2**20:.2f} "
            f"| {r['kv_allocated_bytes'] / 2**20:.2f} | {matches} |"
        )
    if report.get("ratios"):
        lines += [
            "",
            "speed, minipaged's over each peer's, per round (median, min-max, each):",
        ]
        lines += [
            f"- {name}: {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}; "
            f"{', '.join(f'{x:.2f}' for x in r['per_round'])})"
            for name, r in report["ratios"].items()
        ]
    if report["goals"]:
        lines += ["", "goals (stated, not asserted):"]
        lines += [
            f"- {g['goal']}: {g['value']} ({'met' if g['met'] else 'not met'})"
            for g in report["goals"]
        ]
    lines += ["", "notes:"] + [f"- {note}" for note in report["notes"]]
    if report.get("profile"):
        lines += [
            "",
            "where minipaged's time goes: one generate of the workload under cProfile (read the "
            "shares: the profiler slows Python calls more than tensor work):",
            "",
            "| part | seconds | share |",
            "|---|--:|--:|",
        ]
        lines += [
            f"| {p['part']} | {p['seconds']:.2f} | {100 * p['share']:.1f}% |"
            for p in report["profile"]
        ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="small-llama",
        help="a preset or a local checkpoint directory",
    )
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--num-requests", type=positive, default=32)
    parser.add_argument(
        "--prompt-lens",
        nargs=2,
        type=positive,
        default=[16, 160],
        metavar=("MIN", "MAX"),
        help="(default 16 160)",
    )
    parser.add_argument(
        "--output-lens",
        nargs=2,
        type=positive,
        default=[8, 80],
        metavar=("MIN", "MAX"),
        help="(default 8 80)",
    )
    parser.add_argument("--block-size", type=positive, default=16)
    parser.add_argument(
        "--num-gpu-blocks",
        type=positive,
        default=None,
        help="blocks in each paged pool (default: enough for every request at once)",
    )
    parser.add_argument(
        "--threads",
        type=positive,
        default=1,
        help="torch intra-op threads (default 1: steadier on a shared machine; try the core count too)",
    )
    parser.add_argument(
        "--num-checked",
        type=int,
        default=4,
        help="requests checked against unbatched generate (default 4; 0 checks none)",
    )
    parser.add_argument(
        "--rounds",
        type=positive,
        default=3,
        help="rounds; each runs every system once, in an order rotated by one each round "
        "(default 3)",
    )
    parser.add_argument(
        "--repeats",
        type=positive,
        default=1,
        help="timed runs per system in a round, the fastest kept (default 1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile one minipaged generate of the workload (cProfile) and print its parts",
    )
    parser.add_argument(
        "--json", metavar="PATH", help="also write the report as JSON to PATH"
    )
    parser.add_argument(
        "--json-workload", action="store_true", help="include the workload in the JSON"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar on stderr"
    )
    args = parser.parse_args(argv)
    for name in ("prompt_lens", "output_lens"):
        low, high = getattr(args, name)
        if low > high or (name == "prompt_lens" and low < 2):
            parser.error(
                f"--{name.replace('_', '-')} must be MIN <= MAX (prompts at least 2), got {low} {high}"
            )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON; on a wrong answer report nothing and return 1."""
    return bench_common.main(
        "engine_throughput.py", argv, parse_args, run, format_table
    )


if __name__ == "__main__":
    raise SystemExit(main())
