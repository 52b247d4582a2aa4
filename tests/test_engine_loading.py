"""Where a model comes from: a preset, a local checkpoint directory, or a model object; and the pool size.

Nothing is downloaded: the checkpoint directory is written here from a preset with save_pretrained.
"""

from __future__ import annotations

import pytest
import torch

from minipaged import LLM, SamplingParams
from minipaged.config import kv_cache_bytes_per_block
from minipaged.presets import load_preset

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = [
    {"prompt_token_ids": [1, 40, 41, 42]},
    {"prompt_token_ids": list(range(3, 20))},
]


def tokens(llm: LLM) -> list[list[int]]:
    return [
        out.outputs[0].token_ids
        for out in llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    ]


@pytest.fixture(scope="module")
def preset_tokens() -> list[list[int]]:
    return tokens(LLM("tiny-llama", seed=3, num_gpu_blocks=64))


def test_a_local_checkpoint_directory_gives_the_presets_tokens(tmp_path, preset_tokens):
    load_preset("tiny-llama", seed=3).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), num_gpu_blocks=64)
    assert tokens(llm) == preset_tokens
    assert llm.tokenizer is None  # no tokenizer files were saved: token-id prompts only
    with pytest.raises(
        ValueError, match="prompt is a string but the model has no tokenizer"
    ):
        llm.generate("hello", GREEDY, use_tqdm=False)


def test_a_model_object_gives_the_presets_tokens(preset_tokens):
    model = load_preset("tiny-llama", seed=3)
    llm = LLM(model, num_gpu_blocks=64)
    assert tokens(llm) == preset_tokens
    # switched, as the docstring says
    assert model.config._attn_implementation == "minipaged"


def test_the_seed_changes_the_presets_weights(preset_tokens):
    assert tokens(LLM("tiny-llama", seed=4, num_gpu_blocks=64)) != preset_tokens


def test_pool_size_derived_from_the_memory_budget():
    # tiny-llama: 2 layers, 2 KV heads of 16, fp32: 2 x 2 x 16 x 2 x 16 x 4 = 8 KiB per block of 16.
    per_block = kv_cache_bytes_per_block(
        16, num_layers=2, num_kv_heads=2, head_dim=16, dtype_bytes=4
    )
    assert per_block == 8192
    llm = LLM("tiny-llama", kv_cache_memory=100 * per_block + 5)
    assert llm.cache_config.num_gpu_blocks == 100
    # the swap space defaults to the same size
    assert llm.cache_config.num_cpu_blocks == 100
    assert llm.runner.k_caches[0].shape == (100, 16, 2, 16)
    assert tokens(llm)  # and it serves


def test_a_bfloat16_engine_keeps_its_dtype():
    llm = LLM("tiny-llama", dtype=torch.bfloat16, num_gpu_blocks=64)
    assert llm.runner.k_caches[0].dtype == torch.bfloat16
    assert all(len(t) == 6 for t in tokens(llm))


@pytest.mark.parametrize("bad", [0, -5, 1.5])
def test_a_bad_memory_budget_is_refused(bad):
    with pytest.raises(
        ValueError, match="kv_cache_memory must be a positive number of bytes"
    ):
        LLM("tiny-llama", kv_cache_memory=bad)
