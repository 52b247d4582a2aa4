"""Block size: internal fragmentation against the cost of many small blocks (vLLM paper section 7.2).

OS idea: the page size is a trade. Large pages waste the unused tail of a process's last page
(internal fragmentation); small pages need longer page tables and more work per byte to translate
(OSTEP ch. 18-20). KV counterpart: vLLM paper section 7.2, Fig. 18b: with large blocks a short
sequence leaves most of its last block empty; with small blocks the attention kernel reads many
small pieces and cannot use the GPU's parallelism well. vLLM picks 16.

Two measurements, one row per point:

- part "waste": the internal fragmentation of paged allocation, computed from the lengths of a
  ShareGPT-like and an Alpaca-like workload (minipaged.workloads): a sequence of `len` tokens holds
  `ceil(len / b)` blocks, so it wastes `ceil(len / b) * b - len` slots, all in its last block. Rows:
  {"part", "block_size", "workload", "num_seqs", "mean_len", "allocated_slots", "wasted_slots",
  "waste_fraction"}, where waste_fraction = wasted_slots / allocated_slots at the sequences' final
  lengths (prompt + output).
- part "time": the engine (tiny-llama, reference backend, on this machine's CPU) decoding a fixed
  batch at each block size. Rows: {"part", "block_size", "model", "num_seqs", "mean_context_len",
  "decode_steps", "seconds_per_step", "model_seconds_per_step"}: the median wall time of one decode
  step (`LLM.step`: schedule, append slots, model, sample) and of its model part alone
  (`ModelRunner.execute`: build the block tables and slot mapping, forward with paged attention).
  On a CPU the cost of small blocks is bookkeeping and gather indexing, not GPU kernel occupancy.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from minipaged.demo import torch_threads
from minipaged.engine import LLM
from minipaged.experiments import ExperimentResult, check_run_args
from minipaged.presets import BYTE_OFFSET, VOCAB_SIZE, load_preset
from minipaged.reference.block_table import num_blocks_for
from minipaged.sampling import SamplingParams
from minipaged.workloads import alpaca_like, sharegpt_like

NAME = "block-size"
BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WORKLOADS = {"sharegpt-like": sharegpt_like, "alpaca-like": alpaca_like}

PAPER = {
    "section": "7.2",
    "figure": "18b",
    "best_block_sizes": {"ShareGPT": "16-128", "Alpaca": "16-32"},
    "default_block_size": 16,
    "finding": (
        "On ShareGPT, block sizes 16 to 128 perform best; on Alpaca 16 and 32 work well and larger "
        "blocks degrade performance markedly, because the sequences become shorter than a block. "
        "Large blocks raise internal fragmentation (and share less); small blocks keep the attention "
        "kernel from using the GPU's parallelism. Block size 16 is large enough to use the GPU well and "
        "small enough to avoid significant internal fragmentation in most workloads: vLLM's default."
    ),
}


@dataclass(frozen=True)
class Scale:
    """How much work one run does; "small" keeps the rows and keys of "full"."""

    num_requests: int  # lengths drawn per workload, for the waste part
    time_block_sizes: tuple[int, ...]  # block sizes of the time part
    prompt_lens: tuple[int, ...]  # one sequence of the decoded batch per length
    decode_steps: int  # decode steps timed per block size and round
    rounds: int  # passes over the block sizes, interleaved so that noise spreads over all of them


SCALES = {
    "small": Scale(1_000, (1, 16, 256), (64, 96), 6, 1),
    "full": Scale(10_000, BLOCK_SIZES, tuple(range(256, 512, 32)), 32, 3),
}
MODEL = "tiny-llama"


def internal_fragmentation(lengths: list[int], block_size: int) -> tuple[int, int]:
    """(allocated slots, wasted slots) when each sequence of `lengths` tokens holds whole blocks.

    Example: lengths [5, 16, 17] in blocks of 16 take 1 + 1 + 2 blocks = 64 slots, of which
    11 + 0 + 15 = 26 hold no token.
    """
    allocated = sum(num_blocks_for(n, block_size) * block_size for n in lengths)
    return allocated, allocated - sum(lengths)


def waste_rows(num_requests: int, seed: int, block_sizes=BLOCK_SIZES) -> list[dict]:
    """The "waste" rows: internal fragmentation at each block size, for each workload."""
    rows = []
    for workload, make in WORKLOADS.items():
        lengths = [r.total_len for r in make(num_requests, seed=seed)]  # prompt + output, final length
        for b in block_sizes:
            allocated, wasted = internal_fragmentation(lengths, b)
            rows.append(
                {
                    "part": "waste",
                    "block_size": b,
                    "workload": workload,
                    "num_seqs": len(lengths),
                    "mean_len": sum(lengths) / len(lengths),
                    "allocated_slots": allocated,
                    "wasted_slots": wasted,
                    "waste_fraction": wasted / allocated,
                }
            )
    return rows


def decode_step_times(
    model: torch.nn.Module, block_size: int, prompts: list[list[int]], decode_steps: int, seed: int = 0
) -> tuple[list[float], list[float]]:
    """Seconds of each decode step of a batch, and of its model part (ModelRunner.execute).

    The batch is prefilled in one step (not timed), then decodes `decode_steps` tokens per sequence
    (greedy, `ignore_eos`), every sequence in every step. The pool holds exactly what the batch needs,
    so nothing is preempted, and the step's token budget holds every prompt, so one step prefills them.
    """
    need = sum(num_blocks_for(len(p) + decode_steps, block_size) for p in prompts)
    budget = max(2048, sum(len(p) for p in prompts))
    llm = LLM(
        model,
        block_size=block_size,
        num_gpu_blocks=need,
        num_cpu_blocks=0,
        seed=seed,
        watermark=0.0,
        max_num_batched_tokens=budget,
    )
    model_times: list[float] = []
    execute = llm.runner.execute

    def timed_execute(out):  # the model part of a step, timed inside the engine's own call
        start = time.perf_counter()
        logits = execute(out)
        model_times.append(time.perf_counter() - start)
        return logits

    llm.runner.execute = timed_execute
    params = SamplingParams(temperature=0.0, max_tokens=decode_steps + 1, ignore_eos=True)
    for prompt in prompts:
        llm.add_request({"prompt_token_ids": prompt}, params)
    llm.step()  # the prefill of every prompt, and the first token
    step_times = []
    while llm.has_unfinished_requests():
        start = time.perf_counter()
        llm.step()
        step_times.append(time.perf_counter() - start)
    if len(step_times) != decode_steps or llm.stats.num_preemptions != {"recompute": 0, "swap": 0}:
        raise RuntimeError(
            f"expected {decode_steps} decode steps and no preemption, got {len(step_times)} steps"
        )
    return step_times, model_times[1:]


def time_rows(scale: Scale, seed: int, progress: bool) -> list[dict]:
    """The "time" rows: median seconds per decode step at each block size (tiny-llama, CPU)."""
    model = load_preset(MODEL, seed)
    generator = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(BYTE_OFFSET, VOCAB_SIZE, (n,), generator=generator).tolist() for n in scale.prompt_lens
    ]
    steps: dict[int, list[float]] = {b: [] for b in scale.time_block_sizes}
    model_steps: dict[int, list[float]] = {b: [] for b in scale.time_block_sizes}
    total = scale.rounds * len(scale.time_block_sizes)
    with torch_threads(1), tqdm(total=total, desc=f"{NAME}: decode steps", disable=not progress) as bar:
        decode_step_times(model, 16, prompts[:1], 2, seed)  # warm up: first calls allocate and dispatch
        for _ in range(scale.rounds):
            for b in scale.time_block_sizes:
                step_times, model_times = decode_step_times(model, b, prompts, scale.decode_steps, seed)
                steps[b] += step_times
                model_steps[b] += model_times
                bar.update(1)
    mean_prompt = sum(scale.prompt_lens) / len(scale.prompt_lens)
    return [
        {
            "part": "time",
            "block_size": b,
            "model": MODEL,
            "num_seqs": len(prompts),
            "mean_context_len": mean_prompt + (scale.decode_steps + 1) / 2,
            "decode_steps": len(steps[b]),
            "seconds_per_step": statistics.median(steps[b]),
            "model_seconds_per_step": statistics.median(model_steps[b]),
        }
        for b in scale.time_block_sizes
    ]


def run(scale: str = "full", seed: int = 0, progress: bool = True) -> ExperimentResult:
    """Internal fragmentation and decode time at block sizes 1 to 256 (paper section 7.2).

    Args:
        scale: "full" (every block size in both parts, about 10 s on a 2-core CPU) or "small" (block
            sizes 1, 16 and 256 in the time part, about a second).
        seed: the workloads' lengths, the model's random weights and the prompts' tokens.
        progress: show a tqdm bar for the time part.

    Raises:
        ValueError: for a scale other than "small" or "full", or a negative seed.
    """
    check_run_args(scale, seed, SCALES)
    config = SCALES[scale]
    rows = waste_rows(config.num_requests, seed) + time_rows(config, seed, progress)
    return ExperimentResult(NAME, rows, dict(PAPER))


def plot(result: ExperimentResult, path) -> None:
    """Two panels: (a) wasted share of the allocated slots, (b) milliseconds per decode step."""
    from minipaged.experiments.plotting import COLORS, block_size_axis, legend, new_figure, savefig

    fig, (waste_ax, time_ax) = new_figure(2, title="Block size (vLLM paper section 7.2, Fig. 18b)")
    for workload in WORKLOADS:
        rows = [r for r in result.rows if r["part"] == "waste" and r["workload"] == workload]
        color = COLORS[workload.removesuffix("-like")]
        waste_ax.plot(
            [r["block_size"] for r in rows],
            [100 * r["waste_fraction"] for r in rows],
            "o-",
            color=color,
            label=workload,
        )
    block_size_axis(waste_ax, BLOCK_SIZES)
    waste_ax.set_ylabel("internal fragmentation (% of slots)")
    waste_ax.set_title("(a) memory wasted in last blocks")
    legend(waste_ax)
    rows = [r for r in result.rows if r["part"] == "time"]
    sizes = [r["block_size"] for r in rows]
    time_ax.plot(
        sizes,
        [1e3 * r["seconds_per_step"] for r in rows],
        "o-",
        color=COLORS["measured"],
        label="engine step",
    )
    time_ax.plot(
        sizes,
        [1e3 * r["model_seconds_per_step"] for r in rows],
        "s--",
        color=COLORS["model"],
        label="model part",
    )
    block_size_axis(time_ax, sizes)
    time_ax.set_ylim(bottom=0)
    time_ax.set_ylabel("ms per decode step (median)")
    model = rows[0]["model"] if rows else MODEL
    time_ax.set_title(f"(b) decode step, {model}, CPU")
    legend(time_ax)
    savefig(fig, path)


__all__ = ["BLOCK_SIZES", "PAPER", "internal_fragmentation", "plot", "run", "waste_rows"]
