"""Bad input: a ValueError that names the field, nothing queued, and an engine that still serves.

Each case sends something the engine can never serve, expects `ValueError` with the field's name in
the message, and then checks that the same engine answers a valid request correctly (the tokens
transformers' greedy generate gives), so a refused request leaves nothing behind.
"""

from __future__ import annotations

import pytest
import torch

from minipaged import LLM, BeamSearchParams, SamplingParams
from minipaged.presets import load_preset

WEIGHT_SEED = 0
BLOCK_SIZE = 4
NUM_GPU_BLOCKS = 32
MAX_MODEL_LEN = 64
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def random_ids(seed: int, length: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (length,), generator=gen).tolist()


VALID_PROMPT = random_ids(0, 9)


@pytest.fixture(scope="module")
def expected() -> list[int]:
    """transformers' greedy tokens for VALID_PROMPT: what a healthy engine must answer."""
    model = load_preset("tiny-llama", WEIGHT_SEED)
    model.set_attn_implementation("sdpa")
    out = model.generate(
        torch.tensor([VALID_PROMPT]),
        attention_mask=torch.ones(1, len(VALID_PROMPT), dtype=torch.int64),
        do_sample=False,
        max_new_tokens=GREEDY.max_tokens,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(VALID_PROMPT) :].tolist()


@pytest.fixture(scope="module")
def llm() -> LLM:
    """One engine for every case: each case must leave it as it found it."""
    return LLM(
        "tiny-llama",
        block_size=BLOCK_SIZE,
        num_gpu_blocks=NUM_GPU_BLOCKS,
        num_cpu_blocks=8,
        max_model_len=MAX_MODEL_LEN,
        seed=WEIGHT_SEED,
    )


def assert_still_serves(llm: LLM, expected: list[int]) -> None:
    """Nothing was queued by the refused call, and a valid request gets the right answer."""
    assert not llm.has_unfinished_requests()
    assert llm.block_manager.device.num_free == NUM_GPU_BLOCKS
    (out,) = llm.generate({"prompt_token_ids": VALID_PROMPT}, GREEDY, use_tqdm=False)
    assert out.prompt_token_ids == VALID_PROMPT
    assert out.outputs[0].token_ids == expected
    assert not llm.has_unfinished_requests()
    assert llm.block_manager.device.num_free == NUM_GPU_BLOCKS


# ---- prompts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "field"),
    [
        ({"prompt_token_ids": []}, "prompt must not be empty"),
        ({"prompt_token_ids": [5, -1, 7]}, "prompt_token_ids"),
        ({"prompt_token_ids": [5, 259]}, "prompt_token_ids"),
        ({"prompt_token_ids": [5, 3.0]}, "prompt_token_ids"),
        ({"prompt_token_ids": ["a"]}, "prompt_token_ids"),
        ({"prompt_token_ids": [None]}, "prompt_token_ids"),
        ({"text": "hello"}, "prompt must be"),
        (["hello"], "prompt must be"),
        (None, "prompt must be"),
        (7, "prompt must be"),
        ({"prompt_token_ids": random_ids(1, MAX_MODEL_LEN)}, "max_model_len"),
        # + 6 tokens
        ({"prompt_token_ids": random_ids(2, MAX_MODEL_LEN - 3)}, "max_model_len"),
    ],
    ids=[
        "empty",
        "negative-id",
        "id-past-vocab",
        "float-id",
        "str-id",
        "none-id",
        "dict-without-ids",
        "nested-list",
        "none",
        "int",
        "longer-than-model",
        "longer-with-output",
    ],
)
def test_bad_prompt_is_refused_by_name(llm, expected, prompt, field):
    with pytest.raises(ValueError, match=field):
        llm.generate([prompt], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=field):
        llm.add_request(prompt, GREEDY)
    with pytest.raises(ValueError, match=field):
        llm.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=6))
    assert_still_serves(llm, expected)


@pytest.mark.parametrize("prompt", [None, 7, 3.5])
def test_bad_prompt_outside_a_list_is_refused_by_name(llm, expected, prompt):
    """A single prompt that is neither a string nor a dict (nor a list of them) is a ValueError too."""
    with pytest.raises(ValueError, match="prompt"):
        llm.generate(prompt, GREEDY, use_tqdm=False)
    assert_still_serves(llm, expected)


def test_empty_string_is_the_bos_token(llm, expected):
    """The byte tokenizer starts every prompt with BOS, so "" is a one-token prompt, served as such."""
    (out,) = llm.generate("", GREEDY, use_tqdm=False)
    assert out.prompt == "" and out.prompt_token_ids == [llm.tokenizer.bos_token_id]
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
    (same,) = llm.generate(
        {"prompt_token_ids": [llm.tokenizer.bos_token_id]}, GREEDY, use_tqdm=False
    )
    assert same.outputs[0].token_ids == out.outputs[0].token_ids
    assert_still_serves(llm, expected)


def test_longest_prompt_that_fits_is_served(llm, expected):
    """prompt + max_tokens == max_model_len is allowed; one more token is not."""
    prompt = random_ids(3, MAX_MODEL_LEN - GREEDY.max_tokens)
    (out,) = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [*prompt, 5]}, GREEDY, use_tqdm=False)
    assert_still_serves(llm, expected)


def test_one_bad_prompt_among_good_ones_queues_nothing(llm, expected):
    good = [{"prompt_token_ids": random_ids(i, 5 + i)} for i in range(3)]
    for bad in ({"prompt_token_ids": [259]}, {"prompt_token_ids": []}, 12):
        with pytest.raises(ValueError, match="prompt"):
            llm.generate([good[0], bad, good[1], good[2]], GREEDY, use_tqdm=False)
        assert not llm.has_unfinished_requests()
        with pytest.raises(ValueError, match="prompt"):
            llm.beam_search(
                [good[0], bad], BeamSearchParams(beam_width=2, max_tokens=4)
            )
        assert not llm.has_unfinished_requests()
    with pytest.raises(ValueError, match="params"):
        llm.generate(good, [GREEDY, GREEDY, "greedy"], use_tqdm=False)
    assert not llm.has_unfinished_requests()
    assert_still_serves(llm, expected)
    # the earlier good prompts were not left queued
    outs = llm.generate(good, GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [g["prompt_token_ids"] for g in good]


# ---- memory that can never suffice ------------------------------------------------------------


def test_prompt_needing_more_blocks_than_the_pool_is_refused():
    llm = LLM("tiny-llama", block_size=4, num_gpu_blocks=4, seed=WEIGHT_SEED)
    with pytest.raises(ValueError, match="blocks"):
        llm.generate({"prompt_token_ids": random_ids(4, 30)}, GREEDY, use_tqdm=False)
    assert not llm.has_unfinished_requests()
    (out,) = llm.generate(
        {"prompt_token_ids": random_ids(5, 5)},
        SamplingParams(max_tokens=4),
        use_tqdm=False,
    )
    assert len(out.outputs[0].token_ids) <= 4
    assert llm.block_manager.device.num_free == 4


def test_samples_or_beams_that_can_never_fit_are_refused(llm, expected):
    """Nine sequences that may each grow to four blocks of their own: 36 blocks, beyond the pool of 32."""
    prompt = {"prompt_token_ids": random_ids(6, 2)}
    with pytest.raises(ValueError, match="blocks"):
        llm.beam_search(prompt, BeamSearchParams(beam_width=9, max_tokens=15))
    with pytest.raises(ValueError, match="blocks"):
        llm.generate(prompt, SamplingParams(n=9, max_tokens=15), use_tqdm=False)
    assert_still_serves(llm, expected)


def test_request_that_fits_by_sharing_is_served():
    """n samples share their full prompt blocks: 3 shared + 4 x 1 = 7 blocks suffice, so serve it.

    A pool of 8 blocks of 4 tokens; a 12-token prompt (3 full blocks) and 4 samples of 4 tokens. The
    samples' tokens need one block each (the last sampled token is never written), so the request
    needs 7 blocks at most. Refusing it as "can never fit" (4 x 4 = 16 blocks without sharing)
    contradicts the very saving that PagedAttention's sharing makes.
    """
    llm = LLM("tiny-llama", block_size=4, num_gpu_blocks=8, seed=WEIGHT_SEED)
    params = SamplingParams(n=4, max_tokens=4, seed=1, ignore_eos=True)
    (out,) = llm.generate(
        {"prompt_token_ids": random_ids(7, 12)}, params, use_tqdm=False
    )
    assert [len(c.token_ids) for c in out.outputs] == [4] * 4
    assert llm.block_manager.device.num_free == 8


@pytest.mark.parametrize(
    "params",
    [SamplingParams(n=3, max_tokens=4), BeamSearchParams(beam_width=3, max_tokens=4)],
    ids=["n", "beam"],
)
def test_more_sequences_than_max_num_seqs_is_refused(params):
    """A group is scheduled all or nothing: more sequences than max_num_seqs can never run."""
    llm = LLM(
        "tiny-llama", block_size=4, num_gpu_blocks=32, max_num_seqs=2, seed=WEIGHT_SEED
    )
    prompt = {"prompt_token_ids": random_ids(8, 5)}
    with pytest.raises(ValueError, match="max_num_seqs"):
        if isinstance(params, BeamSearchParams):
            llm.beam_search(prompt, params)
        else:
            llm.generate(prompt, params, use_tqdm=False)
    assert not llm.has_unfinished_requests()
    (out,) = llm.generate(
        prompt, SamplingParams(n=2, max_tokens=4, seed=1), use_tqdm=False
    )
    assert len(out.outputs) == 2


# ---- parameters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: SamplingParams(max_tokens=0), "max_tokens"),
        (lambda: SamplingParams(max_tokens=-1), "max_tokens"),
        (lambda: SamplingParams(n=0), "n"),
        (lambda: SamplingParams(temperature=-1.0), "temperature"),
        (lambda: SamplingParams(top_p=0.0), "top_p"),
        (lambda: SamplingParams(top_p=1.5), "top_p"),
        (lambda: SamplingParams(top_k=-1), "top_k"),
        (lambda: BeamSearchParams(beam_width=0), "beam_width"),
        (lambda: BeamSearchParams(max_tokens=0), "max_tokens"),
    ],
    ids=[
        "max_tokens-0",
        "max_tokens-neg",
        "n-0",
        "temp-neg",
        "top_p-0",
        "top_p-1.5",
        "top_k-neg",
        "beam-0",
        "beam-max0",
    ],
)
def test_bad_parameter_is_refused_by_name(llm, expected, make, field):
    with pytest.raises(ValueError, match=rf"^{field} must"):
        llm.generate({"prompt_token_ids": VALID_PROMPT}, make(), use_tqdm=False)
    assert_still_serves(llm, expected)


def test_wrong_number_or_type_of_sampling_params(llm, expected):
    prompts = [{"prompt_token_ids": VALID_PROMPT}] * 3
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(prompts, [GREEDY, GREEDY], use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(prompts, [GREEDY] * 4, use_tqdm=False)
    with pytest.raises(ValueError, match="params must be"):
        llm.generate(prompts, {"temperature": 0.0}, use_tqdm=False)
    with pytest.raises(ValueError, match="params must be"):
        llm.add_request(prompts[0], None)
    assert_still_serves(llm, expected)
    outs = llm.generate(prompts, [GREEDY] * 3, use_tqdm=False)  # one per prompt is fine
    assert all(o.outputs[0].token_ids == expected for o in outs)


# ---- the engine's own settings ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"backend": "cuda"}, "backend"),
        ({"model": "tiny-nope"}, "model must be a preset"),
        ({"model": 42}, "model"),
        ({"block_size": 0}, "block_size"),
        ({"num_gpu_blocks": 0}, "num_gpu_blocks"),
        ({"num_cpu_blocks": -1}, "num_cpu_blocks"),
        ({"preemption_mode": "lru"}, "preemption_mode"),
        ({"watermark": 1.5}, "watermark"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_model_len": -5}, "max_model_len"),
        ({"max_model_len": 0}, "max_model_len"),
        # 1024 learned positions
        ({"model": "tiny-gpt2", "max_model_len": 2048}, "max_model_len"),
        ({"kv_cache_memory": 0, "num_gpu_blocks": None}, "kv_cache_memory"),
    ],
    ids=lambda case: (
        ",".join(f"{k}={v}" for k, v in case.items())
        if isinstance(case, dict)
        else None
    ),
)
def test_bad_engine_setting_is_refused_by_name(kwargs, field):
    settings = {"block_size": 4, "num_gpu_blocks": 16, **kwargs}
    with pytest.raises(ValueError, match=field):
        LLM(**settings)
