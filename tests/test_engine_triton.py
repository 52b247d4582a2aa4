"""The engine on the Triton backend gives the reference backend's tokens, under memory pressure too.

Runs wherever triton is installed: compiled on a GPU, through Triton's interpreter on a CPU (slow,
so the model and the prompts are tiny). Both engines of a comparison run on DEVICE
(minipaged.testing.device_for): CUDA on a GPU machine, where the Triton backend refuses CPU tensors.
"""

from __future__ import annotations

import pytest
import torch

from minipaged import LLM, SamplingParams, engine
from minipaged.backend import available_backends
from minipaged.testing import device_for

pytestmark = pytest.mark.skipif(
    "triton" not in available_backends(), reason="triton is not installed"
)

DEVICE = str(device_for("triton"))

PROMPTS = [
    {"prompt_token_ids": [1, 5, 6, 7, 8, 9]},
    {"prompt_token_ids": [1, 40, 41]},
    {"prompt_token_ids": [9] * 9},
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def tokens(llm: LLM) -> list[list[int]]:
    return [
        out.outputs[0].token_ids
        for out in llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    ]


@pytest.fixture(scope="module")
def reference_tokens() -> list[list[int]]:
    return tokens(LLM("tiny-llama", block_size=4, num_gpu_blocks=64, device=DEVICE))


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_triton_engine_equals_reference_under_pressure(reference_tokens, mode):
    llm = LLM(
        "tiny-llama",
        backend="triton",
        block_size=4,
        num_gpu_blocks=6,
        num_cpu_blocks=8,
        preemption_mode=mode,
        device=DEVICE,
    )
    assert tokens(llm) == reference_tokens
    assert llm.stats.num_preemptions[mode] > 0  # the pool was small enough to preempt
    if mode == "swap":
        assert llm.stats.blocks_swapped_out > 0 and llm.stats.blocks_swapped_in > 0
    assert (
        llm.block_manager.device.num_free == 6 and llm.block_manager.host.num_free == 8
    )


def test_triton_engine_parallel_sampling_equals_reference():
    params = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=4, ignore_eos=True)
    outs = [
        [
            o.token_ids
            for o in LLM(
                "tiny-llama",
                backend=name,
                block_size=4,
                num_gpu_blocks=32,
                device=DEVICE,
            )
            .generate(PROMPTS[0], params, use_tqdm=False)[0]
            .outputs
        ]
        for name in ("reference", "triton")
    ]
    assert outs[0] == outs[1]


@pytest.mark.parametrize(
    "model", ["tiny-qwen2", "tiny-mistral", "tiny-gpt2", "tiny-opt"]
)
def test_triton_engine_equals_reference_on_every_tiny_model(model):
    got = {
        name: tokens(
            LLM(model, backend=name, block_size=8, num_gpu_blocks=32, device=DEVICE)
        )
        for name in ("reference", "triton")
    }
    assert got["triton"] == got["reference"]


def test_triton_prefix_caching_reads_the_cached_prefix_like_the_reference():
    # the second wave's prompts start with the first wave's 12 tokens: their prefill is the
    # "prefill after a cached prefix" path of the kernel (q_len < seq_len)
    shared = list(range(20, 32))
    prompts = [
        {"prompt_token_ids": shared + tail} for tail in ([40, 41], [50, 51, 52], [60])
    ]
    got = {}
    for name in ("reference", "triton"):
        llm = LLM(
            "tiny-llama",
            backend=name,
            block_size=4,
            num_gpu_blocks=48,
            enable_prefix_caching=True,
            device=DEVICE,
        )
        llm.generate(prompts[:1], GREEDY, use_tqdm=False)
        got[name] = [
            o.outputs[0].token_ids
            for o in llm.generate(prompts, GREEDY, use_tqdm=False)
        ]
        assert llm.stats.prefix_cache_hits > 0
    assert got["triton"] == got["reference"]


def test_triton_beam_search_equals_reference():
    from minipaged import BeamSearchParams

    params = BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True)
    got = {
        name: [
            [s.token_ids for s in out.sequences]
            for out in LLM(
                "tiny-llama",
                backend=name,
                block_size=4,
                num_gpu_blocks=48,
                device=DEVICE,
            ).beam_search(PROMPTS[:2], params)
        ]
        for name in ("reference", "triton")
    }
    assert got["triton"] == got["reference"]


@pytest.mark.parametrize("device", ["cpu", None])  # None: LLM's default device, the CPU
def test_triton_on_the_cpu_without_the_interpreter_is_refused_at_construction(
    monkeypatch, device
):
    """A GPU machine's state (the interpreter off) with CPU tensors: one clear ValueError, before loading."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr(engine, "_load_model", no_loading)
    kwargs = {} if device is None else {"device": device}
    with pytest.raises(ValueError) as error:
        LLM("tiny-llama", backend="triton", **kwargs)
    message = str(error.value)
    assert "device='cpu' with backend='triton'" in message
    assert (
        "use device='cuda'" in message
        and "set TRITON_INTERPRET=1 before triton" in message
    )


def test_the_reference_on_the_cpu_is_fine_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert LLM("tiny-llama", block_size=4, num_gpu_blocks=8).runner.device.type == "cpu"


def test_triton_engine_with_chunked_prefill_equals_reference(reference_tokens):
    """Chunks of 5 tokens: a prompt's later chunks are prefills after a cached prefix
    (q_len < seq_len), beside the decodes of the other prompts, in one varlen call."""
    llm = LLM(
        "tiny-llama",
        backend="triton",
        block_size=4,
        num_gpu_blocks=64,
        device=DEVICE,
        enable_chunked_prefill=True,
        max_num_batched_tokens=5,
        max_num_seqs=3,
    )
    assert tokens(llm) == reference_tokens
    assert max(s.num_batched_tokens for s in llm.step_stats) == 5
    assert llm.block_manager.device.num_free == 64
