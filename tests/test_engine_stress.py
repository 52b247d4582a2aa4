"""A randomized stress test: requests arrive over time into a small pool, in both preemption modes.

Thirty requests with random prompts (1 to 40 tokens, some opening with a shared system prompt),
random max_tokens (1 to 25), some with two seeded samples, arrive at random steps (`add_request`
between `step()` calls) into a pool far too small for all of them: the scheduler admits, preempts,
swaps and re-admits them many times. Every request must finish within a bounded number of steps,
with exactly the tokens of an unpressured `generate` of the same requests, with the prefix cache on
or off, and no block (device or host) may leak.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from minipaged import LLM, SamplingParams
from minipaged.reference.block_table import num_blocks_for

BS = 4
NUM_REQUESTS = 30
# blocks; the largest request (2 samples of 40 + 25 tokens) needs 22 of them alone
POOL = 24
MAX_STEPS = 2000
SEEDS = [0, 1, 2, 3, 4, 5]
# 16 tokens, 4 full blocks, opening about a third of the prompts
SYSTEM = list(range(30, 46))


@dataclass
class Request:
    prompt: dict
    params: SamplingParams
    arrival_step: int


def make_workload(seed: int) -> list[Request]:
    """Random requests in arrival order (so request ids, and the engine's default seeds, match)."""
    rng = random.Random(seed)
    requests = []
    for _ in range(NUM_REQUESTS):
        tokens = [rng.randrange(3, 259) for _ in range(rng.randint(1, 40))]
        if len(tokens) > len(SYSTEM) and rng.random() < 0.35:
            tokens[: len(SYSTEM)] = SYSTEM
        prompt = {"prompt_token_ids": tokens}
        max_tokens = rng.randint(1, 25)
        ignore_eos = rng.random() < 0.7
        if rng.random() < 0.3:  # two samples, seeded explicitly or by the engine
            seed = rng.choice([None, rng.randrange(1000)])
            params = SamplingParams(
                n=2,
                temperature=0.8,
                seed=seed,
                max_tokens=max_tokens,
                ignore_eos=ignore_eos,
            )
        else:
            params = SamplingParams(
                temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos
            )
        requests.append(Request(prompt, params, rng.randint(0, 80)))
    requests.sort(key=lambda r: r.arrival_step)
    return requests


WORKLOADS = {seed: make_workload(seed) for seed in SEEDS}


def tokens_of(output) -> list[list[int]]:
    return [completion.token_ids for completion in output.outputs]


@pytest.fixture(scope="module")
def unpressured() -> dict[int, list[list[list[int]]]]:
    """Each workload's tokens from a pool large enough for all of it at once."""
    expected = {}
    for seed, workload in WORKLOADS.items():
        llm = LLM("tiny-llama", block_size=BS, num_gpu_blocks=1024, num_cpu_blocks=0)
        outputs = llm.generate(
            [r.prompt for r in workload], [r.params for r in workload], use_tqdm=False
        )
        assert sum(llm.stats.num_preemptions.values()) == 0
        expected[seed] = [tokens_of(out) for out in outputs]
    return expected


@pytest.mark.parametrize("seed", SEEDS)
def test_the_pool_is_small_but_every_request_fits_alone(seed):
    blocks = []
    for r in WORKLOADS[seed]:
        # The samples share the prompt's full blocks; the token sampled last is never stored.
        prompt_len = len(r.prompt["prompt_token_ids"])
        shared = prompt_len // BS
        blocks.append(
            shared
            + r.params.n
            * (num_blocks_for(prompt_len + r.params.max_tokens - 1, BS) - shared)
        )
    assert max(blocks) <= POOL and sum(blocks) > 2 * POOL


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("prefix_caching", [False, True], ids=["", "prefix-caching"])
@pytest.mark.parametrize(
    ("preemption_mode", "num_cpu_blocks"),
    [("recompute", 0), ("swap", 64), ("swap", 10)],
    ids=["recompute", "swap", "swap-small-host"],
)
def test_requests_arriving_over_time_into_a_small_pool(
    unpressured, preemption_mode, num_cpu_blocks, prefix_caching, seed
):
    llm = LLM(
        "tiny-llama",
        block_size=BS,
        num_gpu_blocks=POOL,
        num_cpu_blocks=num_cpu_blocks,
        preemption_mode=preemption_mode,
        enable_prefix_caching=prefix_caching,
    )
    pending = list(WORKLOADS[seed])
    index_of: dict[str, int] = {}
    results: dict[int, list[list[int]]] = {}
    clock = 0
    while pending or llm.has_unfinished_requests():
        while pending and pending[0].arrival_step <= clock:
            request = pending.pop(0)
            index_of[llm.add_request(request.prompt, request.params)] = len(index_of)
        if llm.has_unfinished_requests():
            for out in llm.step():
                assert index_of[out.request_id] not in results, (
                    "a request finished twice"
                )
                results[index_of[out.request_id]] = tokens_of(out)
        clock += 1
        assert clock < MAX_STEPS, (
            f"not finished after {MAX_STEPS} steps: {len(results)} of {NUM_REQUESTS} done"
        )

    stats = llm.stats
    preemptions = stats.num_preemptions
    assert sum(preemptions.values()) >= 5, (
        f"too little pressure to test anything: {preemptions}"
    )
    if preemption_mode == "recompute":
        assert preemptions["swap"] == 0
    else:
        assert preemptions["swap"] > 0 and stats.blocks_swapped_in > 0
        # every victim was swapped, and came back (found in the cache or moved)
        if num_cpu_blocks == 64:
            if prefix_caching:
                assert stats.blocks_swapped_in <= stats.blocks_swapped_out
            else:
                assert stats.blocks_swapped_out == stats.blocks_swapped_in
        else:
            assert preemptions["recompute"] > 0, (
                "a host pool of 10 blocks cannot take every victim"
            )

    if prefix_caching:
        assert stats.prefix_cache_hits > 0
    assert [results[i] for i in range(NUM_REQUESTS)] == unpressured[seed]

    manager = llm.block_manager
    assert manager.device.num_free == manager.device.num_blocks, "device blocks leaked"
    assert manager.host.num_free == manager.host.num_blocks, "host blocks leaked"
    assert not manager.device_tables and not manager.host_tables
    steps = llm.step_stats
    assert [s.step for s in steps] == list(range(len(steps)))
    assert all(s.blocks_free + s.blocks_used == POOL for s in steps)
    assert all(0.0 < s.kv_utilization <= 1.0 for s in steps)
    assert stats.peak_blocks_used <= POOL
    assert stats.generated_tokens == sum(
        len(t) for sample in results.values() for t in sample
    )
