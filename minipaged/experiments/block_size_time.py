"""Block size, the time part: one decode step of the engine at each block size, on this machine.

OS idea: small pages mean long page tables and a translation per few bytes; every access pays for
the walk (OSTEP ch. 19-20, TLBs and smaller tables). KV counterpart: vLLM paper section 7.2, Fig. 18b:
with small blocks the attention kernel reads many small pieces. On a CPU there is no GPU parallelism
to underuse; what small blocks cost here is bookkeeping: the block manager allocates a block every
`b` tokens, the runner turns block tables of `ceil(len / b)` entries into tensors at every step, and
the reference attention gathers K and V through that many indices.

The part "time" of the block-size experiment (block_size.py): `LLM("tiny-llama", block_size=b,
backend=backend, device=device)` decodes a fixed batch (the run's backend and device: the reference on
the CPU by default); rows {"part", "block_size", "model", "num_seqs", "mean_context_len",
"decode_steps", "seconds_per_step", "model_seconds_per_step"}: the median wall time of one decode
step (`LLM.step`: schedule, append slots, model, sample) and of its model part alone
(`ModelRunner.execute`: build the block tables and slot mapping, forward with paged attention).
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm import tqdm

from minipaged.demo import torch_threads
from minipaged.engine import LLM
from minipaged.experiments import synchronize
from minipaged.presets import BYTE_OFFSET, VOCAB_SIZE, load_preset
from minipaged.reference.block_table import num_blocks_for
from minipaged.sampling import SamplingParams

MODEL = "tiny-llama"


def decode_step_times(
    model: torch.nn.Module,
    block_size: int,
    prompts: list[list[int]],
    decode_steps: int,
    seed: int = 0,
    *,
    backend: str = "reference",
    device: str = "cpu",
) -> tuple[list[float], list[float]]:
    """Seconds of each decode step of a batch, and of its model part (ModelRunner.execute).

    The batch is prefilled in one step (not timed), then decodes `decode_steps` tokens per sequence
    (greedy, `ignore_eos`), every sequence in every step. The pool holds exactly what the batch needs,
    so nothing is preempted, and the step's token budget holds every prompt, so one step prefills them.
    The engine runs on `backend` and `device`; on CUDA each time waits for the step's kernels.
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
        backend=backend,
        device=device,
    )
    model_times: list[float] = []
    execute = llm.runner.execute

    # the model part of a step, timed inside the engine's own call
    def timed_execute(out):
        synchronize(device)
        start = time.perf_counter()
        logits = execute(out)
        synchronize(device)
        model_times.append(time.perf_counter() - start)
        return logits

    llm.runner.execute = timed_execute
    params = SamplingParams(
        temperature=0.0, max_tokens=decode_steps + 1, ignore_eos=True
    )
    for prompt in prompts:
        llm.add_request({"prompt_token_ids": prompt}, params)
    llm.step()  # the prefill of every prompt, and the first token
    step_times = []
    while llm.has_unfinished_requests():
        synchronize(device)
        start = time.perf_counter()
        llm.step()
        synchronize(device)
        step_times.append(time.perf_counter() - start)
    if len(step_times) != decode_steps or llm.stats.num_preemptions != {
        "recompute": 0,
        "swap": 0,
    }:
        raise RuntimeError(
            f"expected {decode_steps} decode steps and no preemption, got {len(step_times)} steps"
        )
    return step_times, model_times[1:]


def time_rows(
    scale, seed: int, progress: bool, backend: str = "reference", device: str = "cpu"
) -> list[dict]:
    """The "time" rows: median seconds per decode step at each block size (tiny-llama).

    `scale` is a block_size.Scale: its time_block_sizes, prompt_lens, decode_steps and rounds. The
    engine runs on `backend` and `device` (checked by the caller, block_size.run).
    """
    model = load_preset(MODEL, seed)
    generator = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(BYTE_OFFSET, VOCAB_SIZE, (n,), generator=generator).tolist()
        for n in scale.prompt_lens
    ]
    steps: dict[int, list[float]] = {b: [] for b in scale.time_block_sizes}
    model_steps: dict[int, list[float]] = {b: [] for b in scale.time_block_sizes}
    total = scale.rounds * len(scale.time_block_sizes)
    with (
        torch_threads(1),
        tqdm(total=total, desc="block-size: decode steps", disable=not progress) as bar,
    ):
        engine = {"backend": backend, "device": device}
        # warm up: first calls allocate
        decode_step_times(model, 16, prompts[:1], 2, seed, **engine)
        for _ in range(scale.rounds):
            for b in scale.time_block_sizes:
                step_times, model_times = decode_step_times(
                    model, b, prompts, scale.decode_steps, seed, **engine
                )
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


__all__ = ["MODEL", "decode_step_times", "time_rows"]
