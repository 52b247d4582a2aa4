"""Block size: internal fragmentation against the cost of many small blocks (vLLM paper section 7.2).

OS idea: the page size is a trade. Large pages waste the unused tail of a process's last page
(internal fragmentation); small pages need longer page tables and more work per byte to translate
(OSTEP ch. 18-20). KV counterpart: vLLM paper section 7.2, Fig. 18b: with large blocks a short
sequence leaves most of its last block empty; with small blocks the attention kernel reads many
small pieces and cannot use the GPU's parallelism well. vLLM picks 16.

Three measurements, one row per point:

- part "waste": the internal fragmentation of paged allocation, computed from the lengths of a
  ShareGPT-like and an Alpaca-like workload (minipaged.workloads): a sequence of `len` tokens holds
  `ceil(len / b)` blocks, so it wastes `ceil(len / b) * b - len` slots, all in its last block. Rows:
  {"part", "block_size", "workload", "num_seqs", "mean_len", "allocated_slots", "wasted_slots",
  "waste_fraction"}, where waste_fraction = wasted_slots / allocated_slots at the sequences' final
  lengths (prompt + output).
- part "time": the engine (tiny-llama, on the run's backend and device: the reference on the CPU by
  default) decoding a fixed batch at each block size: the median wall time of one decode step and of
  its model part (block_size_time.py, which lists the rows' keys). On a CPU the cost of small blocks
  is bookkeeping and gather indexing, not GPU kernel occupancy. This is the only part that runs
  tensors, so the only one that `backend` and `device` change.
- part "load": paged allocation serving each workload on a fixed KV budget with the null-model
  simulator, at each block size: how many requests run at once, and where the memory goes
  (block_size_load.py, which lists the rows' keys).
"""

from __future__ import annotations

from dataclasses import dataclass

from minipaged.experiments import ExperimentResult, check_run_args, check_tensor_args
from minipaged.experiments.block_size_load import load_rows
from minipaged.experiments.block_size_time import MODEL, time_rows
from minipaged.reference.block_table import num_blocks_for
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
    # passes over the block sizes, interleaved so that noise spreads over all of them
    rounds: int
    load_block_sizes: tuple[int, ...]  # block sizes of the load part
    # simulated seconds served per workload, for the load part
    load_end: dict[str, float]
    load_warmup: dict[str, float]  # ... of which left out at the start


SCALES = {
    "small": Scale(
        num_requests=1_000,
        time_block_sizes=(1, 16, 256),
        prompt_lens=(64, 96),
        decode_steps=6,
        rounds=1,
        load_block_sizes=(1, 16, 256),
        load_end={"sharegpt-like": 45.0, "alpaca-like": 15.0},
        load_warmup={"sharegpt-like": 15.0, "alpaca-like": 5.0},
    ),
    "full": Scale(
        num_requests=10_000,
        time_block_sizes=BLOCK_SIZES,
        prompt_lens=tuple(range(256, 512, 32)),
        decode_steps=32,
        rounds=3,
        load_block_sizes=BLOCK_SIZES,
        # the sharing experiment's windows
        load_end={"sharegpt-like": 300.0, "alpaca-like": 120.0},
        load_warmup={"sharegpt-like": 50.0, "alpaca-like": 20.0},
    ),
}


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
        # prompt + output, final length
        lengths = [r.total_len for r in make(num_requests, seed=seed)]
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


def run(
    scale: str = "full",
    seed: int = 0,
    progress: bool = True,
    *,
    backend: str = "reference",
    device: str = "cpu",
) -> ExperimentResult:
    """Internal fragmentation, decode time and batch size at block sizes 1 to 256 (paper section 7.2).

    Args:
        scale: "full" (every block size in every part, about a minute on a 2-core CPU) or "small"
            (block sizes 1, 16 and 256 in the time and load parts, shorter simulations; seconds).
        seed: the workloads' lengths, the model's random weights and the prompts' tokens.
        progress: show a tqdm bar for the time part.
        backend: the engine's kernels in the time part, "reference" or "triton" (on "cpu" through
            Triton's interpreter: minutes, not seconds).
        device: where the time part's model and KV pool live, "cpu" or "cuda[:N]".

    Raises:
        ValueError: for a scale other than "small" or "full", a negative seed, an unknown backend or a
            device that is not "cpu" or a CUDA GPU present here; all before any work.
    """
    check_run_args(scale, seed, SCALES)
    check_tensor_args(backend, device)
    config = SCALES[scale]
    rows = waste_rows(config.num_requests, seed) + time_rows(
        config, seed, progress, backend, device
    )
    rows += load_rows(
        config.load_block_sizes, config.load_end, config.load_warmup, seed, progress
    )
    settings = {"scale": scale, "seed": seed, "backend": backend, "device": device}
    return ExperimentResult(NAME, rows, dict(PAPER), settings)


def plot(result: ExperimentResult, path) -> None:
    """Three panels: (a) wasted share of the allocated slots, (b) milliseconds per decode step, (c) the
    requests per second the KV budget serves, relative to block size 1."""
    from minipaged.experiments.plotting import (
        COLORS,
        block_size_axis,
        legend,
        new_figure,
        savefig,
    )

    fig, (waste_ax, time_ax, load_ax) = new_figure(
        3, title="Block size (vLLM paper section 7.2, Fig. 18b)"
    )
    for workload in WORKLOADS:
        rows = [
            r for r in result.rows if r["part"] == "waste" and r["workload"] == workload
        ]
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
    # JSON older than "settings": the CPU, reference
    device = result.settings.get("device", "cpu")
    where = f"{'CPU' if device == 'cpu' else device}, {result.settings.get('backend', 'reference')}"
    time_ax.set_title(f"(b) decode step, {model}, {where}")
    legend(time_ax)
    for workload in WORKLOADS:
        rows = [
            r for r in result.rows if r["part"] == "load" and r["workload"] == workload
        ]
        if not rows:
            continue
        # the smallest block size: no internal fragmentation at 1
        base = rows[0]["throughput_rps"]
        load_ax.plot(
            [r["block_size"] for r in rows],
            [r["throughput_rps"] / base for r in rows],
            "o-",
            color=COLORS[workload.removesuffix("-like")],
            label=f"{workload}, {rows[0]['rate']:g} req/s offered",
        )
    block_size_axis(
        load_ax, sorted({r["block_size"] for r in result.rows if r["part"] == "load"})
    )
    load_ax.set_ylim(0, 1.05)
    load_ax.set_ylabel("requests/s served, relative to block 1")
    load_ax.set_title("(c) capacity of a 15,000-slot budget")
    legend(load_ax)
    savefig(fig, path)


__all__ = [
    "BLOCK_SIZES",
    "PAPER",
    "internal_fragmentation",
    "load_rows",
    "plot",
    "run",
    "waste_rows",
]
