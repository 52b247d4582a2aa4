"""Sampling: the `sample` function, the parameters' checks, and parallel sampling in the engine.

`sample` is held to what its docstring promises: greedy is the argmax; temperature, top-k and top-p
reshape the distribution drawn from (checked against the expected frequencies over many seeded
draws); the reported log-probability is always the model's own, log_softmax of the raw logits. In
the engine, n samples share the prompt's blocks until they diverge (copy-on-write), and a seeded
request gets the same tokens whatever it is batched with.
"""

from __future__ import annotations

import pytest
import torch

from minipaged import LLM, BeamSearchParams, SamplingParams
from minipaged.presets import ByteTokenizer, load_preset
from minipaged.sampling import sample, seeded_generator

VOCAB = 259
WEIGHT_SEED = 0


def random_logits(seed: int, vocab: int = VOCAB, spread: float = 3.0) -> torch.Tensor:
    # [vocab]
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * spread


def draw(
    logits: torch.Tensor, params: SamplingParams, num: int, seed: int = 0
) -> torch.Tensor:
    """`num` tokens drawn one by one with one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.tensor([sample(logits, params, gen)[0] for _ in range(num)])


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).float() / len(tokens)  # [vocab]


# ---- sample() -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax_with_the_models_logprob(seed):
    logits = random_logits(seed)
    token, logprob = sample(logits, SamplingParams(temperature=0.0), None)
    assert token == int(torch.argmax(logits))
    assert logprob == pytest.approx(
        float(torch.log_softmax(logits, -1)[token]), abs=1e-6
    )


def test_greedy_ignores_the_generator_and_top_k_top_p():
    logits = random_logits(1)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    for params in (
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, top_k=5, top_p=0.3),
    ):
        assert sample(logits, params, gen)[0] == int(torch.argmax(logits))
    assert torch.equal(gen.get_state(), state)  # greedy draws nothing


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0])
def test_top_k_one_and_tiny_top_p_are_greedy(temperature):
    logits = random_logits(2)
    best = int(torch.argmax(logits))
    for params in (
        SamplingParams(temperature=temperature, top_k=1),
        SamplingParams(temperature=temperature, top_p=1e-6),
    ):
        assert draw(logits, params, 50).eq(best).all()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_follow_the_tempered_softmax(temperature):
    logits = random_logits(3, vocab=6, spread=1.0)
    tokens = draw(logits, SamplingParams(temperature=temperature), 6000, seed=4)
    expected = torch.softmax(logits / temperature, -1)
    torch.testing.assert_close(frequencies(tokens, 6), expected, atol=0.02, rtol=0)


def test_higher_temperature_flattens_the_distribution():
    logits = random_logits(4)
    best = int(torch.argmax(logits))
    cold = draw(logits, SamplingParams(temperature=0.2), 500)
    hot = draw(logits, SamplingParams(temperature=5.0), 500)
    assert (cold == best).float().mean() > (hot == best).float().mean()
    assert len(set(hot.tolist())) > len(set(cold.tolist()))


def test_top_k_never_draws_outside_the_k_best():
    logits = random_logits(5, spread=0.5)  # flat enough that the k best all come up
    k = 4
    tokens = draw(logits, SamplingParams(temperature=1.0, top_k=k), 3000)
    top = torch.topk(logits, k).indices
    assert set(tokens.tolist()) == set(top.tolist())
    expected = torch.zeros(VOCAB)
    expected[top] = torch.softmax(logits[top], -1)  # the k best, renormalized
    torch.testing.assert_close(frequencies(tokens, VOCAB), expected, atol=0.03, rtol=0)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.25, 0.1])
    logits = torch.log(probs)  # sorted: 0.5, 0.25, then 0.1 twice, 0.05
    tokens = draw(logits, SamplingParams(temperature=1.0, top_p=0.7), 3000)
    # 0.5 + 0.25 reaches 0.7: nothing else is needed
    assert set(tokens.tolist()) == {1, 3}
    torch.testing.assert_close(
        frequencies(tokens, 5),
        torch.tensor([0.0, 2 / 3, 0.0, 1 / 3, 0.0]),
        atol=0.03,
        rtol=0,
    )
    tokens = draw(logits, SamplingParams(temperature=1.0, top_p=0.8), 3000)
    # one of the 0.1s joins
    assert set(tokens.tolist()) <= {1, 3, 2, 4} and len(set(tokens.tolist())) == 3


def test_top_k_then_top_p():
    """top_p applies to the distribution that top_k leaves, renormalized (as vLLM does)."""
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    # top_k=2 leaves 0.4 / 0.7 = 0.57 and 0.43: 0.57 alone reaches top_p=0.5 (on the raw
    # probabilities 0.4 would not, and token 1 would join).
    tokens = draw(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.5), 500)
    assert set(tokens.tolist()) == {0}
    tokens = draw(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.6), 1000)
    assert set(tokens.tolist()) == {0, 1}


def test_logprob_is_of_the_raw_logits_not_the_reshaped_distribution():
    logits = random_logits(6)
    raw = torch.log_softmax(logits, -1)
    gen = torch.Generator().manual_seed(1)
    for params in (
        SamplingParams(temperature=0.3),
        SamplingParams(temperature=3.0, top_k=10),
        SamplingParams(temperature=1.0, top_p=0.5),
    ):
        for _ in range(20):
            token, logprob = sample(logits, params, gen)
            assert logprob == pytest.approx(float(raw[token]), abs=1e-6)


def test_masked_tokens_are_never_drawn():
    logits = random_logits(7, vocab=10)
    logits[[0, 3, 9]] = float("-inf")
    tokens = draw(logits, SamplingParams(temperature=2.0), 500)
    assert not set(tokens.tolist()) & {0, 3, 9}


def test_seeded_generators_reproduce_and_differ_by_index():
    logits = random_logits(8, spread=0.5)
    params = SamplingParams(temperature=1.0)

    def tokens(seed, index):
        gen = seeded_generator(seed, index)
        return [sample(logits, params, gen)[0] for _ in range(20)]

    assert tokens(11, 0) == tokens(11, 0)
    assert tokens(11, 0) != tokens(11, 1)
    assert tokens(11, 0) != tokens(12, 0)


# ---- parameter checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0}, "n"),
        ({"n": -2}, "n"),
        ({"n": 1.5}, "n"),
        ({"n": True}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": 4.0}, "max_tokens"),
        ({"seed": "seven"}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_sampling_params_reject_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} "):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"beam_width": 0}, "beam_width"),
        ({"beam_width": 2.0}, "beam_width"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"length_penalty": float("nan")}, "length_penalty"),
        ({"length_penalty": float("inf")}, "length_penalty"),
    ],
)
def test_beam_search_params_reject_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} "):
        BeamSearchParams(**kwargs)


def test_params_defaults_and_edges_are_accepted():
    params = SamplingParams()
    assert (
        params.n,
        params.temperature,
        params.top_p,
        params.top_k,
        params.max_tokens,
    ) == (
        1,
        1.0,
        1.0,
        0,
        16,
    )
    assert params.seed is None and not params.ignore_eos and not params.greedy
    assert SamplingParams(temperature=0).greedy
    SamplingParams(top_p=1.0, top_k=0, temperature=0, n=1, max_tokens=1, seed=0)
    BeamSearchParams(beam_width=1, max_tokens=1, length_penalty=-1.0)


# ---- parallel sampling in the engine --------------------------------------------------------------


def engine(seed: int = WEIGHT_SEED, **kwargs) -> LLM:
    kwargs.setdefault("block_size", 4)
    kwargs.setdefault("num_gpu_blocks", 128)
    return LLM("tiny-llama", seed=seed, **kwargs)


def prompt_ids(seed: int, length: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "prompt_token_ids": torch.randint(3, VOCAB, (length,), generator=gen).tolist()
    }


def tokens_of(out) -> list[list[int]]:
    return [c.token_ids for c in out.outputs]


def assert_all_blocks_free(llm: LLM) -> None:
    manager = llm.block_manager
    assert manager.device.num_free == llm.cache_config.num_gpu_blocks
    assert manager.host.num_free == llm.cache_config.num_cpu_blocks
    assert not manager.device_tables and not manager.host_tables
    assert not llm.has_unfinished_requests()


def test_parallel_samples_share_the_prompt_until_they_diverge():
    n, block_size, prompt_len = 4, 4, 10  # 2 full prompt blocks and a partial one
    llm = engine(block_size=block_size)
    manager, device = llm.block_manager, llm.block_manager.device
    params = SamplingParams(n=n, temperature=1.0, max_tokens=8, seed=3, ignore_eos=True)
    llm.add_request(prompt_ids(1, prompt_len), params)

    assert llm.step() == []  # the prefill: one prompt's blocks, shared by the n samples
    (group,) = llm.scheduler.running
    tables = [manager.get_block_table(seq).block_ids for seq in group.seqs]
    assert len(tables) == n and all(t == tables[0] for t in tables)
    assert len(tables[0]) == 3 and device.num_used == 3
    assert all(device.ref_count(b) == n for b in tables[0])
    assert llm.stats.cow_copies == 0
    assert llm.step_stats[-1].blocks_shared == 3

    # the first decode writes into the shared partial block: copy-on-write
    assert llm.step() == []
    tables = [manager.get_block_table(seq).block_ids for seq in group.seqs]
    # the full prompt blocks stay shared
    assert all(t[:2] == tables[0][:2] for t in tables)
    assert all(device.ref_count(b) == n for b in tables[0][:2])
    # each sample has its own copy of the partial block
    assert len({t[2] for t in tables}) == n
    assert llm.stats.cow_copies == n - 1  # the last holder writes into the original
    assert llm.step_stats[-1].blocks_copied == n - 1
    assert device.num_used == 2 + n

    finished = []
    while llm.has_unfinished_requests():
        finished += llm.step()
    (out,) = finished
    samples = tokens_of(out)
    assert len(samples) == n and all(len(s) == 8 for s in samples)
    assert len({tuple(s) for s in samples}) > 1, "the samples are all identical"
    assert [c.index for c in out.outputs] == list(range(n))
    assert_all_blocks_free(llm)


def test_parallel_samples_of_a_block_aligned_prompt_never_copy():
    """A prompt that fills its blocks exactly: each sample's first token opens a new block of its own."""
    n = 3
    llm = engine(block_size=4)
    (out,) = llm.generate(
        prompt_ids(2, 8),
        SamplingParams(n=n, max_tokens=6, seed=5, ignore_eos=True),
        use_tqdm=False,
    )
    assert llm.stats.cow_copies == 0
    # the two prompt blocks, held once
    assert llm.stats.max_blocks_saved_by_sharing >= 2 * (n - 1)
    assert len({tuple(s) for s in tokens_of(out)}) > 1
    assert_all_blocks_free(llm)


def test_sampled_logprobs_are_the_models():
    """The logprobs reported for sampled tokens are log_softmax of the model's logits (no temperature)."""
    llm = engine()
    prompt = prompt_ids(3, 7)
    (out,) = llm.generate(
        prompt,
        SamplingParams(
            n=2, temperature=1.7, top_k=40, max_tokens=6, seed=2, ignore_eos=True
        ),
        use_tqdm=False,
    )
    model = load_preset("tiny-llama", WEIGHT_SEED)
    model.set_attn_implementation("sdpa")
    p = prompt["prompt_token_ids"]
    for completion in out.outputs:
        ids = torch.tensor([p + completion.token_ids])
        with torch.no_grad():
            # [len, vocab]
            logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
        rows = torch.arange(len(p) - 1, ids.shape[1] - 1)
        want = logprobs[rows, torch.tensor(completion.token_ids)]
        torch.testing.assert_close(
            torch.tensor(completion.logprobs), want, atol=1e-4, rtol=0
        )
        assert completion.cumulative_logprob == pytest.approx(
            float(want.sum()), abs=1e-3
        )


MIXED = SamplingParams(
    n=3, temperature=0.8, top_k=50, top_p=0.9, max_tokens=10, seed=123, ignore_eos=True
)


def test_seeded_request_reproduces_across_engines():
    prompt = prompt_ids(4, 12)
    first = engine().generate(prompt, MIXED, use_tqdm=False)[0]
    second = engine(block_size=16).generate(prompt, MIXED, use_tqdm=False)[0]
    assert tokens_of(first) == tokens_of(second)
    other_seed = SamplingParams(
        n=3, temperature=0.8, top_k=50, top_p=0.9, max_tokens=10, seed=124
    )
    assert tokens_of(
        engine().generate(prompt, other_seed, use_tqdm=False)[0]
    ) != tokens_of(first)


def test_seeded_request_does_not_depend_on_its_batch():
    prompt = prompt_ids(5, 12)
    alone = engine()
    (want,) = alone.generate(prompt, MIXED, use_tqdm=False)
    assert_all_blocks_free(alone)

    llm = engine(block_size=8)
    prompts = [prompt_ids(6, 30), prompt, prompt_ids(7, 3), prompt_ids(8, 19)]
    params = [
        SamplingParams(n=2, temperature=1.2, max_tokens=14, seed=9, ignore_eos=True),
        MIXED,
        SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
        SamplingParams(temperature=0.5, top_p=0.5, max_tokens=7),
    ]
    outs = llm.generate(prompts, params, use_tqdm=False)
    got = outs[1]
    assert tokens_of(got) == tokens_of(want)
    for a, b in zip(got.outputs, want.outputs, strict=True):
        torch.testing.assert_close(
            torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0
        )
    assert [len(c.token_ids) for c in outs[0].outputs] == [14, 14] and len(
        outs[2].outputs[0].token_ids
    ) == 3
    assert_all_blocks_free(llm)


def test_unseeded_requests_draw_from_the_engine_seed():
    """seed=None: the engine's seed decides, so two engines seeded alike agree, and unlike do not."""
    params = SamplingParams(n=2, temperature=1.0, max_tokens=8, ignore_eos=True)
    prompts = [prompt_ids(9, 5), prompt_ids(10, 11)]

    def run(engine_seed: int) -> list[list[list[int]]]:
        # the same weights whatever the engine's seed
        model = load_preset("tiny-llama", WEIGHT_SEED)
        llm = LLM(
            model,
            block_size=4,
            num_gpu_blocks=64,
            seed=engine_seed,
            tokenizer=ByteTokenizer(),
        )
        outs = llm.generate(prompts, params, use_tqdm=False) + llm.generate(
            prompts, params, use_tqdm=False
        )
        assert_all_blocks_free(llm)
        return [tokens_of(o) for o in outs]

    first, again, other = run(1), run(1), run(2)
    assert first == again
    assert first != other
    assert first[:2] != first[2:], "a repeated unseeded request drew the same samples"


def test_a_sample_that_hits_eos_stops_alone():
    """One of n samples ends at the EOS; the others go on unchanged, and every block comes back."""
    n = 4
    llm = engine(block_size=4)
    prompt = prompt_ids(11, 6)
    params = SamplingParams(
        n=n, temperature=1.0, max_tokens=10, seed=17, ignore_eos=True
    )
    free = tokens_of(llm.generate(prompt, params, use_tqdm=False)[0])

    eos = next(
        t for s in free for t in s[1:-1] if sum(t in other for other in free) < n
    )  # emitted mid-way by some sample, never by another
    llm.eos_token_id = eos
    stopping = SamplingParams(
        n=n, temperature=1.0, max_tokens=10, seed=17, ignore_eos=False
    )
    (out,) = llm.generate(prompt, stopping, use_tqdm=False)
    reasons = set()
    for completion, tokens in zip(out.outputs, free, strict=True):
        if eos in tokens:
            assert completion.token_ids == tokens[: tokens.index(eos) + 1]
            assert completion.finish_reason == "stop"
        else:
            assert completion.token_ids == tokens
            assert completion.finish_reason == "length"
        reasons.add(completion.finish_reason)
    assert reasons == {"stop", "length"}
    assert_all_blocks_free(llm)
