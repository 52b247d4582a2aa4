"""Scheduler homework: who runs, who is preempted and who finishes at each step, by hand.

OS idea: OSTEP's `scheduler.py` homework gives a few jobs (arrival, length) and asks what runs
when; `paging-policy.py` asks which page is evicted. Here both at once, as vLLM's scheduler
does them (vLLM paper section 4.5): a few requests (prompt length, arrival step, output
length) on a small KV pool, FCFS iteration-level batching, and preemption by swap or by
recompute when the pool runs short.

The answers come from the real Scheduler over a real BlockManager, driven step by step the way
the engine drives it (and tests/test_scheduler.py without a model): after each step every
scheduled sequence has its K/V computed and gains a fake token; one that reaches its output
length is finished and freed.
"""

from __future__ import annotations

import random

from minipaged.config import SchedulerConfig
from minipaged.homework import Problem, Question
from minipaged.reference.block_manager import BlockManager
from minipaged.reference.scheduler import Scheduler, SchedulerOutput
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus

BLOCK_SIZE = 4
MAX_STEPS = 12  # a problem a student can do by hand
ASKS = ("prefill", "decode", "preempted", "swapped in", "finished")
RULES = (
    "At every step, first come first served (arrival order):",
    "1. Running requests, oldest first, get a slot for their next token (a new block when",
    "   their last is full). When a request's new block is not free, the newest running",
    "   request (maybe itself) is preempted, again until it fits: swapped out (its blocks",
    "   go to the host pool) or, in recompute mode or when the host pool is too small,",
    "   freed and put back at the front of the waiting queue.",
    "2. If nobody was preempted, swapped requests come back, oldest first, while their",
    "   blocks and the slot for their next token fit on the device; they decode.",
    "3. If nobody was preempted and nobody is left swapped out, waiting requests are",
    "   admitted in arrival order while their blocks fit; the first that does not fit",
    "   stops admission. An admitted request computes its whole sequence in the step",
    "   (prefill: its prompt, plus what it had generated if it was preempted).",
    "After a step each request that ran gains one token; a request finishes in the step",
    "that produces its last output token, and its blocks are freed at once.",
    "A request arriving at step t can be admitted in step t.",
    "",
    "For each step write which requests prefill (with how many tokens), which decode,",
    "which are preempted (swap or recompute), which are swapped in, and which finish.",
)


def _workload(rng: random.Random) -> tuple[dict, tuple[tuple, ...]]:
    """A pool and 3 or 4 requests, each able to fit the pool alone (the engine's check)."""
    mode = rng.choice(("swap", "recompute"))
    config = {
        "block_size": BLOCK_SIZE,
        "num_gpu_blocks": rng.randint(4, 6),
        "num_cpu_blocks": rng.randint(2, 6) if mode == "swap" else 0,
        "preemption_mode": mode,
    }
    arrivals = sorted([0] + [rng.randint(0, 3) for _ in range(rng.randint(2, 3))])
    manager, requests = _block_manager(config), []
    for name, arrival in zip("ABCD", arrivals, strict=False):
        while True:
            prompt_len, max_tokens = rng.randint(1, 10), rng.randint(2, 5)
            try:  # the engine refuses a request that could never fit
                manager.check_fits(prompt_len, max_tokens, num_seqs=1)
                break
            except ValueError:
                continue
        requests.append(("request", name, prompt_len, arrival, max_tokens))
    return config, tuple(requests)


def _block_manager(config: dict) -> BlockManager:
    return BlockManager(
        config["block_size"], config["num_gpu_blocks"], config["num_cpu_blocks"], 0.0
    )


def run(config: dict, requests: tuple[tuple, ...]) -> list[dict]:
    """Drive a real Scheduler step by step; return each step's decisions (at most MAX_STEPS+1)."""
    scheduler = Scheduler(
        SchedulerConfig(preemption_mode=config["preemption_mode"]),
        _block_manager(config),
    )
    max_tokens, steps, pending = {}, [], list(requests)
    while (pending or scheduler.has_unfinished()) and len(steps) <= MAX_STEPS:
        step = len(steps)
        while pending and pending[0][3] == step:
            _, name, prompt_len, _, max_tokens[name] = pending.pop(0)
            prompt = list(range(100, 100 + prompt_len))
            # FCFS order: the order of `requests`, which is sorted by arrival step
            arrival_time = float(len(requests) - len(pending))
            scheduler.add(SequenceGroup(name, [Sequence(prompt)], arrival_time))
        swapped = [group.request_id for group in scheduler.swapped]
        out = scheduler.schedule()
        steps.append(_decisions(out, swapped, _engine_step(scheduler, out, max_tokens)))
    return steps


def _engine_step(
    scheduler: Scheduler, out: SchedulerOutput, max_tokens: dict[str, int]
) -> list[str]:
    """Play the engine after a schedule: compute, append a token, finish. Returns who finished."""
    finished = []
    for item in out.scheduled:
        seq, group = item.seq, item.group
        seq.num_computed_tokens = len(seq)
        seq.append_token_id(1)
        if len(seq.output_token_ids) >= max_tokens[group.request_id]:
            seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
            scheduler.block_manager.free(seq)
        if group.is_finished() and group.request_id not in finished:
            scheduler.finish(group)
            finished.append(group.request_id)
    return finished


def _decisions(out: SchedulerOutput, swapped: list[str], finished: list[str]) -> dict:
    """What the step decided, by request name (the answers as data)."""
    ran = [(item.group.request_id, item) for item in out.scheduled]
    return {
        "prefill": [
            (name, item.num_query_tokens) for name, item in ran if item.is_prefill
        ],
        "decode": [name for name, item in ran if not item.is_prefill],
        "preempted": list(out.preempted),
        "swapped_in": [name for name, _ in ran if name in swapped],
        "finished": finished,
    }


def _question(step: int, decisions: dict) -> Question:
    answers = (
        ", ".join(
            f"{name} ({n} token{'s' * (n > 1)})" for name, n in decisions["prefill"]
        ),
        ", ".join(decisions["decode"]),
        ", ".join(f"{name} ({mode})" for name, mode in decisions["preempted"]),
        ", ".join(decisions["swapped_in"]),
        ", ".join(decisions["finished"]),
    )
    answers = tuple(answer or "none" for answer in answers)
    return Question(f"Step {step}", ASKS, answers, decisions)


def _header(config: dict, requests: tuple[tuple, ...]) -> tuple[str, ...]:
    mode = config["preemption_mode"]
    lines = [
        f"A KV pool of {config['num_gpu_blocks']} device blocks of {BLOCK_SIZE} tokens and "
        f"{config['num_cpu_blocks']} host blocks, no watermark;",
        f"preemption by {mode}"
        + (" (recompute when the host pool is too small)." if mode == "swap" else "."),
        "A sequence of n tokens holds ceil(n / 4) blocks; the last token a request generates",
        "is never stored.",
        "",
        "request  prompt tokens  arrives at step  output tokens",
    ]
    lines += [f"{r[1]:<8} {r[2]:>13} {r[3]:>16} {r[4]:>14}" for r in requests]
    return (*lines, "", *RULES)


def generate(seed: int) -> Problem:
    """Draw workloads until one finishes within MAX_STEPS, preferring one with a preemption."""
    rng = random.Random(seed)
    chosen = None
    for _ in range(50):
        config, requests = _workload(rng)
        steps = run(config, requests)
        if len(steps) > MAX_STEPS:
            continue
        chosen = chosen or (config, requests, steps)
        if any(step["preempted"] for step in steps):
            chosen = (config, requests, steps)
            break
    if chosen is None:  # never seen: small workloads finish well within MAX_STEPS
        raise RuntimeError(f"no workload for seed {seed} finished in {MAX_STEPS} steps")
    config, requests, steps = chosen
    questions = tuple(_question(i, decisions) for i, decisions in enumerate(steps))
    return Problem(
        "scheduler", seed, config, requests, _header(config, requests), questions
    )
