"""serving --measured: the paper's latency-vs-rate comparison, measured for real on this machine.

OS idea: a simulator answers "what if", a benchmark answers "what is": the same trace of arrivals,
replayed in real time against the real system, measures what the model of it leaves out (Python
overheads, the kernels' real speed, the machine). KV counterpart: vLLM paper section 6.2, Fig. 12:
requests arrive as a Poisson process and each system's normalized latency (end-to-end latency over
output length, s/token) is plotted against the request rate.

Three systems serve the same arrivals, each in real time on a preset model:

- "paged": minipaged's engine (iteration-level scheduling, paged KV blocks), on the chosen backend.
- "orca-oracle", "orca-max": the same engine, pool and kernels under Orca's reservation rule
  (reservation.ReservingBlockManager): a request is admitted only when its whole reservation (its
  true length, or max_model_len) is free beside what the running requests were promised.
- "padded": transformers' own generate on left-padded static batches, the stand-in for systems
  without iteration-level scheduling (FasterTransformer): when the last batch is done, the requests
  that have arrived form the next one, which runs until its longest output is done; each request's
  output is returned with the batch. FasterTransformer reserves max_model_len slots a request, so a
  batch holds at most the pool's slots // MAX_MODEL_LEN requests (PADDED_BATCH).

The KV pool is small on purpose (NUM_GPU_BLOCKS): on a CPU the model is tiny, and it is the pool,
as on the paper's GPU, that must bound how many requests run at once.
"""

from __future__ import annotations

import statistics
import time
from collections import deque

import torch
import transformers

from minipaged.engine import LLM
from minipaged.experiments import one_thread
from minipaged.experiments.reservation import ReservingBlockManager
from minipaged.presets import PAD_ID, load_preset
from minipaged.sampling import SamplingParams
from minipaged.workloads import alpaca_like

SYSTEMS = ("paged", "orca-oracle", "orca-max", "padded")
LABELS = {
    "paged": "vLLM (paged)",
    "orca-oracle": "Orca-style (Oracle)",
    "orca-max": "Orca-style (Max)",
    "padded": "transformers generate (static batches)",
}
MODEL = "tiny-llama"
BLOCK_SIZE = 16
# Alpaca-like lengths fit (means 19 in, 58 out); Orca (Max) reserves 8 blocks
MAX_MODEL_LEN = 128
# 768 slots: Orca (Max) runs 6 requests at once, paged about three times as many
NUM_GPU_BLOCKS = 48
WORKLOAD = "alpaca-like (measured)"
# 6: Max reservations in the same pool
PADDED_BATCH = NUM_GPU_BLOCKS * BLOCK_SIZE // MAX_MODEL_LEN


def prompts_for(workload, vocab_size: int, seed: int) -> list[list[int]]:
    """Random prompt tokens of each request's length (ids past the special ones), seeded."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, vocab_size, (r.prompt_len,), generator=gen).tolist()
        for r in workload
    ]


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask `[batch, longest prompt]`, padded on the left with PAD_ID."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.int64)  # [batch, width]
    # [batch, width]; 1: a real token
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def padded_generate(
    model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int
) -> torch.Tensor:
    """transformers' greedy generate on one left-padded batch, past EOS to max_new_tokens."""
    ids, mask = left_padded(prompts)
    config = transformers.GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=PAD_ID,
    )
    with torch.inference_mode():
        return model.generate(
            input_ids=ids, attention_mask=mask, generation_config=config
        )


def _serve_engine(llm: LLM, workload, prompts) -> tuple[list[float], list[int]]:
    """Replay the arrivals on the engine in real time; (normalized latencies, running per step)."""
    llm.generate(
        {"prompt_token_ids": prompts[0][:4]},
        SamplingParams(max_tokens=2),
        use_tqdm=False,
    )
    # the warm-up above pays the first calls' costs
    start, first_step = llm.now(), len(llm.step_stats)
    for r, prompt in zip(workload, prompts, strict=True):
        params = SamplingParams(
            temperature=0.0, max_tokens=r.output_len, ignore_eos=True
        )
        llm.add_request(
            {"prompt_token_ids": prompt}, params, arrival_time=start + r.arrival_time
        )
    latencies = []
    while llm.has_unfinished_requests():
        latencies += [
            o.metrics.latency / len(o.outputs[0].token_ids) for o in llm.step()
        ]
    return latencies, [s.num_running for s in llm.step_stats[first_step:]]


def _serve_padded(
    model: torch.nn.Module, workload, prompts
) -> tuple[list[float], list[int]]:
    """Static batching with transformers' generate, in real time: (normalized latencies, batch per step)."""
    padded_generate(model, [prompts[0][:4]], 2)  # warm-up
    pending = deque(zip(workload, prompts, strict=True))
    latencies, running, start = [], [], time.perf_counter()
    while pending:
        now = time.perf_counter() - start
        if pending[0][0].arrival_time > now:
            time.sleep(pending[0][0].arrival_time - now)
            continue
        batch = []
        while (
            pending and pending[0][0].arrival_time <= now and len(batch) < PADDED_BATCH
        ):
            batch.append(pending.popleft())
        longest = max(r.output_len for r, _ in batch)
        padded_generate(model, [p for _, p in batch], longest)
        done = time.perf_counter() - start
        latencies += [(done - r.arrival_time) / r.output_len for r, _ in batch]
        running += [len(batch)] * longest  # every row runs to the longest output
    return latencies, running


def measure(system: str, rate: float, duration: float, *, model=MODEL, backend="reference",
            device="cpu", seed=0) -> dict:  # fmt: skip
    """One system at one rate: Alpaca-like requests arriving for `duration` seconds, served to the end.

    Returns:
        A row: system, workload, rate, normalized_latency (mean, s/token), throughput (requests
        finished per second of the run), mean_batch_size (requests running per step).
    """
    if system not in SYSTEMS:
        raise ValueError(f"system must be one of {', '.join(SYSTEMS)}, got {system!r}")
    num = max(1, round(rate * duration))
    workload = alpaca_like(num, rate=rate, seed=seed, max_model_len=MAX_MODEL_LEN)
    with one_thread():  # as the benchmarks: steadier, and the same for every system
        return _measure(system, rate, workload, model, backend, device, seed)


def _measure(system, rate, workload, model, backend, device, seed) -> dict:
    start = time.perf_counter()
    if system == "padded":
        net = load_preset(model, seed).to(device)
        prompts = prompts_for(workload, net.config.vocab_size, seed)
        latencies, running = _serve_padded(net, workload, prompts)
    else:
        manager = None
        if system != "paged":
            policy = system.removeprefix("orca-")
            manager = ReservingBlockManager(
                BLOCK_SIZE, NUM_GPU_BLOCKS, policy, MAX_MODEL_LEN
            )
        pool = {
            "block_size": BLOCK_SIZE,
            "num_gpu_blocks": NUM_GPU_BLOCKS,
            "max_model_len": MAX_MODEL_LEN,
        }
        llm = LLM(
            model,
            backend=backend,
            device=device,
            seed=seed,
            block_manager=manager,
            max_step_stats=None,
            **pool,
        )  # every step kept: the running counts are read back by index
        prompts = prompts_for(workload, llm.vocab_size, seed)
        latencies, running = _serve_engine(llm, workload, prompts)
    wall = time.perf_counter() - start
    return {
        "system": system,
        "workload": WORKLOAD,
        "rate": rate,
        "normalized_latency": statistics.fmean(latencies),
        "throughput": len(latencies) / wall,
        "mean_batch_size": statistics.fmean(running),
    }


__all__ = ["LABELS", "SYSTEMS", "left_padded", "measure", "padded_generate"]
