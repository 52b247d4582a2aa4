"""Beam search: the same beams, in the same order, with the same scores as transformers' generate.

The oracle is `model.generate(num_beams=W, num_return_sequences=W, do_sample=False, length_penalty=lp)`
on a separate copy of the same preset, one prompt at a time. The memory side is checked by driving
the engine one step at a time: beams share blocks through fork (reference counts above 1), a beam
that is dropped gives its blocks back, and nothing is left allocated at the end.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from minipaged import LLM, BeamSearchParams, SamplingParams
from minipaged.presets import load_preset
from minipaged.sequence import SequenceStatus

ARCHS = ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-opt"]
WIDTHS = [2, 4]
LENGTH_PENALTIES = [1.0, 0.5, 0.0]
MAX_TOKENS = 8
WEIGHT_SEED = 0
SCORE_TOL = 1e-4


def random_prompt(gen: torch.Generator, length: int) -> list[int]:
    # byte tokens: no pad / bos / eos
    return torch.randint(3, 259, (length,), generator=gen).tolist()


def prompts_for(arch: str) -> list[list[int]]:
    gen = torch.Generator().manual_seed(ARCHS.index(arch) + 300)
    return [random_prompt(gen, 1), random_prompt(gen, 13)]


def hf_model(name: str) -> torch.nn.Module:
    model = load_preset(name, WEIGHT_SEED)
    model.set_attn_implementation("sdpa")
    return model


def engine(name: str, **kwargs) -> LLM:
    kwargs.setdefault("block_size", 4)
    kwargs.setdefault("num_gpu_blocks", 128)
    return LLM(name, seed=WEIGHT_SEED, **kwargs)


def hf_beams(
    model, prompt: list[int], width: int, lp: float, max_tokens: int, eos: int | None
):
    """transformers' beams for one prompt, best first: [(generated tokens, sequences_score)].

    transformers returns rows of a common length: a beam that ended with EOS is followed by filler,
    so each row is cut after its first EOS.
    """
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
        num_beams=width,
        num_return_sequences=width,
        do_sample=False,
        length_penalty=lp,
        max_new_tokens=max_tokens,
        eos_token_id=eos,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    beams = []
    for row, score in zip(out.sequences, out.sequences_scores, strict=True):
        tokens = row[len(prompt) :].tolist()
        if eos is not None and eos in tokens:
            tokens = tokens[: tokens.index(eos) + 1]
        assert all(0 <= t < model.config.vocab_size for t in tokens), (
            "filler left in a beam"
        )
        beams.append((tokens, float(score)))
    return beams


def forward_logprob(model, prompt: list[int], tokens: list[int]) -> float:
    """log p(tokens | prompt) from one plain forward pass: an oracle for cumulative_logprob."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        # [len, vocab]
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    rows = torch.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1)
    return float(logprobs[rows, torch.tensor(tokens)].sum())


def assert_all_blocks_free(llm: LLM) -> None:
    manager = llm.block_manager
    assert manager.device.num_free == llm.cache_config.num_gpu_blocks
    assert manager.host.num_free == llm.cache_config.num_cpu_blocks
    assert not manager.device_tables and not manager.host_tables
    assert not llm.has_unfinished_requests()


def assert_beams_match(llm_out, expected, model, prompt, lp) -> None:
    got = [(s.token_ids, s.score) for s in llm_out.sequences]
    assert [t for t, _ in got] == [t for t, _ in expected], (
        f"beams differ for prompt {prompt}"
    )
    torch.testing.assert_close(
        torch.tensor([s for _, s in got]),
        torch.tensor([s for _, s in expected]),
        atol=SCORE_TOL,
        rtol=0,
    )
    for seq in llm_out.sequences:
        assert seq.score == pytest.approx(
            seq.cumulative_logprob / len(seq.token_ids) ** lp, abs=1e-5
        )
        assert seq.cumulative_logprob == pytest.approx(
            forward_logprob(model, prompt, seq.token_ids), abs=SCORE_TOL
        )


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    """Per architecture: its name, the transformers copy (SDPA) and the prompts."""
    name = request.param
    return name, hf_model(name), prompts_for(name)


@pytest.mark.parametrize("lp", LENGTH_PENALTIES)
@pytest.mark.parametrize("width", WIDTHS)
def test_beam_search_matches_transformers_without_eos(arch, width, lp):
    name, model, prompts = arch
    llm = engine(name)
    params = BeamSearchParams(
        beam_width=width, max_tokens=MAX_TOKENS, length_penalty=lp, ignore_eos=True
    )
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.prompt_token_ids == prompt
        assert len(out.sequences) == width
        assert all(len(s.token_ids) == MAX_TOKENS for s in out.sequences)
        # distinct beams
        assert len({tuple(s.token_ids) for s in out.sequences}) == width
        assert_beams_match(
            out, hf_beams(model, prompt, width, lp, MAX_TOKENS, None), model, prompt, lp
        )
        assert out.sequences[0].text == llm.tokenizer.decode(out.sequences[0].token_ids)
    assert_all_blocks_free(llm)


def pick_eos(model, prompt, width, lp) -> tuple[int, list]:
    """A token that makes transformers end some returned beams early with it, and not others."""
    free = hf_beams(model, prompt, width, lp, MAX_TOKENS, None)
    candidates = [t for tokens, _ in free for t in tokens[1:-1]]
    for eos in dict.fromkeys(candidates):
        beams = hf_beams(model, prompt, width, lp, MAX_TOKENS, eos)
        ended = [tokens[-1] == eos for tokens, _ in beams]
        if any(ended) and not all(ended):
            return eos, beams
    raise AssertionError("no token makes a beam end with EOS: choose another prompt")


@pytest.mark.parametrize("lp", LENGTH_PENALTIES)
@pytest.mark.parametrize("width", WIDTHS)
def test_beam_search_matches_transformers_with_eos(arch, width, lp):
    name, model, prompts = arch
    prompt = prompts[1]
    eos, expected = pick_eos(model, prompt, width, lp)
    llm = engine(name)
    llm.eos_token_id = eos
    params = BeamSearchParams(
        beam_width=width, max_tokens=MAX_TOKENS, length_penalty=lp, ignore_eos=False
    )
    (out,) = llm.beam_search({"prompt_token_ids": prompt}, params)
    assert_beams_match(out, expected, model, prompt, lp)
    ended = [s for s in out.sequences if s.token_ids[-1] == eos]
    assert ended, "no returned beam ended with the EOS"
    assert all(
        s.token_ids[-1] == eos or len(s.token_ids) == MAX_TOKENS for s in out.sequences
    )
    # nothing continues past an EOS
    assert all(eos not in s.token_ids[:-1] for s in out.sequences)
    assert_all_blocks_free(llm)

    # ignore_eos=True: the same engine and EOS, and no beam stops at it.
    ignoring = BeamSearchParams(
        beam_width=width, max_tokens=MAX_TOKENS, length_penalty=lp, ignore_eos=True
    )
    (free,) = llm.beam_search({"prompt_token_ids": prompt}, ignoring)
    assert [s.token_ids for s in free.sequences] == [
        t for t, _ in hf_beams(model, prompt, width, lp, MAX_TOKENS, None)
    ]
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("lp", [1.0, 0.0])
def test_width_one_is_greedy(lp):
    """One beam without EOS is greedy decoding; its score is the length-normalized log-probability."""
    name = "tiny-llama"
    llm = engine(name)
    prompt = {"prompt_token_ids": prompts_for(name)[1]}
    (greedy,) = llm.generate(
        prompt,
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
        use_tqdm=False,
    )
    params = BeamSearchParams(
        beam_width=1, max_tokens=MAX_TOKENS, length_penalty=lp, ignore_eos=True
    )
    (out,) = llm.beam_search(prompt, params)
    (beam,) = out.sequences
    assert beam.token_ids == greedy.outputs[0].token_ids
    assert beam.cumulative_logprob == pytest.approx(
        greedy.outputs[0].cumulative_logprob, abs=SCORE_TOL
    )
    assert beam.score == pytest.approx(
        beam.cumulative_logprob / MAX_TOKENS**lp, abs=SCORE_TOL
    )
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("width", [1, 3])
def test_max_tokens_one_returns_the_best_first_tokens(width):
    """With one token to generate, the beams are the `width` most likely first tokens, best first."""
    name = "tiny-llama"
    model = hf_model(name)
    prompt = prompts_for(name)[1]
    llm = engine(name)
    params = BeamSearchParams(
        beam_width=width, max_tokens=1, length_penalty=1.0, ignore_eos=True
    )
    (out,) = llm.beam_search({"prompt_token_ids": prompt}, params)
    with torch.no_grad():
        # [vocab]
        first = torch.log_softmax(
            model(torch.tensor([prompt])).logits[0, -1].float(), dim=-1
        )
    best = torch.topk(first, width)
    assert [s.token_ids for s in out.sequences] == [[t] for t in best.indices.tolist()]
    torch.testing.assert_close(
        torch.tensor([s.score for s in out.sequences]),
        best.values,
        atol=SCORE_TOL,
        rtol=0,
    )
    if width > 1:
        expected = hf_beams(model, prompt, width, 1.0, 1, None)
        assert [s.token_ids for s in out.sequences] == [t for t, _ in expected]
    assert_all_blocks_free(llm)


def test_beams_share_blocks_and_dropped_beams_free_theirs():
    """Step by step: fork shares blocks, every reference is a table's, dropped beams hold nothing."""
    # the prompt ends mid-block: forks share a partial block
    width, block_size, prompt_len = 4, 4, 10
    llm = engine(
        "tiny-llama", block_size=block_size, num_gpu_blocks=64, num_cpu_blocks=16
    )
    gen = torch.Generator().manual_seed(5)
    prompt = random_prompt(gen, prompt_len)
    params = BeamSearchParams(
        beam_width=width, max_tokens=10, length_penalty=1.0, ignore_eos=True
    )
    request_id = llm.add_request({"prompt_token_ids": prompt}, params)
    manager, device = llm.block_manager, llm.block_manager.device
    num_prompt_full_blocks = prompt_len // block_size

    seen, finished, max_ref, saved = {}, [], 0, 0
    while llm.has_unfinished_requests():
        finished += llm.step()
        if finished:
            break
        (group,) = llm.scheduler.running
        live = group.seqs
        seen.update({seq.seq_id: seq for seq in live})
        # only live beams hold blocks
        assert set(manager.device_tables) == {seq.seq_id for seq in live}
        holders = Counter(
            b for table in manager.device_tables.values() for b in table.block_ids
        )
        # every reference count is a table's reference
        for block in range(device.num_blocks):
            assert device.ref_count(block) == holders.get(block, 0)
        first_table = manager.get_block_table(live[0]).block_ids
        # the full prompt blocks: shared by all beams
        for block in first_table[:num_prompt_full_blocks]:
            assert device.ref_count(block) == len(live)
        max_ref = max(max_ref, max(holders.values()))
        saved = max(saved, sum(holders.values()) - device.num_used)

    (out,) = finished
    assert out.request_id == request_id and len(out.sequences) == width
    assert max_ref == width, "the beams never shared a block"
    assert saved > 0
    dropped = [
        seq for seq_id, seq in seen.items() if seq_id not in manager.device_tables
    ]
    assert any(seq.status == SequenceStatus.FINISHED_ABORTED for seq in dropped), (
        "no beam was ever dropped"
    )
    assert llm.stats.cow_copies > 0  # a forked beam wrote into the shared partial block
    assert_all_blocks_free(llm)

    # The step-by-step run returns what beam_search returns on a fresh engine.
    (again,) = engine("tiny-llama", block_size=block_size).beam_search(
        {"prompt_token_ids": prompt}, params
    )
    assert [s.token_ids for s in again.sequences] == [
        s.token_ids for s in out.sequences
    ]


def test_beam_search_beside_sampling_requests():
    """A beam request batched with sampled and greedy requests gets the beams it gets alone."""
    name = "tiny-llama"
    gen = torch.Generator().manual_seed(9)
    beam_prompt, other_prompt = random_prompt(gen, 6), random_prompt(gen, 17)
    beam = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True)
    sampled = SamplingParams(
        n=2, temperature=1.0, max_tokens=9, seed=3, ignore_eos=True
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    alone = engine(name)
    (want_beams,) = alone.beam_search({"prompt_token_ids": beam_prompt}, beam)
    (want_sampled,) = alone.generate(
        {"prompt_token_ids": other_prompt}, sampled, use_tqdm=False
    )
    (want_greedy,) = alone.generate(
        {"prompt_token_ids": beam_prompt}, greedy, use_tqdm=False
    )

    llm = engine(name, block_size=8)
    ids = [
        llm.add_request({"prompt_token_ids": other_prompt}, sampled),
        llm.add_request({"prompt_token_ids": beam_prompt}, beam),
        llm.add_request({"prompt_token_ids": beam_prompt}, greedy),
    ]
    done = {}
    while llm.has_unfinished_requests():
        done.update({out.request_id: out for out in llm.step()})
    assert set(done) == set(ids)
    got_sampled, got_beams, got_greedy = (done[i] for i in ids)
    assert [s.token_ids for s in got_beams.sequences] == [
        s.token_ids for s in want_beams.sequences
    ]
    assert [c.token_ids for c in got_sampled.outputs] == [
        c.token_ids for c in want_sampled.outputs
    ]
    assert got_greedy.outputs[0].token_ids == want_greedy.outputs[0].token_ids
    assert_all_blocks_free(llm)


def test_beam_search_through_preemption():
    """A pool too small for three beam requests at once: preempted beams come back to the same result."""
    name = "tiny-llama"
    gen = torch.Generator().manual_seed(21)
    prompts = [random_prompt(gen, n) for n in (13, 14, 15)]
    params = BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True)
    want = [
        [
            s.token_ids
            for s in engine(name)
            .beam_search({"prompt_token_ids": p}, params)[0]
            .sequences
        ]
        for p in prompts
    ]
    for mode in ("recompute", "swap"):
        llm = engine(
            name,
            block_size=4,
            num_gpu_blocks=20,
            num_cpu_blocks=64,
            preemption_mode=mode,
        )
        outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
        assert [[s.token_ids for s in o.sequences] for o in outs] == want
        assert llm.stats.num_preemptions[mode] > 0, "the pool was meant to be too small"
        assert_all_blocks_free(llm)
