"""The engine on the Triton backend gives the reference backend's tokens, under memory pressure too.

Runs wherever triton is installed: compiled on a GPU, through Triton's interpreter on a CPU (slow,
so the model and the prompts are tiny).
"""

from __future__ import annotations

import pytest

from minipaged import LLM, SamplingParams
from minipaged.backend import available_backends

pytestmark = pytest.mark.skipif("triton" not in available_backends(), reason="triton is not installed")

PROMPTS = [
    {"prompt_token_ids": [1, 5, 6, 7, 8, 9]},
    {"prompt_token_ids": [1, 40, 41]},
    {"prompt_token_ids": [9] * 9},
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def tokens(llm: LLM) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference_tokens() -> list[list[int]]:
    return tokens(LLM("tiny-llama", block_size=4, num_gpu_blocks=64))


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_triton_engine_equals_reference_under_pressure(reference_tokens, mode):
    llm = LLM(
        "tiny-llama", backend="triton", block_size=4, num_gpu_blocks=6, num_cpu_blocks=8, preemption_mode=mode
    )
    assert tokens(llm) == reference_tokens
    assert llm.stats.num_preemptions[mode] > 0  # the pool was small enough to preempt
    if mode == "swap":
        assert llm.stats.blocks_swapped_out > 0 and llm.stats.blocks_swapped_in > 0
    assert llm.block_manager.device.num_free == 6 and llm.block_manager.host.num_free == 8


def test_triton_engine_parallel_sampling_equals_reference():
    params = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=4, ignore_eos=True)
    outs = [
        [
            o.token_ids
            for o in LLM("tiny-llama", backend=name, block_size=4, num_gpu_blocks=32)
            .generate(PROMPTS[0], params, use_tqdm=False)[0]
            .outputs
        ]
        for name in ("reference", "triton")
    ]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("model", ["tiny-qwen2", "tiny-mistral", "tiny-gpt2", "tiny-opt"])
def test_triton_engine_equals_reference_on_every_tiny_model(model):
    got = {
        name: tokens(LLM(model, backend=name, block_size=8, num_gpu_blocks=32))
        for name in ("reference", "triton")
    }
    assert got["triton"] == got["reference"]


def test_triton_prefix_caching_reads_the_cached_prefix_like_the_reference():
    # the second wave's prompts start with the first wave's 12 tokens: their prefill is the
    # "prefill after a cached prefix" path of the kernel (q_len < seq_len)
    shared = list(range(20, 32))
    prompts = [{"prompt_token_ids": shared + tail} for tail in ([40, 41], [50, 51, 52], [60])]
    got = {}
    for name in ("reference", "triton"):
        llm = LLM("tiny-llama", backend=name, block_size=4, num_gpu_blocks=48, enable_prefix_caching=True)
        llm.generate(prompts[:1], GREEDY, use_tqdm=False)
        got[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        assert llm.stats.prefix_cache_hits > 0
    assert got["triton"] == got["reference"]


def test_triton_beam_search_equals_reference():
    from minipaged import BeamSearchParams

    params = BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True)
    got = {
        name: [
            [s.token_ids for s in out.sequences]
            for out in LLM("tiny-llama", backend=name, block_size=4, num_gpu_blocks=48).beam_search(
                PROMPTS[:2], params
            )
        ]
        for name in ("reference", "triton")
    }
    assert got["triton"] == got["reference"]
