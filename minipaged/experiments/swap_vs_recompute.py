"""Restoring a preempted sequence: swap its blocks back, or recompute them (vLLM paper section 7.3).

OS idea: an evicted page comes back either from swap space (a disk read) or, when it is clean and
can be rebuilt, by recreating it (a file-backed page re-read, a zero page refilled); which is cheaper
depends on the cost of the transfer against the cost of the rebuild (OSTEP ch. 21-22). KV
counterpart: vLLM paper section 7.3, Fig. 19a: swapping copies a sequence's KV blocks to host memory
and back over PCIe, one transfer per block, so small blocks make many small, slow transfers;
recomputing runs the prefill of its tokens again, whose cost does not depend on the block size.

What is measured here, with real tensors, for a sequence of `seq_len` tokens on tiny-llama, at each
block size (one row each):

- recompute_s: one engine step that prefills the sequence (`LLM.step`: admit and allocate, forward
  through the model with paged attention, sample), what recomputation costs when the sequence is
  admitted again;
- swap_out_s, swap_in_s: the engine's own swap (`ModelRunner.move_blocks` with the block manager's
  swap_out / swap_in pairs), which calls the backend's `swap_blocks` once per layer and per K and V
  pool; the reference's swap_blocks is one gather and one scatter per pool, however many blocks;
- swap_out_per_block_s, swap_in_per_block_s: the same pairs copied one block at a time
  (`swap_blocks_per_block`), the shape of the paper's implementation (one cudaMemcpyAsync per block);
- blocks: the blocks moved each way, `ceil(seq_len / block_size)`; bytes: what they hold each way,
  `blocks * kv_cache_bytes_per_block(...)`, the unfilled tail of the last block included.

Times are medians of `repeats` in seconds. `run(backend=..., device=...)` picks the kernels (the
engine's and its swap_blocks) and where the model and the device pool live; the host pool stays in CPU
memory (pinned on CUDA). On a CPU-only machine both pools are CPU tensors: there is no PCIe link, and
what the per-block copies show is the fixed cost of each copy, not bus bandwidth.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from minipaged.config import kv_cache_bytes_per_block
from minipaged.demo import torch_threads
from minipaged.engine import LLM
from minipaged.experiments import (
    ExperimentResult,
    check_run_args,
    check_tensor_args,
    synchronize,
)
from minipaged.model_runner import ModelRunner, kv_shape
from minipaged.presets import BYTE_OFFSET, VOCAB_SIZE, load_preset
from minipaged.reference.block_table import num_blocks_for
from minipaged.reference.scheduler import SchedulerOutput
from minipaged.sampling import SamplingParams

NAME = "swap-vs-recompute"
BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MODEL = "tiny-llama"

PAPER = {
    "section": "7.3",
    "figure": "19a",
    "comparable_block_sizes": "16-64",
    "recompute_overhead_at_most": "20% more than swapping",
    "finding": (
        "Swapping is slow at small block sizes: many small transfers between CPU and GPU use the "
        "PCIe bandwidth badly. Recomputation does not touch the KV blocks, so its cost is constant "
        "in the block size. Recomputation is the cheaper at small blocks, swapping at large ones, "
        "though recomputation never costs more than about 20% above swapping; for medium block "
        "sizes (16 to 64) the two are comparable. (Qualitative reading of Fig. 19a.)"
    ),
}


@dataclass(frozen=True)
class Scale:
    """How much work one run does; "small" keeps the rows and keys of "full"."""

    seq_len: int  # tokens of the preempted sequence
    block_sizes: tuple[int, ...]
    repeats: int  # timings per quantity; the median is reported


SCALES = {
    "small": Scale(128, (1, 4, 16, 64, 256), 3),
    "full": Scale(512, BLOCK_SIZES, 25),
}


def swap_blocks_per_block(
    src: torch.Tensor, dst: torch.Tensor, block_mapping: list[tuple[int, int]]
) -> None:
    """Copy blocks one pair at a time: one copy per block, as vLLM's first swap_blocks did.

    vLLM (2023) looped over the (src, dst) pairs and issued one cudaMemcpyAsync per block, per layer
    and per K and V pool; the reference's `swap_blocks` instead gathers all blocks in one copy.

    Args:
        src: `[num_src_blocks, block_size, num_kv_heads, head_dim]`, read.
        dst: `[num_dst_blocks, block_size, num_kv_heads, head_dim]`, written in place.
        block_mapping: (src block, dst block) pairs.
    """
    for s, d in block_mapping:
        # [block_size, num_kv_heads, head_dim]: one block, one transfer
        dst[d].copy_(src[s])


def _per_block(runner: ModelRunner, mapping: list[tuple[int, int]], out: bool) -> None:
    """swap_blocks_per_block over every layer's K and V pool, in the direction of a swap out or in."""
    device_pools = runner.k_caches + runner.v_caches
    host_pools = runner.host_k_caches + runner.host_v_caches
    for device_pool, host_pool in zip(device_pools, host_pools, strict=True):
        src, dst = (device_pool, host_pool) if out else (host_pool, device_pool)
        swap_blocks_per_block(src, dst, mapping)


def _timed(device: str, fn, *args) -> float:
    """Wall seconds of `fn(*args)`, including the work it queued on `device`."""
    synchronize(device)
    start = time.perf_counter()
    fn(*args)
    synchronize(device)
    return time.perf_counter() - start


def _sequence_kv(
    runner: ModelRunner, block_ids: list[int], seq_len: int
) -> torch.Tensor:
    """The sequence's K and V in every layer, read through its block table, for the check."""
    # [2 * layers, num_blocks, block_size, kv, dim]
    pools = torch.stack(runner.k_caches + runner.v_caches)
    # [2 * layers, seq_len, kv, dim]
    return pools[:, block_ids].flatten(1, 2)[:, :seq_len].clone()


def measure(
    model: torch.nn.Module,
    block_size: int,
    tokens: list[int],
    repeats: int,
    seed: int = 0,
    *,
    backend: str = "reference",
    device: str = "cpu",
) -> dict[str, object]:
    """One row: the times to recompute and to swap out and in the KV of `tokens` at `block_size`.

    The engine runs on `backend` and `device` (its model, its device pool and its swap_blocks); the
    per-block copies move the same pairs between the same pools.

    Raises:
        RuntimeError: if the sequence's K/V is not the same after a swap out and in (a wrong copy
            is not timed).
    """
    seq_len = len(tokens)
    # the sequence, and room for a prefill
    num_blocks = 2 * num_blocks_for(seq_len + 1, block_size) + 1
    llm = LLM(
        model,
        block_size=block_size,
        num_gpu_blocks=num_blocks,
        num_cpu_blocks=num_blocks,
        preemption_mode="swap",
        backend=backend,
        device=device,
        seed=seed,
        watermark=0.0,
        max_num_batched_tokens=max(2048, seq_len),
    )
    prompt = {"prompt_token_ids": tokens}
    recompute = []
    # admit, prefill all seq_len tokens, sample one: what a recomputation costs
    for _ in range(repeats):
        llm.add_request(
            prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        )
        recompute.append(_timed(device, llm.step))
    llm.add_request(
        prompt, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    )
    # prefilled: the sequence holds ceil(seq_len / block_size) blocks of real K/V
    llm.step()
    group, manager, runner = llm.scheduler.running[0], llm.block_manager, llm.runner
    seq = group.seqs[0]
    before = _sequence_kv(runner, manager.get_block_table(seq).block_ids, seq_len)
    times: dict[str, list[float]] = {
        k: [] for k in ("out", "in", "out_per_block", "in_per_block")
    }
    for r in range(repeats):
        # (device, host): the policy decides, not timed
        out_pairs = manager.swap_out(group)
        batched = (runner.move_blocks, SchedulerOutput(blocks_to_swap_out=out_pairs))
        per_block = (_per_block, runner, out_pairs, True)
        # alternate which goes first: neither always finds warm caches
        for key, call in [("out", batched), ("out_per_block", per_block)][
            :: 1 if r % 2 else -1
        ]:
            times[key].append(_timed(device, *call))
        in_pairs = manager.swap_in(group)  # (host, device)
        batched = (runner.move_blocks, SchedulerOutput(blocks_to_swap_in=in_pairs))
        per_block = (_per_block, runner, in_pairs, False)
        for key, call in [("in", batched), ("in_per_block", per_block)][
            :: 1 if r % 2 else -1
        ]:
            times[key].append(_timed(device, *call))
    after = _sequence_kv(runner, manager.get_block_table(seq).block_ids, seq_len)
    if not torch.equal(before, after):
        raise RuntimeError(
            f"block size {block_size}: the K/V after a swap out and in differs from before"
        )
    num_layers, num_kv_heads, head_dim = kv_shape(runner.model.config)
    block_bytes = kv_cache_bytes_per_block(
        block_size,
        num_layers,
        num_kv_heads,
        head_dim,
        runner.k_caches[0].element_size(),
    )
    median = statistics.median
    return {
        "block_size": block_size,
        "seq_len": seq_len,
        "blocks": len(out_pairs),
        "bytes": len(out_pairs) * block_bytes,
        "swap_out_s": median(times["out"]),
        "swap_in_s": median(times["in"]),
        "swap_out_per_block_s": median(times["out_per_block"]),
        "swap_in_per_block_s": median(times["in_per_block"]),
        "recompute_s": median(recompute),
    }


def run(
    scale: str = "full",
    seed: int = 0,
    progress: bool = True,
    *,
    backend: str = "reference",
    device: str = "cpu",
) -> ExperimentResult:
    """Swap out and in against recompute, block sizes 1 to 256 (paper section 7.3, Fig. 19a).

    Args:
        scale: "full" (512 tokens, every block size, 25 repeats; about 5 s on a 2-core CPU) or
            "small" (128 tokens, block sizes 1, 4, 16, 64, 256, 3 repeats; a second or two).
        seed: the model's random weights and the sequence's tokens.
        progress: show a tqdm bar over the block sizes.
        backend: the engine's kernels, "reference" or "triton" (on "cpu" through Triton's interpreter:
            minutes, not seconds).
        device: where the model and the device pool live, "cpu" or "cuda[:N]".

    Raises:
        ValueError: for a scale other than "small" or "full", a negative seed, an unknown backend or a
            device that is not "cpu" or a CUDA GPU present here; all before any work.
    """
    check_run_args(scale, seed, SCALES)
    check_tensor_args(backend, device)
    config = SCALES[scale]
    model = load_preset(MODEL, seed)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(
        BYTE_OFFSET, VOCAB_SIZE, (config.seq_len,), generator=generator
    ).tolist()
    rows = []
    with torch_threads(1):
        # warm up: first calls allocate
        measure(model, 16, tokens, 2, seed, backend=backend, device=device)
        for b in tqdm(config.block_sizes, desc=NAME, disable=not progress):
            row = measure(
                model, b, tokens, config.repeats, seed, backend=backend, device=device
            )
            rows.append({"model": MODEL, **row})
    settings = {"scale": scale, "seed": seed, "backend": backend, "device": device}
    return ExperimentResult(NAME, rows, dict(PAPER), settings)


def plot(result: ExperimentResult, path) -> None:
    """Milliseconds to restore the sequence against the block size, log scale (like Fig. 19a)."""
    from minipaged.experiments.plotting import (
        COLORS,
        block_size_axis,
        legend,
        new_figure,
        savefig,
    )

    rows = result.rows
    sizes = [r["block_size"] for r in rows]

    def ms(*keys: str) -> list[float]:
        return [1e3 * sum(r[k] for k in keys) for r in rows]

    seq_len = rows[0]["seq_len"] if rows else "?"
    model = rows[0].get("model", MODEL) if rows else MODEL
    # JSON older than "settings": the CPU, reference
    device = result.settings.get("device", "cpu")
    where = f"{'a CPU' if device == 'cpu' else device}, {result.settings.get('backend', 'reference')}"
    title = f"Restoring {seq_len} tokens of {model} ({where}): swap vs recompute (cf. Fig. 19a)"
    fig, (ax,) = new_figure(1, title=title, panel_size=(8.0, 4.0))
    ax.plot(
        sizes,
        ms("recompute_s"),
        "o-",
        color=COLORS["recompute"],
        label="recompute (prefill step)",
    )
    ax.plot(
        sizes,
        ms("swap_in_per_block_s"),
        "v-",
        color=COLORS["swap_in"],
        label="swap in, per block",
    )
    ax.plot(
        sizes,
        ms("swap_out_per_block_s"),
        "^-",
        color=COLORS["swap_out"],
        label="swap out, per block",
    )
    ax.plot(
        sizes,
        ms("swap_in_per_block_s", "swap_out_per_block_s"),
        "s-",
        color=COLORS["swap_total"],
        label="swap in + out, per block",
    )
    ax.plot(
        sizes,
        ms("swap_in_s", "swap_out_s"),
        "s--",
        color=COLORS["batched"],
        label="swap in + out, swap_blocks",
    )
    ax.set_yscale("log")
    block_size_axis(ax, sizes)
    ax.set_ylabel("time (ms, median)")
    legend(ax, outside=True)
    savefig(fig, path)


__all__ = ["BLOCK_SIZES", "PAPER", "measure", "plot", "run", "swap_blocks_per_block"]
