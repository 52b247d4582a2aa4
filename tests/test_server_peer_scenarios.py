"""`minipaged serve` run through the scenarios of vLLM's own OpenAI-server tests (issue 13).

Each test names the peer test it ports (repository and test). Where vLLM's scenario has an exact
answer, the server's is compared with LLM.generate on a second engine built the same way; where it
is a feature minipaged deliberately lacks (batched prompts, echo, include_stop_str_in_output), the
server must refuse it with a 400 whose `param` names the field, and serve the next request.
Prompts and seeds are fresh each run (SEED is printed so that a failure can be replayed).
"""

from __future__ import annotations

import json
import random
import socket
import time
import urllib.error
import urllib.request

import openai
import pytest

from minipaged import LLM, SamplingParams
from minipaged.presets import BYTE_OFFSET
from minipaged.serving import running_server

# a server hides a stub's error from the test (student copy: tests/conftest.py)
pytestmark = pytest.mark.needs_every_task

ENGINE_ARGS = dict(
    block_size=4,
    num_gpu_blocks=192,
    num_cpu_blocks=0,
    max_model_len=96,
    max_step_stats=8,
)
MODEL = "tiny-llama"
SEED = random.randrange(2**31)
print(f"test_server_peer_scenarios: SEED={SEED}")


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(MODEL, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def reference() -> LLM:
    """The same engine again: what the server answers must equal what it generates."""
    return LLM(MODEL, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def url(llm):
    with running_server(llm) as base_url:
        yield base_url
    assert idle(llm)


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture
def rng(request) -> random.Random:
    return random.Random(f"{SEED}:{request.node.name}")


def idle(llm: LLM) -> bool:
    return (
        not llm.has_unfinished_requests()
        and llm.block_manager.device.num_free == ENGINE_ARGS["num_gpu_blocks"]
    )


def poll(condition, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def random_prompt(rng: random.Random, low: int = 3, high: int = 16) -> list[int]:
    return [rng.randrange(BYTE_OFFSET, 259) for _ in range(rng.randint(low, high))]


def generate(reference: LLM, prompt, params: SamplingParams):
    prompt = {"prompt_token_ids": prompt} if isinstance(prompt, list) else prompt
    return reference.generate(prompt, params, use_tqdm=False)[0]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url + "/v1/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def stream_texts(chunks, n: int) -> tuple[list[str], list[str | None], list[int]]:
    """Per choice: the joined text, the finish_reason, and how many chunks carried it."""
    texts, finishes, counts = [""] * n, [None] * n, [0] * n
    for chunk in chunks:
        assert len(chunk.choices) == 1, (
            "one choice a chunk (vLLM flattens n samples into one stream)"
        )
        choice = chunk.choices[0]
        assert finishes[choice.index] is None, (
            "a choice went on after its finish_reason"
        )
        texts[choice.index] += choice.text
        finishes[choice.index] = choice.finish_reason
        counts[choice.index] += 1
    return texts, finishes, counts


GREEDY = dict(temperature=0.0, ignore_eos=True)


# ---- vllm-project/vllm tests/entrypoints/openai/completion/test_completion.py --------------------


def test_single_completion(client, reference, rng):
    """vLLM test_single_completion: a text prompt and a token-id prompt, usage and finish_reason."""
    text = "".join(rng.choice("abcdefghij ") for _ in range(rng.randint(3, 12)))
    completion = client.completions.create(
        model=MODEL,
        prompt=text,
        max_tokens=5,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    expected = generate(reference, text, SamplingParams(max_tokens=5, **GREEDY))
    assert (
        completion.id
        and completion.object == "text_completion"
        and len(completion.choices) == 1
    )
    choice = completion.choices[0]
    assert choice.text == expected.outputs[0].text and choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 5
    # bos + bytes
    assert (
        completion.usage.prompt_tokens
        == len(expected.prompt_token_ids)
        == len(text) + 1
    )
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 5
    ids = random_prompt(rng)
    by_ids = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=5, temperature=0.0
    )
    assert (
        by_ids.choices[0].text
        == generate(reference, ids, SamplingParams(max_tokens=5, temperature=0.0))
        .outputs[0]
        .text
    )
    assert by_ids.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("logprobs", [None, 0, 5, 20])
def test_no_zero_some_and_max_logprobs(client, reference, rng, logprobs, stream):
    """vLLM test_no_logprobs, test_zero_logprobs, test_some_logprobs: `logprobs` top tokens a step
    (the sampled one is always listed too, so k or k + 1 of them), none when not asked."""
    prompt = random_prompt(rng)
    params = SamplingParams(
        temperature=0.8,
        seed=rng.randrange(10**6),
        max_tokens=6,
        ignore_eos=True,
        logprobs=logprobs,
    )
    expected = generate(reference, prompt, params).outputs[0]
    response = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0.8, seed=params.seed, logprobs=logprobs,
        stream=stream, extra_body={"ignore_eos": True},
    )  # fmt: skip
    choices = (
        [c for chunk in response for c in chunk.choices] if stream else response.choices
    )
    if logprobs is None:
        assert all(c.logprobs is None for c in choices)
        return
    token_logprobs = [lp for c in choices for lp in c.logprobs.token_logprobs]
    tops = [top for c in choices for top in c.logprobs.top_logprobs]
    assert token_logprobs == pytest.approx(expected.logprobs, abs=1e-4)
    assert len(tops) == 6
    for top, want, token_logprob in zip(
        tops, expected.top_logprobs, token_logprobs, strict=True
    ):
        assert max(logprobs, 1) <= len(top) <= logprobs + 1
        assert sorted(top.values(), reverse=True)[: len(want)] == pytest.approx(
            sorted(want.values(), reverse=True), abs=1e-4
        )
        # the sampled token
        assert any(abs(value - token_logprob) < 1e-4 for value in top.values())


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_too_many_completion_logprobs(client, reference, stream):
    """vLLM test_too_many_completion_logprobs: 21 (and 30, streamed) is past max_logprobs=20: a 400
    before any event is sent, and the server serves the next request."""
    with pytest.raises(openai.BadRequestError) as refused:
        response = client.completions.create(
            model=MODEL,
            prompt=[5, 6, 7],
            max_tokens=5,
            temperature=0.0,
            logprobs=30 if stream else 21,
            stream=stream,
        )
        list(response) if stream else None
    assert (
        refused.value.status_code == 400 and refused.value.body["param"] == "logprobs"
    )
    completion = client.completions.create(
        model=MODEL, prompt=[5, 6, 7], max_tokens=5, temperature=0.0
    )
    assert (
        completion.choices[0].text
        == generate(reference, [5, 6, 7], SamplingParams(max_tokens=5, temperature=0.0))
        .outputs[0]
        .text
    )


def test_completion_streaming(client, rng):
    """vLLM test_completion_streaming: the streamed chunks join to the whole completion, and only the
    last chunk carries a finish_reason."""
    prompt = random_prompt(rng)
    max_tokens = rng.randint(3, 24)
    whole = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    texts, finishes, _ = stream_texts(chunks, 1)
    assert texts[0] == whole.choices[0].text
    assert (
        [c.choices[0].finish_reason for c in chunks].count("length")
        == 1
        == len([f for f in finishes if f])
    )
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_parallel_sampling_with_stop_token_ids(client, reference, rng, stream):
    """vLLM test_parallel_no_streaming / test_parallel_streaming (samples that end at different
    times, one finish_reason each, text flattened into one stream by index) with the end made by
    stop_token_ids, as in vLLM's stop_token_ids with n > 1."""
    prompt, seed, n = random_prompt(rng), rng.randrange(10**6), 3
    free = generate(
        reference,
        prompt,
        SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=30, ignore_eos=True),
    )
    # a stop token that sample 0 meets early: the others meet it elsewhere, or never (then "length")
    stop = free.outputs[0].token_ids[rng.randrange(1, 6)]
    params = SamplingParams(
        n=n,
        temperature=1.0,
        seed=seed,
        max_tokens=30,
        ignore_eos=True,
        stop_token_ids=[stop],
    )
    expected = generate(reference, prompt, params)
    # seeded: the same draws, cut
    for want, whole in zip(expected.outputs, free.outputs, strict=True):
        cut = whole.token_ids.index(stop) + 1 if stop in whole.token_ids else 30
        assert want.token_ids == whole.token_ids[:cut]
        assert want.finish_reason == ("stop" if stop in whole.token_ids else "length")
    response = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=30, temperature=1.0, seed=seed, n=n, stream=stream,
        extra_body={"ignore_eos": True, "stop_token_ids": [stop]},
    )  # fmt: skip
    if stream:
        texts, finishes, counts = stream_texts(response, n)
        assert all(count <= 30 for count in counts)
    else:
        assert [c.index for c in response.choices] == list(range(n))
        texts, finishes = (
            [c.text for c in response.choices],
            [c.finish_reason for c in response.choices],
        )
        assert response.usage.completion_tokens == sum(
            len(o.token_ids) for o in expected.outputs
        )
    assert texts == [o.text for o in expected.outputs]
    assert finishes == [o.finish_reason for o in expected.outputs]


def usage_of(chunk):
    return (
        None
        if chunk.usage is None
        else (
            chunk.usage.prompt_tokens,
            chunk.usage.completion_tokens,
            chunk.usage.total_tokens,
        )
    )


@pytest.mark.parametrize("continuous", [False, True], ids=["final", "continuous"])
@pytest.mark.parametrize("include_usage", [False, True], ids=["no_usage", "usage"])
def test_completion_stream_options(client, rng, include_usage, continuous):
    """vLLM test_completion_stream_options: include_usage x continuous_usage_stats. Without
    include_usage no chunk has usage; with it, a last chunk without choices has the totals, and with
    continuous_usage_stats every chunk has the counts so far."""
    prompt, max_tokens = random_prompt(rng), rng.randint(2, 8)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": include_usage, "continuous_usage_stats": continuous},
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    if not include_usage:
        assert all(chunk.usage is None for chunk in chunks)
        return
    *body, last = chunks
    assert last.choices == [] and usage_of(last) == (
        len(prompt),
        max_tokens,
        len(prompt) + max_tokens,
    )
    assert body[-1].choices[0].finish_reason == "length"
    if not continuous:
        assert all(chunk.usage is None for chunk in body)
        return
    counts = [usage_of(chunk) for chunk in body]
    assert all(p == len(prompt) and t == p + c for p, c, t in counts)
    assert [c for _, c, _ in counts] == sorted(c for _, c, _ in counts) and counts[-1][
        1
    ] == max_tokens


@pytest.mark.parametrize(
    "options",
    [
        {"include_usage": None},
        {"include_usage": True},
        {"continuous_usage_stats": True},
    ],
)
def test_stream_options_without_stream_is_400(url, options):
    """vLLM test_completion_stream_options, its stream=False cases: stream_options needs stream."""
    status, error = post(
        url,
        {"model": MODEL, "prompt": [5, 6], "max_tokens": 2, "stream_options": options},
    )
    assert status == 400 and error["error"]["param"] == "stream_options"


def test_empty_stream_options_and_a_bad_one(url, client):
    """vLLM test_completion_stream_options, stream_options={}: no usage; and an option no server
    knows is a 400 naming stream_options."""
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=[5, 6], max_tokens=3, stream=True, stream_options={}
        )
    )
    assert chunks and all(chunk.usage is None for chunk in chunks)
    status, error = post(
        url,
        {
            "model": MODEL,
            "prompt": [5, 6],
            "stream": True,
            "stream_options": {"include_usage": 1},
        },
    )
    assert status == 400 and error["error"]["param"] == "stream_options.include_usage"


def test_batch_completions_are_refused_but_a_batch_of_one_is_served(
    url, client, reference, rng
):
    """vLLM test_batch_completions: minipaged takes one prompt a request (several requests batch
    together in the engine), so a list of prompts is a 400 naming prompt; a list of one is served."""
    ids = random_prompt(rng)
    for prompts in (["Hello", "Hello"], [ids, ids]):
        status, error = post(url, {"model": MODEL, "prompt": prompts, "max_tokens": 5})
        assert (
            status == 400
            and error["error"]["param"] == "prompt"
            and "one prompt" in error["error"]["message"]
        )
    expected = (
        generate(reference, ids, SamplingParams(max_tokens=5, temperature=0.0))
        .outputs[0]
        .text
    )
    for one in ([ids], ids):
        assert (
            client.completions.create(
                model=MODEL, prompt=one, max_tokens=5, temperature=0.0
            )
            .choices[0]
            .text
            == expected
        )


@pytest.mark.parametrize(
    ("field", "value", "neutral"),
    [
        ("echo", True, False),  # vLLM test_echo_logprob_completion
        ("suffix", "tail", None),
        # vLLM test_engine_core_advanced_sampling's penalties
        ("presence_penalty", 0.5, 0.0),
        ("frequency_penalty", -1.0, 0),
        ("logit_bias", {"65": 5}, {}),  # vLLM test_chat_logit_bias_validation
        ("best_of", 2, 1),
    ],
)
def test_unsupported_openai_fields_are_400_unless_neutral(
    url, client, reference, field, value, neutral
):
    """Fields minipaged lacks: refused with a 400 naming them, accepted at their neutral value."""
    body = {"model": MODEL, "prompt": [9, 8, 7], "max_tokens": 3, "temperature": 0}
    status, error = post(url, {**body, field: value})
    assert (
        status == 400
        and error["error"]["param"] == field
        and field in error["error"]["message"]
    )
    status, ok = post(url, {**body, field: neutral})
    expected = (
        generate(reference, [9, 8, 7], SamplingParams(max_tokens=3, temperature=0.0))
        .outputs[0]
        .text
    )
    assert status == 200 and ok["choices"][0]["text"] == expected


@pytest.mark.parametrize(
    "field",
    [
        "include_stop_str_in_output",
        "min_tokens",
        "repetition_penalty",
        "use_beam_search",
    ],
)
def test_vllm_extras_minipaged_lacks_are_400_naming_them(url, field):
    """vLLM test_stop_strings' include_stop_str_in_output, test_min_tokens, advanced sampling: not in
    minipaged, so a 400 naming the field rather than a silently different answer."""
    status, error = post(
        url, {"model": MODEL, "prompt": [9, 8], "max_tokens": 3, field: True}
    )
    assert status == 400 and error["error"]["param"] == field


# ---- vLLM tests/entrypoints/openai/chat_completion/test_chat_stop_token_ids_validation.py ------


def test_stop_token_ids_out_of_vocab_negative_and_valid(url, client, llm):
    """vLLM test_chat_stop_token_ids_out_of_vocab / _negative / _valid: a 400 naming the id and the
    vocabulary size; the last id of the vocabulary is fine."""
    for bad in (llm.vocab_size + 1, -1):
        status, error = post(
            url,
            {
                "model": MODEL,
                "prompt": [5, 6],
                "max_tokens": 3,
                "stop_token_ids": [bad],
            },
        )
        assert status == 400 and error["error"]["param"] == "stop_token_ids", error
        assert str(bad) in error["error"]["message"]
    assert (
        str(llm.vocab_size)
        in post(
            url, {"model": MODEL, "prompt": [5], "stop_token_ids": [llm.vocab_size]}
        )[1]["error"]["message"]
    )
    completion = client.completions.create(
        model=MODEL,
        prompt=[5, 6],
        max_tokens=3,
        extra_body={"stop_token_ids": [llm.vocab_size - 1]},
    )
    assert completion.choices[0].finish_reason in ("stop", "length")


# ---- stop strings: vllm tests/detokenizer/test_stop_strings.py, tests/detokenizer/test_stop_reason.py


def whole_chars(
    text: str, rng: random.Random, length: int, start: int = 0
) -> tuple[int, str] | None:
    """A substring of `length` characters at or after `start` with no U+FFFD (so it is stable once
    decoded), that first occurs where it is taken; None if the text has none."""
    spots = [
        i
        for i in range(start, len(text) - length + 1)
        if "\ufffd" not in text[i : i + length] and text.find(text[i : i + length]) == i
    ]
    return (i := rng.choice(spots), text[i : i + length]) if spots else None


def check_stop(client, reference, prompt, stops: list[str], stream: bool):
    params = SamplingParams(max_tokens=40, stop=stops, **GREEDY)
    expected = generate(reference, prompt, params).outputs[0]
    response = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=40, temperature=0.0, stop=stops, stream=stream,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    if stream:
        chunks = list(response)
        texts, finishes, _ = stream_texts(chunks, 1)
        text, finish, stop_reason = (
            texts[0],
            finishes[0],
            chunks[-1].choices[0].stop_reason,
        )
    else:
        choice = response.choices[0]
        text, finish, stop_reason = (
            choice.text,
            choice.finish_reason,
            choice.stop_reason,
        )
    assert (text, finish, stop_reason) == (
        expected.text,
        expected.finish_reason,
        expected.stop_reason,
    )
    return expected


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_stop_string_of_several_tokens_and_the_earliest_wins(
    client, reference, rng, stream
):
    """vLLM _stop_multi_tokens (stop=["group of peo", "short"]) and _stop_partial_token: a stop string
    that spans several tokens (here several bytes, often of one character); of several, the one that
    occurs first in the text ends it, whatever its place in the list."""
    # random weights write many broken characters: find a text with two stops
    for _ in range(30):
        prompt = random_prompt(rng)
        text = (
            generate(reference, prompt, SamplingParams(max_tokens=40, **GREEDY))
            .outputs[0]
            .text
        )
        late = whole_chars(text, rng, 3, start=len(text) // 2)
        early = whole_chars(text[: late[0]], rng, 2, start=2) if late else None
        if early is not None:
            break
    else:
        pytest.skip(f"no text with two stable stop strings in 30 prompts (SEED={SEED})")
    expected = check_stop(client, reference, prompt, [late[1], early[1]], stream)
    assert expected.text == text[: early[0]] and expected.stop_reason == early[1]
    expected = check_stop(client, reference, prompt, ["\x00never\x00", late[1]], stream)
    assert expected.text == text[: late[0]] and expected.stop_reason == late[1]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_stop_string_at_the_very_first_token(client, reference, rng, stream):
    """vLLM test_stop_strings with the stop at the start: the text is empty, finish_reason "stop"."""
    prompt = random_prompt(rng)
    for _ in range(20):  # a prompt whose first generated token is a whole character
        first = (
            generate(reference, prompt, SamplingParams(max_tokens=1, **GREEDY))
            .outputs[0]
            .text
        )
        if first and "\ufffd" not in first:
            break
        prompt = random_prompt(rng)
    else:
        pytest.skip(f"no prompt with a whole first character (SEED={SEED})")
    expected = check_stop(client, reference, prompt, [first], stream)
    assert (expected.text, expected.finish_reason, len(expected.token_ids)) == (
        "",
        "stop",
        1,
    )


def test_a_stop_string_in_the_prompt_does_not_stop(client, reference, rng):
    """vLLM's stop checker looks at the generated text only (StopChecker tests)."""
    # letters the output rarely has
    prompt = "".join(rng.choice("qwxzjk") for _ in range(10))
    text = (
        generate(reference, prompt, SamplingParams(max_tokens=12, **GREEDY))
        .outputs[0]
        .text
    )
    candidates = sorted(set(prompt) - set(text))
    assert candidates, (
        f"the output {text!r} has every letter of the prompt (SEED={SEED})"
    )
    completion = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=12,
        temperature=0.0,
        stop=candidates[:4],
        extra_body={"ignore_eos": True},
    )
    assert (
        completion.choices[0].text == text
        and completion.choices[0].finish_reason == "length"
    )


def test_stop_reason_for_each_kind_of_end(client, reference, rng):
    """vLLM tests/detokenizer/test_stop_reason.py: stop_reason is the stop token id, or the stop
    string, or None when max_tokens ends it (finish_reason "length")."""
    prompt = random_prompt(rng)
    free = generate(reference, prompt, SamplingParams(max_tokens=10, **GREEDY)).outputs[
        0
    ]
    token = free.token_ids[rng.randrange(1, 5)]
    cases = [({"stop_token_ids": [token]}, "stop", token), ({}, "length", None)]
    for extra, finish, reason in cases:
        choice = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=10,
            temperature=0.0,
            extra_body={"ignore_eos": True, **extra},
        ).choices[0]
        assert (choice.finish_reason, choice.stop_reason) == (finish, reason)


# ---- max_tokens edge cases (vLLM test_completion_error / OpenAI's defaults) -----------------------


def test_max_tokens_null_zero_and_the_model_len_boundary(url, client, reference, rng):
    """max_tokens null is OpenAI's default 16; 0 is a 400; prompt + max_tokens may reach
    max_model_len exactly, and one more is a 400 naming max_tokens and the limit (vLLM's "maximum
    context length" error)."""
    prompt = random_prompt(rng)
    body = {"model": MODEL, "prompt": prompt, "temperature": 0, "ignore_eos": True}
    status, null = post(url, {**body, "max_tokens": None})
    assert status == 200 and null["usage"]["completion_tokens"] == 16
    assert (
        null["choices"][0]["text"]
        == generate(reference, prompt, SamplingParams(max_tokens=16, **GREEDY))
        .outputs[0]
        .text
    )
    status, error = post(url, {**body, "max_tokens": 0})
    assert status == 400 and error["error"]["param"] == "max_tokens"
    room = ENGINE_ARGS["max_model_len"] - len(prompt)
    status, full = post(url, {**body, "max_tokens": room})
    assert status == 200 and full["usage"]["completion_tokens"] == room
    assert full["usage"]["total_tokens"] == ENGINE_ARGS["max_model_len"]
    status, error = post(url, {**body, "max_tokens": room + 1})
    # the engine's: it names both fields and the limit
    message = error["error"]["message"]
    assert status == 400 and error["error"]["param"] in ("prompt", "max_tokens")
    assert "max_tokens" in message and str(ENGINE_ARGS["max_model_len"]) in message
    # refused before any event
    status, streamed = post(url, {**body, "max_tokens": room + 1, "stream": True})
    assert status == 400 and streamed["error"]["message"] == message


@pytest.mark.parametrize(
    ("stop", "ok"), [("", False), ([], True), ([""], False), ("x", True)]
)
def test_stop_empty_string_is_refused_as_the_list_of_it_is(url, stop, ok):
    """vLLM's SamplingParams refuses an empty stop string (it would match everywhere): "" and [""]
    alike; an empty list is no stop string."""
    status, body = post(
        url, {"model": MODEL, "prompt": [5, 6], "max_tokens": 2, "stop": stop}
    )
    assert (status == 200) == ok, body
    if not ok:
        assert body["error"]["param"] == "stop"


# ---- abort on disconnect (vLLM tests/entrypoints/openai/test_shutdown.py, AsyncLLM abort tests) ----


def open_stream(url: str, body: dict) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps({**body, "stream": True}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    sock.sendall(head.encode() + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    received = b""
    while b"data: " not in received:
        received += sock.recv(4096)
    return sock


def test_clients_that_leave_mid_stream_free_their_blocks_and_the_rest_are_answered(
    url, llm, client, reference, rng
):
    """vLLM tests/v1/engine/test_async_llm.py test_abort (abort some of many running requests, the
    others finish with their full answers), over HTTP: a parallel-sampling stream and plain streams
    close mid-way while other clients wait for their answers."""
    leaving = [
        open_stream(
            url,
            {
                "model": MODEL,
                "prompt": random_prompt(rng),
                "max_tokens": 80,
                "n": n,
                "seed": 1,
                "ignore_eos": True,
            },
        )
        for n in (3, 1, 2)
    ]
    prompt = random_prompt(rng)
    staying = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=20,
        temperature=0.0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    first = next(iter(staying))
    for sock in leaving:
        sock.close()
    texts, finishes, _ = stream_texts([first, *staying], 1)
    assert (
        texts[0]
        == generate(reference, prompt, SamplingParams(max_tokens=20, **GREEDY))
        .outputs[0]
        .text
    )
    assert finishes == ["length"]
    poll(lambda: idle(llm), what="the blocks of the clients that left")
