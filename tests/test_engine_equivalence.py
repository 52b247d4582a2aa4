"""End to end: the engine's greedy output equals transformers' own generate, token for token.

The oracle is `model.generate(do_sample=False)` on a separate copy of the same preset (same seed, so
the same weights) running transformers' own attention (SDPA) and its own KV cache, one prompt at a
time with no padding. The engine runs the same weights on the paged KV cache, with every prompt in
one batch, at several block sizes: a difference anywhere in the slot mapping, the block tables,
the packing of a step's tokens or the positions shows up as a different token or log-probability.
"""

from __future__ import annotations

import math

import pytest
import torch

from minipaged import LLM, SamplingParams
from minipaged.presets import load_preset

ARCHS = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2", "tiny-opt"]
BLOCK_SIZES = [1, 8, 16]
MAX_TOKENS = 12
WEIGHT_SEED = 0
VOCAB_LOW, VOCAB_HIGH = 3, 259  # byte tokens: no pad / bos / eos in the prompts
LOGPROB_TOL = 1e-4


def random_prompts(seed: int, num: int = 5, max_len: int = 40) -> list[list[int]]:
    """`num` prompts of mixed lengths, the shortest (1) and the longest (`max_len`) always among them."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [
        1,
        max_len,
        *torch.randint(2, max_len, (num - 2,), generator=gen).tolist(),
    ]
    order = torch.randperm(num, generator=gen).tolist()
    lengths = [lengths[i] for i in order]
    return [
        torch.randint(VOCAB_LOW, VOCAB_HIGH, (n,), generator=gen).tolist()
        for n in lengths
    ]


def as_requests(prompts: list[list[int]]) -> list[dict]:
    return [{"prompt_token_ids": p} for p in prompts]


def hf_model(name: str) -> torch.nn.Module:
    model = load_preset(name, WEIGHT_SEED)
    model.set_attn_implementation("sdpa")
    return model


def hf_greedy(
    model, prompt: list[int], max_tokens: int, eos_token_id: int | None = None
):
    """transformers' greedy generate for one prompt: (generated tokens, log_softmax of each step's logits)."""
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
        do_sample=False,
        max_new_tokens=max_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    # each [vocab]
    logprobs = [torch.log_softmax(step[0].float(), dim=-1) for step in out.logits]
    return tokens, logprobs


def sample_tokens(llm: LLM, prompts: list[dict], params: SamplingParams) -> list:
    """Each request's samples' tokens, in order."""
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs]


def beam_tokens(llm: LLM, prompts: list[dict], params) -> list:
    """Each request's beams' tokens, best first."""
    outs = llm.beam_search(prompts, params)
    return [[s.token_ids for s in o.sequences] for o in outs]


def engine(name: str, block_size: int, num_gpu_blocks: int = 256, **kwargs) -> LLM:
    return LLM(
        name,
        block_size=block_size,
        num_gpu_blocks=num_gpu_blocks,
        seed=WEIGHT_SEED,
        **kwargs,
    )


def assert_all_blocks_free(llm: LLM) -> None:
    manager = llm.block_manager
    assert manager.device.num_free == llm.cache_config.num_gpu_blocks
    assert manager.host.num_free == llm.cache_config.num_cpu_blocks
    assert not manager.device_tables and not manager.host_tables
    assert not llm.has_unfinished_requests()


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=ARCHS)
def reference(request):
    """Per architecture: the prompts and transformers' greedy tokens and log-probabilities for each."""
    name = request.param
    prompts = random_prompts(seed=ARCHS.index(name) + 100)
    model = hf_model(name)
    return name, prompts, [hf_greedy(model, p, MAX_TOKENS) for p in prompts]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_greedy_matches_transformers(reference, block_size):
    name, prompts, expected = reference
    num_blocks = sum(math.ceil((len(p) + MAX_TOKENS) / block_size) for p in prompts) + 4
    llm = engine(name, block_size, num_gpu_blocks=num_blocks)
    outs = llm.generate(as_requests(prompts), GREEDY, use_tqdm=False)

    # outputs come back in the prompts' order
    assert [o.prompt_token_ids for o in outs] == prompts
    for out, (tokens, logprobs) in zip(outs, expected, strict=True):
        (completion,) = out.outputs
        assert completion.token_ids == tokens, (
            f"{name}, block_size {block_size}, prompt {out.prompt_token_ids}"
        )
        assert completion.finish_reason == "length"
        # [MAX_TOKENS]
        want = torch.stack([lp[t] for lp, t in zip(logprobs, tokens, strict=True)])
        torch.testing.assert_close(
            torch.tensor(completion.logprobs),
            want,
            atol=LOGPROB_TOL,
            rtol=0,
            check_dtype=False,
        )
        assert completion.cumulative_logprob == pytest.approx(
            float(want.sum()), abs=LOGPROB_TOL
        )
        assert completion.text == llm.tokenizer.decode(tokens)
    assert llm.stats.generated_tokens == MAX_TOKENS * len(prompts)
    assert_all_blocks_free(llm)


def test_each_prompt_alone_gives_the_batched_result(reference):
    """Batching is invisible: a prompt generated alone gets the tokens it got in the mixed batch."""
    name, prompts, expected = reference
    llm = engine(name, block_size=4)
    for prompt, (tokens, _) in zip(prompts[:2], expected[:2], strict=True):
        (out,) = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)
        assert out.outputs[0].token_ids == tokens
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_greedy_matches_transformers_through_preemption(preemption_mode):
    """A pool too small for the batch preempts requests; their tokens must not change."""
    name, block_size = "tiny-llama", 4
    prompts = random_prompts(seed=7, num=6, max_len=30)
    model = hf_model(name)
    expected = [hf_greedy(model, p, MAX_TOKENS)[0] for p in prompts]
    largest = max(math.ceil((len(p) + MAX_TOKENS) / block_size) for p in prompts)
    llm = engine(
        name,
        block_size,
        num_gpu_blocks=largest + 3,
        num_cpu_blocks=64,
        preemption_mode=preemption_mode,
    )
    outs = llm.generate(as_requests(prompts), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.stats.num_preemptions[preemption_mode] > 0, (
        "the pool was meant to be too small"
    )
    if preemption_mode == "swap":
        assert llm.stats.blocks_swapped_out > 0 and llm.stats.blocks_swapped_in > 0
    assert_all_blocks_free(llm)


def test_eos_stops_a_sequence_and_is_included():
    """finish_reason "stop" when the EOS is sampled (the EOS is in token_ids), "length" otherwise."""
    name = "tiny-llama"
    prompts = random_prompts(seed=11)
    model = hf_model(name)
    llm = engine(name, block_size=8)
    free_running = [
        o.outputs[0].token_ids
        for o in llm.generate(as_requests(prompts), GREEDY, use_tqdm=False)
    ]

    # Make the EOS a token that greedy emits mid-way for some prompt but never for another.
    candidates = [t for tokens in free_running for t in tokens[2:-1]]
    eos = next(
        t
        for t in candidates
        if any(t in tokens[:-1] for tokens in free_running)
        and any(t not in tokens for tokens in free_running)
    )
    llm.eos_token_id = eos
    outs = llm.generate(
        as_requests(prompts),
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
        use_tqdm=False,
    )

    reasons = []
    for prompt, out, tokens in zip(prompts, outs, free_running, strict=True):
        (completion,) = out.outputs
        if eos in tokens:
            want = tokens[: tokens.index(eos) + 1]  # up to and with the first EOS
            assert completion.finish_reason == "stop"
        else:
            want = tokens
            assert completion.finish_reason == "length"
        assert completion.token_ids == want
        assert len(completion.logprobs) == len(want)
        assert (
            completion.token_ids
            == hf_greedy(model, prompt, MAX_TOKENS, eos_token_id=eos)[0]
        )
        reasons.append(completion.finish_reason)
    assert "stop" in reasons and "length" in reasons
    assert any(len(o.outputs[0].token_ids) < MAX_TOKENS for o in outs)

    # ignore_eos=True generates through the EOS.
    again = llm.generate(as_requests(prompts), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == free_running
    assert all(o.outputs[0].finish_reason == "length" for o in again)
    assert_all_blocks_free(llm)


def test_string_prompt_is_tokenized_with_bos():
    """A string prompt is the byte tokenizer's ids (BOS first); the output's text decodes its tokens."""
    name = "tiny-qwen2"
    llm = engine(name, block_size=8)
    text = "Paged attention!"
    (out,) = llm.generate(text, GREEDY, use_tqdm=False)
    ids = llm.tokenizer.encode(text)
    assert (
        out.prompt == text
        and out.prompt_token_ids == ids
        and ids[0] == llm.tokenizer.bos_token_id
    )
    assert out.outputs[0].token_ids == hf_greedy(hf_model(name), ids, MAX_TOKENS)[0]
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids)
