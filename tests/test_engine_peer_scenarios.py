"""The engine's new request features run through the scenarios of vLLM's own tests (issue 13).

Stop strings and stop tokens (vLLM tests/detokenizer/test_stop_strings.py, test_stop_reason.py),
abort (tests/v1/engine/test_engine_core.py's abort cycle, tests/core/test_scheduler.py's abort
tests) and logprobs (tests/samplers/test_logprobs.py), each test naming the one it ports. The
answers are held to what a fresh engine generates for the same request; after every abort, every
block is back in its pool. Prompts are fresh each run (SEED is printed for a replay).
"""

from __future__ import annotations

import random

import pytest

from minipaged import LLM, BeamSearchParams, SamplingParams

BLOCK_SIZE = 4
SEED = random.randrange(2**31)
print(f"test_engine_peer_scenarios: SEED={SEED}")


def make_llm(**kw) -> LLM:
    return LLM("tiny-llama", **{"num_gpu_blocks": 64, "block_size": BLOCK_SIZE, **kw})


@pytest.fixture(scope="module")
def fresh() -> LLM:
    """The oracle: an engine that only ever runs generate()."""
    return make_llm()


@pytest.fixture
def rng(request) -> random.Random:
    return random.Random(f"{SEED}:{request.node.name}")


def random_prompt(rng: random.Random, low: int = 4, high: int = 18) -> dict:
    return {
        "prompt_token_ids": [
            rng.randrange(3, 259) for _ in range(rng.randint(low, high))
        ]
    }


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def run(llm: LLM, prompt, params):
    return llm.generate(prompt, params, use_tqdm=False)[0]


def drain(llm: LLM) -> dict[str, list[int]]:
    """Step until idle; the finished requests' first samples by request id."""
    done = {}
    while llm.has_unfinished_requests():
        done.update({out.request_id: out.outputs[0].token_ids for out in llm.step()})
    return done


def assert_all_free(llm: LLM) -> None:
    memory = llm.block_manager.memory_stats()
    assert memory.device.num_used == 0 and memory.host.num_used == 0
    assert not llm.has_unfinished_requests()
    assert (
        not llm.scheduler.running
        and not llm.scheduler.waiting
        and not llm.scheduler.swapped
    )


def stable_substring(
    text: str, rng: random.Random, length: int, start: int = 0, end: int | None = None
):
    """(index, s): `length` characters of `text` in [start, end) with no U+FFFD (stable once decoded)
    that first occur at index; None if there are none."""
    end = len(text) if end is None else end
    spots = [
        i
        for i in range(start, end - length + 1)
        if "\ufffd" not in text[i : i + length] and text.find(text[i : i + length]) == i
    ]
    return (i := rng.choice(spots), text[i : i + length]) if spots else None


# ---- vllm tests/detokenizer/test_stop_strings.py ------------------------------------------------


def test_stop_string_spanning_several_tokens(fresh, rng):
    """vLLM _stop_multi_tokens / _stop_partial_token: a stop string of several tokens (several bytes)
    ends the sample at the token that completes it; the text stops before it, the tokens are kept."""
    # random weights write many broken characters: find a stable stretch
    for _ in range(30):
        prompt = random_prompt(rng)
        full = run(fresh, prompt, greedy(40)).outputs[0]
        found = stable_substring(full.text, rng, rng.randint(3, 5), start=1)
        if found is not None:
            break
    else:
        pytest.skip(f"no stable substring in 30 prompts (SEED={SEED})")
    at, stop = found
    out = run(fresh, prompt, greedy(40, stop=[stop])).outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (
        full.text[:at],
        "stop",
        stop,
    )
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    decode = fresh.tokenizer.decode
    # no token too many
    assert stop in decode(out.token_ids) and stop not in decode(out.token_ids[:-1])
    assert len(stop.encode()) >= 3  # it did span several tokens


def test_of_several_stop_strings_the_earliest_in_the_text_wins(fresh, rng):
    """vLLM _stop_multi_tokens (stop=["group of peo", "short"]): several stop strings, the one met
    first in the text ends the sample, whatever the order of the list."""
    for _ in range(30):
        prompt = random_prompt(rng)
        text = run(fresh, prompt, greedy(40)).outputs[0].text
        late = stable_substring(text, rng, 2, start=len(text) // 2)
        early = stable_substring(text, rng, 2, start=1, end=late[0]) if late else None
        if early is not None:
            break
    else:
        pytest.skip(f"no text with two stable stop strings in 30 prompts (SEED={SEED})")
    for stops in ([late[1], early[1]], [early[1], late[1]]):
        out = run(fresh, prompt, greedy(40, stop=stops)).outputs[0]
        assert (out.text, out.stop_reason) == (text[: early[0]], early[1])


def test_stop_string_at_the_very_first_token(fresh, rng):
    """vLLM test_stop_strings, the stop met at once: an empty text, one token, finish_reason stop."""
    for _ in range(30):
        prompt = random_prompt(rng)
        first = run(fresh, prompt, greedy(1)).outputs[0]
        if first.text and "\ufffd" not in first.text:
            break
    else:
        pytest.skip(f"no prompt whose first token is a whole character (SEED={SEED})")
    out = run(fresh, prompt, greedy(10, stop=[first.text, "\x00unused"])).outputs[0]
    assert (out.text, out.token_ids, out.finish_reason, out.stop_reason) == (
        "",
        first.token_ids,
        "stop",
        first.text,
    )


def test_a_stop_string_in_the_prompt_does_not_stop(fresh, rng):
    """vLLM's StopChecker looks at the generated text only, never at the prompt."""
    text = "".join(rng.choice("qwxzjk") for _ in range(8))
    full = run(fresh, text, greedy(12)).outputs[0]
    stops = [c for c in "qwxzjk" if c in text and c not in full.text]
    if not stops:
        pytest.skip(f"the output {full.text!r} has every prompt letter (SEED={SEED})")
    out = run(fresh, text, greedy(12, stop=stops)).outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (full.text, "length", None)


def test_partial_output_never_shows_a_stop_string(rng):
    """What a server streams (request_output) obeys the stop strings too: a partial text never holds
    one, and each partial is a prefix of the final tokens (vLLM's streaming stop-string tests)."""
    llm = make_llm()
    for _ in range(30):
        prompt = random_prompt(rng)
        full = run(llm, prompt, greedy(30)).outputs[0]
        found = stable_substring(full.text, rng, 2, start=3)
        if found is not None:
            break
    else:
        pytest.skip(f"no stable substring in 30 prompts (SEED={SEED})")
    request_id = llm.add_request(prompt, greedy(30, stop=[found[1]]))
    finished = []
    while not finished:
        finished = llm.step()
        if not finished:
            partial = llm.request_output(request_id).outputs[0]
            assert found[1] not in partial.text and partial.finish_reason is None
            assert partial.token_ids == full.token_ids[: len(partial.token_ids)]
    assert finished[0].outputs[0].text == full.text[: found[0]]
    assert_all_free(llm)


# ---- stop_token_ids: vllm tests/detokenizer/test_stop_strings.py _stop_token_id, test_stop_reason.py


def first_new_token(
    token_ids: list[int], rng: random.Random, low: int = 1, high: int = 8
) -> int:
    """A position whose token does not occur before it (so the stop lands exactly there)."""
    spots = [
        i
        for i in range(low, min(high, len(token_ids)))
        if token_ids[i] not in token_ids[:i]
    ]
    return rng.choice(spots) if spots else 0


def test_stop_token_id_ends_the_sample_and_is_kept_in_token_ids(fresh, rng):
    """vLLM _stop_token_id: the sample ends on the stop token, whose id stays in token_ids and is
    the stop_reason."""
    prompt = random_prompt(rng)
    full = run(fresh, prompt, greedy(20)).outputs[0]
    at = first_new_token(full.token_ids, rng)
    token = full.token_ids[at]
    out = run(fresh, prompt, greedy(20, stop_token_ids=[token])).outputs[0]
    assert out.token_ids == full.token_ids[: at + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", token)


def test_stop_token_text_is_not_in_the_output_text(fresh, rng):
    """vLLM _stop_token_id: stop_token_ids=[13013] (" organization") gives the text
    "VLLM is a 100% volunteer", without the stop token's text."""
    for _ in range(30):
        prompt = random_prompt(rng)
        full = run(fresh, prompt, greedy(20)).outputs[0]
        # a stop token whose own text is a whole ASCII character (byte 32 to 126)
        spots = [
            i
            for i in range(1, 10)
            if full.token_ids[i] not in full.token_ids[:i]
            and 35 <= full.token_ids[i] < 130
        ]
        if spots:
            break
    else:
        pytest.skip(f"no ASCII token early in 30 outputs (SEED={SEED})")
    at = rng.choice(spots)
    out = run(fresh, prompt, greedy(20, stop_token_ids=[full.token_ids[at]])).outputs[0]
    assert out.token_ids[-1] == full.token_ids[at]
    assert out.text == fresh.tokenizer.decode(out.token_ids[:-1])


def test_stop_token_ids_with_parallel_samples(fresh, rng):
    """vLLM's stop_token_ids with n > 1 (test_parallel_streaming's samples ending apart): each seeded
    sample draws what it draws without the stop, and ends at its own first stop token."""
    prompt, seed = random_prompt(rng), rng.randrange(10**6)
    sampled = dict(n=3, temperature=1.0, seed=seed, max_tokens=24, ignore_eos=True)
    free = run(fresh, prompt, SamplingParams(**sampled)).outputs
    stops = [
        free[0].token_ids[first_new_token(free[0].token_ids, rng)],
        free[1].token_ids[-1],
    ]
    outs = run(fresh, prompt, SamplingParams(**sampled, stop_token_ids=stops)).outputs
    for out, whole in zip(outs, free, strict=True):
        cut = next(
            (i + 1 for i, t in enumerate(whole.token_ids) if t in stops),
            len(whole.token_ids),
        )
        assert out.token_ids == whole.token_ids[:cut]
        ended = cut < len(whole.token_ids) or whole.token_ids[-1] in stops
        assert (out.finish_reason, out.stop_reason) == (
            ("stop", out.token_ids[-1]) if ended else ("length", None)
        )
        assert len(out.logprobs) == len(out.token_ids)


def test_stop_reason_is_none_at_eos_and_at_max_tokens(rng):
    """vLLM tests/detokenizer/test_stop_reason.py: stop_reason is None when the EOS token or
    max_tokens ends a sample (finish_reason "stop" and "length"). The model's EOS id is set to a
    token it emits, so that EOS comes."""
    llm = make_llm()
    prompt = random_prompt(rng)
    full = run(llm, prompt, greedy(16)).outputs[0]
    assert (full.finish_reason, full.stop_reason) == ("length", None)
    at = first_new_token(full.token_ids, rng)
    llm.eos_token_id = full.token_ids[at]
    out = run(llm, prompt, SamplingParams(temperature=0.0, max_tokens=16)).outputs[0]
    assert out.token_ids == full.token_ids[: at + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", None)
    # ignore_eos: past it
    assert run(llm, prompt, greedy(16)).outputs[0].token_ids == full.token_ids


# ---- abort: vllm tests/v1/engine/test_engine_core.py test_engine_core ("Test abort cycle") --------


def test_abort_cycle_of_vllm_engine_core(fresh, rng):
    """vLLM test_engine_core's abort cycle: abort a request that has run one step; add two, step, add
    a third, step, abort one of the three, then the other two at once. Nothing is left, no block is
    held, and the engine then answers as a fresh one."""
    llm = make_llm()
    prompts = [random_prompt(rng) for _ in range(4)]
    expected = [
        o.outputs[0].token_ids
        for o in fresh.generate(prompts, greedy(12), use_tqdm=False)
    ]
    basic = llm.add_request(prompts[0], greedy(12))
    assert len(llm.scheduler.waiting) == 1 and not llm.scheduler.running
    llm.step()
    assert len(llm.scheduler.running) == 1 and not llm.scheduler.waiting
    llm.abort_request(basic)
    assert not llm.scheduler.running and not llm.has_unfinished_requests()
    assert llm.step() == [] and llm.request_output(basic) is None
    assert_all_free(llm)
    ids = [llm.add_request(p, greedy(12)) for p in prompts[1:3]]
    llm.step()
    ids.append(llm.add_request(prompts[3], greedy(12)))
    llm.step()
    assert len(llm.scheduler.running) == 3
    llm.abort_request(ids[1])
    assert len(llm.scheduler.running) == 2
    llm.step()
    assert len(llm.scheduler.running) == 2
    llm.abort_request([ids[2], ids[0]])
    assert not llm.scheduler.running and not llm.scheduler.waiting
    assert_all_free(llm)
    assert llm.stats.aborted_requests == 4
    assert [
        o.outputs[0].token_ids
        for o in llm.generate(prompts, greedy(12), use_tqdm=False)
    ] == expected


def test_abort_waiting_requests_before_any_step(fresh, rng):
    """vLLM tests/core/test_scheduler.py test_scheduler_abort_seq_group: four queued requests aborted
    together (one id twice, one unknown) leave nothing unfinished; none ever ran."""
    llm = make_llm()
    ids = [llm.add_request(random_prompt(rng), greedy(8)) for _ in range(4)]
    # queued: nothing yet
    assert [llm.request_output(i).outputs[0].token_ids for i in ids] == [[]] * 4
    llm.abort_request([*ids, ids[0], "no-such-request"])
    assert llm.stats.aborted_requests == 4 and llm.stats.steps == 0
    assert llm.step() == []
    assert_all_free(llm)


def test_abort_then_add_the_same_prompt_again(fresh, rng):
    """vLLM test_engine_core "Sending duplicate requests" and abort-then-re-add: the same prompt
    added again after its abort gets the answer a fresh engine gives; with prefix caching the second
    one reuses the aborted request's cached blocks and still answers the same."""
    prompt = random_prompt(rng, 12, 24)
    expected = run(fresh, prompt, greedy(10)).outputs[0].token_ids
    for caching in (False, True):
        llm = make_llm(enable_prefix_caching=caching)
        first = llm.add_request(prompt, greedy(10))
        llm.step()
        llm.step()
        llm.abort_request(first)
        assert_all_free(llm)
        second = llm.add_request(prompt, greedy(10))
        assert second != first
        assert drain(llm) == {second: expected}
        if caching:
            assert (
                llm.stats.prefix_cache_hits
                >= len(prompt["prompt_token_ids"]) // BLOCK_SIZE - 1
            )
        assert_all_free(llm)


def test_abort_a_finished_or_unknown_request_is_ignored(fresh, rng):
    """vLLM: aborting a finished or unknown request is a no-op (AsyncLLM's abort after the end)."""
    llm = make_llm()
    prompt = random_prompt(rng)
    request_id = llm.add_request(prompt, greedy(3))
    assert drain(llm) == {
        request_id: run(fresh, prompt, greedy(3)).outputs[0].token_ids
    }
    llm.abort_request(request_id)
    llm.abort_request(["unknown", str(10**9)])
    assert llm.stats.aborted_requests == 0
    assert_all_free(llm)


def test_abort_parallel_samples_and_a_beam_search_midway(fresh, rng):
    """vLLM's abort of a request with several sequences (n > 1 sharing the prompt's blocks by
    copy-on-write, and a beam search that forks): every shared block comes back; the other request
    in the batch finishes with its own answer."""
    llm = make_llm(enable_prefix_caching=rng.random() < 0.5)
    prompts = [random_prompt(rng, 9, 20) for _ in range(3)]
    other_expected = run(fresh, prompts[2], greedy(14)).outputs[0].token_ids
    parallel = llm.add_request(
        prompts[0],
        SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=14, ignore_eos=True),
    )
    beams = llm.add_request(
        prompts[1], BeamSearchParams(beam_width=3, max_tokens=14, ignore_eos=True)
    )
    other = llm.add_request(prompts[2], greedy(14))
    for _ in range(rng.randint(2, 6)):
        llm.step()
    # the samples do share blocks
    assert llm.block_manager.memory_stats().device.num_shared > 0
    llm.abort_request([parallel, beams])
    assert drain(llm) == {other: other_expected}
    assert_all_free(llm)


def test_abort_a_request_preempted_by_recompute(fresh, rng):
    """vLLM tests/core/test_scheduler.py abort of a preempted group: a request pushed back to the
    waiting queue (its blocks already freed) is aborted without a double free; the rest finish as
    a fresh engine finishes them."""
    llm = make_llm(num_gpu_blocks=12)
    prompts = [random_prompt(rng, 8, 12) for _ in range(3)]
    params = greedy(24)
    expected = [
        o.outputs[0].token_ids for o in fresh.generate(prompts, params, use_tqdm=False)
    ]
    ids = [llm.add_request(p, params) for p in prompts]
    done = {}
    while not llm.stats.num_preemptions.get("recompute"):
        assert llm.has_unfinished_requests(), "the pool is meant to force a preemption"
        done.update({o.request_id: o.outputs[0].token_ids for o in llm.step()})
    victim = llm.scheduler.waiting[0].request_id
    assert victim in ids and llm.request_output(victim) is not None
    llm.abort_request(victim)
    done.update(drain(llm))
    assert done == {
        rid: want for rid, want in zip(ids, expected, strict=True) if rid != victim
    }
    assert_all_free(llm)


@pytest.mark.parametrize("bad", [123, None, 4.5])
def test_abort_with_a_request_id_that_is_not_a_string_names_it(bad):
    """vLLM test_engine_core_invalid_request_id_type: a non-string id is a TypeError naming it."""
    llm = make_llm()
    with pytest.raises(TypeError, match="request_id"):
        llm.abort_request(bad)


# ---- logprobs: vllm tests/samplers/test_logprobs.py -------------------------------------------------


@pytest.mark.parametrize("num_logprobs", [0, 1, 6])
def test_logprobs_line_up_with_the_tokens_of_each_sample(fresh, rng, num_logprobs):
    """vLLM test_get_prompt_logprobs / test_logprobs: one entry per generated token in each sample
    (also when a stop string or stop token ends it early, and in a partial output), num_logprobs
    candidates each, sorted most likely first, and the sampled token's own log-probability among
    them whenever it is one of the most likely."""
    llm = make_llm()
    prompt, seed = random_prompt(rng), rng.randrange(10**6)
    params = SamplingParams(
        n=2,
        temperature=0.9,
        seed=seed,
        max_tokens=12,
        ignore_eos=True,
        logprobs=num_logprobs,
        stop=["\x7f"],
    )
    request_id = llm.add_request(prompt, params)
    llm.step()
    partial = llm.request_output(request_id).outputs
    assert all(len(c.top_logprobs) == len(c.token_ids) == 1 for c in partial)
    final = next(iter(drain_outputs(llm)))
    assert [c.token_ids for c in final.outputs] == [
        c.token_ids for c in run(fresh, prompt, params).outputs
    ]
    for sample in final.outputs:
        assert len(sample.top_logprobs) == len(sample.logprobs) == len(sample.token_ids)
        for token, logprob, top in zip(
            sample.token_ids, sample.logprobs, sample.top_logprobs, strict=True
        ):
            assert len(top) == num_logprobs
            values = list(top.values())
            assert values == sorted(values, reverse=True)
            assert (
                all(v <= 0 for v in values)
                and sum(2.718281828459045**v for v in values) <= 1 + 1e-5
            )
            if token in top:
                assert top[token] == pytest.approx(logprob, abs=1e-5)
            else:
                # it was not among the most likely
                assert all(logprob <= v + 1e-6 for v in values)
    assert_all_free(llm)


def drain_outputs(llm: LLM) -> list:
    outputs = []
    while llm.has_unfinished_requests():
        outputs += llm.step()
    return outputs
