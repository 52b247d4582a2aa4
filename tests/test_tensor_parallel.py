"""Tensor parallelism: two ranks (gloo, CPU) give exactly what one gives, and transformers' generate.

Each test that starts ranks is marked `multiprocess` (`make check` leaves them out): a TP=2 engine
starts one worker process, which takes a few seconds, so one engine per architecture serves every
scenario (greedy, swap preemption with the prefix cache, n = 3 sampling, beam search). The errors
that need no worker (bad sizes, heads that do not divide) are checked without one.
"""

from __future__ import annotations

import pytest
import torch
from test_engine_equivalence import (
    MAX_TOKENS,
    WEIGHT_SEED,
    as_requests,
    assert_all_blocks_free,
    beam_tokens,
    hf_greedy,
    hf_model,
    random_prompts,
    sample_tokens,
)

from minipaged import LLM, BeamSearchParams, SamplingParams
from minipaged.distributed.sharding import check_divisible, local_kv_heads, tp_plan
from minipaged.model_runner import kv_shape
from minipaged.presets import load_preset

TP_ARCHS = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-opt"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.8, n=3, max_tokens=8, seed=3)
BEAMS = BeamSearchParams(beam_width=3, max_tokens=6)
# small pools: the greedy batch below does not fit at once, so the engine swaps; and a prefix
# shared by the prompts, so the prefix cache hits
SETTINGS = dict(
    block_size=4,
    num_gpu_blocks=24,
    num_cpu_blocks=64,
    preemption_mode="swap",
    enable_prefix_caching=True,
    seed=WEIGHT_SEED,
)


def shared_prefix_prompts(seed: int) -> list[list[int]]:
    prefix = max(
        random_prompts(seed, num=2, max_len=16), key=len
    )  # 16 tokens: 4 blocks
    return [prefix + tail for tail in random_prompts(seed + 1, num=6, max_len=24)]


@pytest.fixture(scope="module", params=TP_ARCHS)
def engines(request):
    """(name, the TP=1 engine, the TP=2 engine) with the same settings; the TP=2 one is closed
    after the module's tests of this architecture."""
    name = request.param
    one = LLM(name, **SETTINGS)
    two = LLM(name, tensor_parallel_size=2, **SETTINGS)
    yield name, one, two
    two.close()


@pytest.mark.multiprocess
def test_two_ranks_equal_one_and_transformers_under_swap_and_prefix_caching(engines):
    name, one, two = engines
    prompts = shared_prefix_prompts(seed=TP_ARCHS.index(name))
    model = hf_model(name)
    expected = [hf_greedy(model, p, MAX_TOKENS)[0] for p in prompts]
    swapped, hits = two.stats.blocks_swapped_out, two.stats.prefix_cache_hits
    outputs = two.generate(as_requests(prompts), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    baseline = one.generate(as_requests(prompts), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in baseline] == expected
    # the run did swap and did hit the prefix cache: the ranks followed those decisions
    assert two.stats.blocks_swapped_out > swapped
    assert two.stats.prefix_cache_hits > hits
    assert_all_blocks_free(two)


@pytest.mark.multiprocess
def test_two_ranks_sample_and_beam_search_as_one(engines):
    _, one, two = engines
    prompts = as_requests(random_prompts(seed=11, num=3, max_len=20))
    assert sample_tokens(two, prompts, SAMPLED) == sample_tokens(one, prompts, SAMPLED)
    assert beam_tokens(two, prompts[:2], BEAMS) == beam_tokens(one, prompts[:2], BEAMS)
    assert_all_blocks_free(two)


@pytest.mark.multiprocess
def test_each_rank_holds_its_share_of_the_kv_heads(engines):
    name, one, two = engines
    _, num_kv_heads, head_dim = kv_shape(one.model.config)
    pools = two.runner.pools()
    assert [p["rank"] for p in pools] == [0, 1]
    local = max(1, num_kv_heads // 2)  # Qwen2's one KV head is replicated
    blocks = SETTINGS["num_gpu_blocks"], SETTINGS["block_size"]
    for pool in pools:
        assert pool["shape"] == [*blocks, local, head_dim], (name, pool)
    whole = sum(k.numel() * k.element_size() for k in one.runner.k_caches)
    assert pools[0]["bytes"] == pools[1]["bytes"] == 2 * whole * local // num_kv_heads


# ---- refused before any worker starts ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            dict(tensor_parallel_size=0),
            "tensor_parallel_size must be an int >= 1, got 0",
        ),
        (dict(tensor_parallel_size="2"), "tensor_parallel_size must be an int >= 1"),
        (
            dict(tensor_parallel_size=3),
            "must divide tiny-llama's|must divide llama's 4",
        ),
        (
            dict(model="tiny-gpt2", tensor_parallel_size=2),
            "'gpt2' has no base_model_tp_plan",
        ),
    ],
)
def test_bad_sizes_and_models_are_refused_before_any_worker_starts(kwargs, match):
    kwargs = {"model": "tiny-llama", "num_gpu_blocks": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        LLM(**kwargs)


def test_a_simulated_runner_takes_no_tensor_parallel_size():
    from minipaged.experiments.simulated_runner import SimulatedRunner

    with pytest.raises(ValueError, match="give no runner"):
        LLM(
            runner=SimulatedRunner(step_time=0.1),
            num_gpu_blocks=8,
            tensor_parallel_size=2,
        )


def test_kv_heads_split_or_replicate_as_vllm():
    llama, qwen2 = (
        load_preset("tiny-llama", 0).config,
        load_preset("tiny-qwen2", 0).config,
    )
    assert [local_kv_heads(llama, n) for n in (1, 2, 4)] == [2, 1, 1]
    assert [local_kv_heads(qwen2, n) for n in (1, 2, 4)] == [1, 1, 1]
    check_divisible(qwen2, 4)  # 4 ranks over 1 KV head: each rank keeps a copy
    with pytest.raises(ValueError, match="must divide qwen2's 4 attention heads"):
        check_divisible(qwen2, 8)
    assert (
        tp_plan(load_preset("tiny-opt", 0).config)["decoder.layers.*.fc2"] == "rowwise"
    )


def test_one_rank_is_the_plain_engine():
    llm = LLM("tiny-llama", num_gpu_blocks=8, tensor_parallel_size=1)
    assert type(llm.runner).__name__ == "ModelRunner" and llm.tensor_parallel_size == 1
    llm.close()  # nothing to stop
    assert torch.isnan(llm.runner.k_caches[0]).all()  # the pools are untouched
