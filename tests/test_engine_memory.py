"""The engine under memory pressure: preemption, swapping and prefix caching change nothing but memory.

A pool too small for the batch makes the scheduler preempt requests again and again (vLLM paper
section 4.5). Preempted by recompute, a request prefills its prompt and its generated tokens anew;
swapped out, its blocks travel to the host pool and back. Either way its tokens must be exactly those
of an unpressured run with a pool large enough for everything: greedy and seeded sampling alike,
with parallel samples sharing blocks (copy-on-write) too. The prefix cache must save blocks without
changing a token. At the end every block, on the device and on the host, is free again, and the
per-step statistics the engine reports are plain data that add up.
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from minipaged import LLM, SamplingParams
from minipaged.presets import load_preset

BS = 4
LARGE = 512  # blocks: no pressure at all
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=20)


def random_prompts(
    seed: int, num: int, min_len: int, max_len: int, prefix: list[int] | None = None
) -> list:
    """`num` prompts of random token ids (bytes of the preset's tokenizer), after an optional prefix."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(num):
        tokens = [rng.randrange(3, 259) for _ in range(rng.randint(min_len, max_len))]
        prompts.append({"prompt_token_ids": [*(prefix or []), *tokens]})
    return prompts


# the largest needs ceil((30 + 20) / 4) = 13 blocks
PROMPTS = random_prompts(1, 8, 8, 30)
# two samples each; half the requests bring a seed, half draw theirs from the engine's
SAMPLED = [
    SamplingParams(
        n=2,
        temperature=1.0,
        top_p=0.95,
        seed=100 + i if i % 2 else None,
        ignore_eos=True,
        max_tokens=20,
    )
    for i in range(len(PROMPTS))
]


def run(
    prompts, params, block_size=BS, **engine_args
) -> tuple[LLM, list[list[list[int]]]]:
    """Generate with a tiny-llama engine; return it and each request's samples' token ids."""
    llm = LLM("tiny-llama", block_size=block_size, **engine_args)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return llm, [
        [completion.token_ids for completion in out.outputs] for out in outputs
    ]


def assert_all_free(llm: LLM) -> None:
    manager = llm.block_manager
    assert manager.device.num_free == manager.device.num_blocks, "device blocks leaked"
    assert manager.host.num_free == manager.host.num_blocks, "host blocks leaked"
    assert not manager.device_tables and not manager.host_tables
    assert not llm.has_unfinished_requests()


def assert_step_stats_consistent(llm: LLM) -> None:
    """Per-step stats are plain data, numbered from 0, and add up to the engine's totals."""
    steps = llm.step_stats
    assert [s.step for s in steps] == list(
        range(len(steps))
    ) and llm.stats.steps == len(steps)
    for s in steps:
        json.dumps(dataclasses.asdict(s))  # plain data: ints, floats, lists
        assert s.blocks_free + s.blocks_used == llm.cache_config.num_gpu_blocks
        assert 0.0 < s.kv_utilization <= 1.0
        assert 0 <= s.blocks_shared <= s.blocks_used
        assert s.num_seqs > 0 or s.preempted
        assert s.num_batched_tokens >= s.num_seqs
    preemptions = {"recompute": 0, "swap": 0}
    for s in steps:
        for _, mode in s.preempted:
            preemptions[mode] += 1
    stats = llm.stats
    json.dumps(dataclasses.asdict(stats))
    assert preemptions == stats.num_preemptions
    assert sum(s.blocks_swapped_out for s in steps) == stats.blocks_swapped_out
    assert sum(s.blocks_swapped_in for s in steps) == stats.blocks_swapped_in
    assert sum(s.blocks_copied for s in steps) == stats.cow_copies
    assert stats.peak_blocks_used == max(s.blocks_used for s in steps)
    assert stats.peak_blocks_used <= llm.cache_config.num_gpu_blocks


@pytest.fixture(scope="module")
def unpressured_greedy():
    llm, tokens = run(PROMPTS, GREEDY, num_gpu_blocks=LARGE, num_cpu_blocks=0)
    assert sum(llm.stats.num_preemptions.values()) == 0
    return tokens


@pytest.fixture(scope="module")
def unpressured_sampled():
    llm, tokens = run(PROMPTS, SAMPLED, num_gpu_blocks=LARGE, num_cpu_blocks=0)
    assert sum(llm.stats.num_preemptions.values()) == 0
    assert all(a != b for a, b in tokens), "the two samples of a request differ"
    return tokens


# ---- greedy under pressure ---------------------------------------------------------------------


@pytest.mark.task3_2
def test_recompute_under_pressure_gives_the_unpressured_tokens(unpressured_greedy):
    llm, tokens = run(
        PROMPTS,
        GREEDY,
        num_gpu_blocks=16,
        num_cpu_blocks=0,
        preemption_mode="recompute",
    )
    assert (
        llm.stats.num_preemptions["recompute"] >= 4
        and llm.stats.num_preemptions["swap"] == 0
    )
    assert sum(1 for s in llm.step_stats if s.preempted) >= 4
    assert any(s.num_waiting for s in llm.step_stats)
    assert llm.stats.blocks_swapped_out == llm.stats.blocks_swapped_in == 0
    assert tokens == unpressured_greedy
    assert_all_free(llm)
    assert_step_stats_consistent(llm)


@pytest.mark.task3_3
def test_swap_under_pressure_gives_the_unpressured_tokens(unpressured_greedy):
    llm, tokens = run(
        PROMPTS, GREEDY, num_gpu_blocks=16, num_cpu_blocks=64, preemption_mode="swap"
    )
    stats = llm.stats
    assert (
        stats.num_preemptions["swap"] >= 4 and stats.num_preemptions["recompute"] == 0
    )
    assert stats.blocks_swapped_out > 0 and stats.blocks_swapped_in > 0
    assert stats.blocks_swapped_out == stats.blocks_swapped_in, (
        "every block swapped out came back"
    )
    assert any(s.num_swapped for s in llm.step_stats)
    assert tokens == unpressured_greedy
    assert_all_free(llm)
    assert_step_stats_consistent(llm)


@pytest.mark.task3_3
def test_swap_with_a_small_host_pool_falls_back_to_recompute(unpressured_greedy):
    llm, tokens = run(
        PROMPTS, GREEDY, num_gpu_blocks=16, num_cpu_blocks=8, preemption_mode="swap"
    )
    preemptions = llm.stats.num_preemptions
    assert preemptions["swap"] > 0, "the groups that fit the host pool are swapped"
    assert preemptions["recompute"] > 0, "the others fall back to recompute"
    assert tokens == unpressured_greedy
    assert_all_free(llm)
    assert_step_stats_consistent(llm)


@pytest.mark.task3_2
def test_swap_with_no_host_pool_is_recompute(unpressured_greedy):
    llm, tokens = run(
        PROMPTS, GREEDY, num_gpu_blocks=16, num_cpu_blocks=0, preemption_mode="swap"
    )
    assert (
        llm.stats.num_preemptions["swap"] == 0
        and llm.stats.num_preemptions["recompute"] > 0
    )
    assert tokens == unpressured_greedy
    assert_all_free(llm)


# ---- parallel samples, seeded, under pressure --------------------------------------------------


@pytest.mark.parametrize(
    ("preemption_mode", "num_cpu_blocks"),
    [("recompute", 0), ("swap", 64), ("swap", 10)],
)
def test_parallel_samples_under_pressure_give_the_unpressured_tokens(
    unpressured_sampled, preemption_mode, num_cpu_blocks
):
    llm, tokens = run(
        PROMPTS,
        SAMPLED,
        num_gpu_blocks=28,
        num_cpu_blocks=num_cpu_blocks,
        preemption_mode=preemption_mode,
    )
    stats = llm.stats
    assert sum(stats.num_preemptions.values()) >= 4
    if preemption_mode == "swap":
        assert stats.num_preemptions["swap"] > 0 and stats.blocks_swapped_in > 0
    assert stats.cow_copies > 0, (
        "the samples share their prompt's last block until they diverge"
    )
    assert tokens == unpressured_sampled
    assert_all_free(llm)
    assert_step_stats_consistent(llm)


# ---- prefix caching ----------------------------------------------------------------------------

# 10 full blocks and 1 token
SYSTEM = random_prompts(7, 1, 41, 41)[0]["prompt_token_ids"]
SHARED_PROMPTS = random_prompts(8, 6, 1, 6, prefix=SYSTEM)


def test_prefix_caching_saves_blocks_and_changes_no_token():
    off, tokens_off = run(
        SHARED_PROMPTS, GREEDY, num_gpu_blocks=LARGE, num_cpu_blocks=0
    )
    on, tokens_on = run(
        SHARED_PROMPTS,
        GREEDY,
        num_gpu_blocks=LARGE,
        num_cpu_blocks=0,
        enable_prefix_caching=True,
    )
    assert tokens_on == tokens_off
    assert off.stats.prefix_cache_hits == 0
    assert on.stats.prefix_cache_hits >= 10 * (len(SHARED_PROMPTS) - 1), (
        "every later prompt hits the system prompt"
    )
    # Submitted together, the six prompts hold the system prompt's 10 blocks once instead of six times.
    assert on.stats.peak_blocks_used <= off.stats.peak_blocks_used - 10 * (
        len(SHARED_PROMPTS) - 1
    )
    assert on.step_stats[0].num_batched_tokens < off.step_stats[0].num_batched_tokens
    for llm in (off, on):
        assert_all_free(llm)
        assert_step_stats_consistent(llm)


@pytest.mark.parametrize(
    ("preemption_mode", "num_cpu_blocks"),
    [("recompute", 0), ("swap", 64), ("swap", 12)],
)
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "n2"])
def test_prefix_caching_under_pressure_changes_no_token(
    preemption_mode, num_cpu_blocks, sampled
):
    params = (
        SamplingParams(n=2, temperature=1.0, seed=5, ignore_eos=True, max_tokens=12)
        if sampled
        else SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=12)
    )
    _, expected = run(SHARED_PROMPTS, params, num_gpu_blocks=LARGE, num_cpu_blocks=0)
    llm, tokens = run(
        SHARED_PROMPTS,
        params,
        num_gpu_blocks=24,
        num_cpu_blocks=num_cpu_blocks,
        preemption_mode=preemption_mode,
        enable_prefix_caching=True,
    )
    assert sum(llm.stats.num_preemptions.values()) > 0
    assert llm.stats.prefix_cache_hits > 0
    assert tokens == expected
    assert_all_free(llm)
    assert_step_stats_consistent(llm)


@pytest.mark.parametrize(("block_size", "n"), [(4, 2), (1, 1)])
def test_prefix_caching_with_a_group_swapped_out_right_after_its_prefill(block_size, n):
    """The tokens c's samples drew at their prefill fill the prompt's last block; then c is swapped out.

    Swapping it back in must work and change no token (see test_scheduler.py for the same case
    without a model).
    """
    prompts = [
        # a: one full block, needs a 2nd next step
        {"prompt_token_ids": list(range(5, 5 + block_size))},
        # c: one token short of 2 blocks
        {"prompt_token_ids": list(range(20, 20 + 2 * block_size - 1))},
    ]
    params = [
        SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=2),
        SamplingParams(n=n, temperature=1.0, seed=0, ignore_eos=True, max_tokens=2),
    ]
    expected = run(prompts, params, block_size=block_size, num_gpu_blocks=LARGE)[1]
    llm = LLM(
        "tiny-llama",
        block_size=block_size,
        num_gpu_blocks=3 if block_size == 4 else 2,
        num_cpu_blocks=8,
        preemption_mode="swap",
        enable_prefix_caching=True,
    )
    for prompt, request_params in zip(prompts, params, strict=True):
        llm.add_request(prompt, request_params)
    outputs = {}
    for _ in range(10):
        if not llm.has_unfinished_requests():
            break
        outputs.update(
            (out.request_id, [s.token_ids for s in out.outputs]) for out in llm.step()
        )
    assert llm.stats.num_preemptions == {"recompute": 0, "swap": 1}
    assert [outputs["0"], outputs["1"]] == expected
    assert_all_free(llm)


# ---- the statistics themselves ------------------------------------------------------------------


def test_step_stats_describe_each_step():
    llm = LLM("tiny-llama", block_size=BS, num_gpu_blocks=8, num_cpu_blocks=0)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=3)
    llm.add_request({"prompt_token_ids": [5, 6, 7, 8, 9]}, params)  # 5 tokens: 2 blocks
    llm.add_request({"prompt_token_ids": [10, 11]}, params)  # 1 block
    finished = []
    while llm.has_unfinished_requests():
        finished += llm.step()
    assert sorted(out.request_id for out in finished) == ["0", "1"]
    first, second, third = llm.step_stats
    assert (first.num_seqs, first.num_batched_tokens) == (2, 7)
    assert (first.blocks_used, first.blocks_free) == (3, 5)
    assert first.kv_utilization == pytest.approx(7 / 12)  # 7 tokens in 3 blocks of 4
    assert (second.num_seqs, second.num_batched_tokens, second.num_running) == (2, 2, 2)
    assert second.blocks_used == 3 and second.kv_utilization == pytest.approx(9 / 12)
    # Both finish at the third step, whose stats are taken before they give their blocks back.
    assert (third.num_running, third.num_waiting, third.blocks_used) == (2, 0, 3)
    assert third.kv_utilization == pytest.approx(11 / 12)
    assert llm.stats.peak_blocks_used == 3
    assert llm.stats.generated_tokens == 6
    assert_all_free(llm)
    assert_step_stats_consistent(llm)


# ---- against transformers' own generate (Assignment 3 grades its tasks on it) --------------------


@pytest.mark.parametrize(
    ("preemption_mode", "num_cpu_blocks"),
    [
        pytest.param("recompute", 0, marks=pytest.mark.task3_2),
        pytest.param("swap", 0, marks=pytest.mark.task3_2),  # no host pool: recompute
        pytest.param("swap", 32, marks=pytest.mark.task3_3),
    ],
)
def test_preemption_keeps_the_greedy_tokens_of_transformers(
    preemption_mode, num_cpu_blocks
):
    """Six random prompts of 2 blocks on a pool of 8 blocks, 16 tokens each to generate.

    The first step admits four prompts and fills the pool, so as they grow the scheduler must
    preempt some, again and again. Whatever the scheduler did, each request's greedy tokens
    must be those of transformers' `generate` on the same weights, one prompt at a time.
    """
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    prompts = [
        [rng.randrange(3, 259) for _ in range(rng.randint(BS + 1, 2 * BS))]
        for _ in range(6)
    ]
    model = load_preset("tiny-llama", 0)
    model.set_attn_implementation("sdpa")
    expected = []
    for prompt in prompts:
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
            do_sample=False,
            max_new_tokens=16,
            eos_token_id=None,
            pad_token_id=0,
        )
        expected.append(out[0, len(prompt) :].tolist())
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=16)
    llm, tokens = run(
        [{"prompt_token_ids": p} for p in prompts],
        params,
        num_gpu_blocks=8,
        num_cpu_blocks=num_cpu_blocks,
        preemption_mode=preemption_mode,
        watermark=0.0,
        seed=0,
    )
    assert [t for (t,) in tokens] == expected, f"seed {seed}"
    stats = llm.stats
    mode = "swap" if num_cpu_blocks else "recompute"
    assert stats.num_preemptions[mode] > 0, (
        f"seed {seed}: the pool was meant to be small"
    )
    if num_cpu_blocks:
        assert stats.blocks_swapped_in == stats.blocks_swapped_out > 0
    else:
        assert stats.num_preemptions["swap"] == 0
    assert_all_free(llm)
    assert_step_stats_consistent(llm)
