"""`minipaged serve` against the official openai client: a real server on 127.0.0.1.

What a client gets must be what LLM.generate gives for the same request, token for token (prompts
are token ids, so the comparison is exact; the tokens come back through logprobs, whose token texts
map back to ids for the byte-level tokenizer), streamed or not, greedy or seeded, alone or among 32
concurrent clients. Around that: n > 1, logprobs, stop strings and tokens, usage, every kind of bad
request (400 naming the field, and the server serves the next one), a full queue (503), a client
that leaves mid-request (its blocks come back), an engine error (500, and the server goes on), and
/metrics, /v1/models, /health.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from minipaged import LLM, SamplingParams
from minipaged.presets import BYTE_OFFSET, ByteTokenizer
from minipaged.serving import build_app, running_server

# a server hides a stub's error from the test (student copy: tests/conftest.py)
pytestmark = pytest.mark.needs_every_task

ENGINE_ARGS = dict(
    block_size=4,
    num_gpu_blocks=256,
    num_cpu_blocks=0,
    max_model_len=160,
    max_step_stats=8,
)
MODEL = "tiny-llama"
# fresh inputs each run; printed so a failure can be replayed
SEED = random.randrange(2**31)
print(f"test_server: SEED={SEED}")


def poll(condition, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def idle(llm: LLM) -> bool:
    """No request left in the engine and every device block free."""
    return (
        not llm.has_unfinished_requests()
        and llm.block_manager.device.num_free == ENGINE_ARGS["num_gpu_blocks"]
    )


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(MODEL, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def reference() -> LLM:
    """A second engine built with the same arguments: what the server's answers must equal."""
    return LLM(MODEL, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def url(llm):
    with running_server(llm) as base_url:
        yield base_url
    assert idle(llm)  # the shutdown left every block free


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture
def rng(request) -> random.Random:
    return random.Random(f"{SEED}:{request.node.name}")


def random_prompt(rng: random.Random, low: int = 3, high: int = 20) -> list[int]:
    return [rng.randrange(BYTE_OFFSET, 259) for _ in range(rng.randint(low, high))]


def ids_of(tokens: list[str]) -> list[int]:
    """Token ids back from OpenAI logprobs' token texts ("token_id:N", or one byte's character)."""
    ids = []
    for token in tokens:
        if token.startswith("token_id:"):
            ids.append(int(token.removeprefix("token_id:")))
        else:
            # exactly one byte: one token
            (token_id,) = ByteTokenizer().encode(token)[1:]
            ids.append(token_id)
    return ids


def expected_output(reference: LLM, prompt: list[int], params: SamplingParams):
    return reference.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]


def create(client, prompt, params: SamplingParams, stream: bool, **extra):
    """One completion through the openai client, with the fields that SamplingParams holds."""
    body = {"ignore_eos": params.ignore_eos, "top_k": params.top_k}
    if params.stop_token_ids:
        body["stop_token_ids"] = list(params.stop_token_ids)
    return client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        n=params.n,
        seed=params.seed,
        stop=list(params.stop) or None,
        logprobs=params.logprobs if params.logprobs is not None else 0,
        stream=stream,
        extra_body=body,
        **extra,
    )


def collect(response, stream: bool, n: int) -> dict:
    """Per choice: text, token ids, token logprobs, top logprobs, finish and stop reasons."""
    choices = {
        i: {"text": "", "tokens": [], "logprobs": [], "top": [], "finish": None}
        for i in range(n)
    }
    chunks = list(response) if stream else [response]
    for chunk in chunks:
        for c in chunk.choices:
            got = choices[c.index]
            assert got["finish"] is None, "a choice went on after its finish_reason"
            got["text"] += c.text
            if c.logprobs is not None:
                got["tokens"] += c.logprobs.tokens
                got["logprobs"] += c.logprobs.token_logprobs
                got["top"] += c.logprobs.top_logprobs
            got["finish"] = c.finish_reason
            got["stop_reason"] = getattr(c, "stop_reason", None)
    for got in choices.values():
        got["ids"] = ids_of(got["tokens"])
    return choices


def assert_same(choices: dict, expected) -> None:
    assert len(choices) == len(expected.outputs)
    for want in expected.outputs:
        got = choices[want.index]
        assert got["ids"] == want.token_ids
        assert got["text"] == want.text
        assert got["finish"] == want.finish_reason
        assert got["logprobs"] == pytest.approx(want.logprobs, abs=1e-4)


GREEDY = dict(temperature=0.0)
SEEDED = dict(temperature=0.8, top_p=0.9, top_k=40)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_completion_equals_generate(client, reference, rng, stream, sampling):
    prompt = random_prompt(rng)
    seed = rng.randrange(10**6) if sampling == "seeded" else None
    params = SamplingParams(
        **(GREEDY if sampling == "greedy" else SEEDED),
        max_tokens=rng.randint(8, 24),
        seed=seed,
        ignore_eos=True,
    )
    expected = expected_output(reference, prompt, params)
    choices = collect(create(client, prompt, params, stream), stream, 1)
    assert_same(choices, expected)
    assert choices[0]["finish"] == "length"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_n_samples_and_usage(client, reference, rng, stream):
    prompt = random_prompt(rng)
    params = SamplingParams(
        n=3, **SEEDED, max_tokens=rng.randint(6, 16), seed=rng.randrange(10**6)
    )
    expected = expected_output(reference, prompt, params)
    response = create(
        client,
        prompt,
        params,
        stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    )
    if stream:
        chunks = list(response)
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and all(
            chunk.usage is None for chunk in chunks[:-1]
        )
        choices = collect(chunks, True, 3)
    else:
        usage = response.usage
        choices = collect(response, False, 3)
        assert response.id.startswith("cmpl-") and response.object == "text_completion"
        assert response.model == MODEL
    assert_same(choices, expected)
    assert usage.prompt_tokens == len(prompt)
    assert usage.completion_tokens == sum(len(c.token_ids) for c in expected.outputs)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_logprobs_list_the_top_tokens(client, reference, rng, stream):
    prompt, k = random_prompt(rng), rng.randint(1, 5)
    params = SamplingParams(
        **SEEDED, max_tokens=10, seed=rng.randrange(10**6), ignore_eos=True, logprobs=k
    )
    expected = expected_output(reference, prompt, params).outputs[0]
    got = collect(create(client, prompt, params, stream), stream, 1)[0]
    assert got["ids"] == expected.token_ids
    for token, top, want in zip(
        got["ids"], got["top"], expected.top_logprobs, strict=True
    ):
        # the sampled token is always listed
        want = {**want, token: want.get(token, None)}
        assert sorted(ids_of(list(top))) == sorted(want)
        for text, logprob in top.items():
            (token_id,) = ids_of([text])
            if want[token_id] is not None:
                assert logprob == pytest.approx(want[token_id], abs=1e-4)
        assert len(want) - 1 <= k <= len(top)


def test_text_offsets_follow_the_text(client, rng):
    response = client.completions.create(
        model=MODEL,
        prompt="Offsets",
        max_tokens=12,
        temperature=0,
        logprobs=1,
        extra_body={"ignore_eos": True},
    )
    logprobs = response.choices[0].logprobs
    tokenizer = ByteTokenizer()
    ids = ids_of(logprobs.tokens)
    assert logprobs.text_offset == [
        len(tokenizer.decode(ids[:i])) for i in range(len(ids))
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_stop_string_cuts_the_text(client, reference, rng, stream):
    prompt = random_prompt(rng)
    free = expected_output(
        reference,
        prompt,
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
    )
    text = free.outputs[0].text
    # a stop string taken from the middle of the free-running text: the first place it occurs wins.
    # Printable ASCII only: a U+FFFD in the text may be a character still incomplete when checked
    stops = [
        text[i : i + length]
        # a single character if no two printable ones are adjacent
        for length in (rng.randint(1, 2), 1)
        for i in range(4, len(text) - 4)
        if text[i : i + length].isascii() and text[i : i + length].isprintable()
    ]
    stop = stops[rng.randrange(len([s for s in stops if len(s) == len(stops[0])]))]
    params = SamplingParams(
        temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop]
    )
    expected = expected_output(reference, prompt, params)
    assert (
        expected.outputs[0].finish_reason == "stop"
        and expected.outputs[0].text == text[: text.find(stop)]
    )
    got = collect(create(client, prompt, params, stream), stream, 1)
    assert_same(got, expected)
    assert got[0]["stop_reason"] == stop


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_stop_token_ids(client, reference, rng, stream):
    prompt = random_prompt(rng)
    free = expected_output(
        reference,
        prompt,
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
    )
    tokens = free.outputs[0].token_ids
    at = rng.randrange(2, 20)
    params = SamplingParams(
        temperature=0.0, max_tokens=30, ignore_eos=True, stop_token_ids=[tokens[at]]
    )
    got = collect(create(client, prompt, params, stream), stream, 1)[0]
    # kept, as vLLM keeps it
    assert got["ids"] == tokens[: tokens.index(tokens[at]) + 1]
    assert got["finish"] == "stop" and got["stop_reason"] == tokens[at]


def test_text_prompt_and_default_max_tokens(client, reference):
    response = client.completions.create(
        model=MODEL, prompt="Paging is", temperature=0, extra_body={"ignore_eos": True}
    )
    expected = reference.generate(
        "Paging is",
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
        use_tqdm=False,
    )
    assert response.choices[0].text == expected[0].outputs[0].text
    assert response.usage.completion_tokens == 16  # OpenAI's default max_tokens
    assert response.usage.prompt_tokens == len(expected[0].prompt_token_ids)


def test_32_concurrent_clients_get_their_own_answers(url, reference, rng):
    prompts = [random_prompt(rng, 1, 30) for _ in range(32)]
    params = [
        SamplingParams(
            **rng.choice([GREEDY, SEEDED]),
            max_tokens=rng.randint(1, 20),
            seed=rng.randrange(10**6),
            ignore_eos=rng.random() < 0.8,
        )
        for _ in prompts
    ]
    streams = [rng.random() < 0.5 for _ in prompts]
    expected = reference.generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
    )
    barrier = threading.Barrier(32)

    def one(i: int) -> dict:
        client = openai.OpenAI(
            base_url=url + "/v1", api_key="x", max_retries=0, timeout=120
        )
        barrier.wait()  # all at once: they batch together in the one engine loop
        return collect(create(client, prompts[i], params[i], streams[i]), streams[i], 1)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    for got, want in zip(results, expected, strict=True):
        assert_same(got, want)


# ---- raw HTTP: bad requests, disconnects, metrics ----------------------------------------------


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url + "/v1/completions", data, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    figures = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = "".join(f"{{{k}={v}}}" for k, v in sorted(sample.labels.items()))
            figures[sample.name + labels] = sample.value
    return figures


VALID = {"model": MODEL, "prompt": [10, 20, 30], "max_tokens": 4, "temperature": 0}
BAD_REQUESTS = [
    ({"max_tokens": "x"}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 1.5}, "n"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"seed": "s"}, "seed"),
    ({"stop": 5}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": ["a"]}, "stop_token_ids"),
    ({"logprobs": 100}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"best_of": 3}, "best_of"),
    ({"bogus_field": 1}, "bogus_field"),
    ({"prompt": None}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], [3, 4]]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [5, 99999]}, "prompt"),  # beyond the vocabulary: the engine refuses it
    # beyond max_model_len: never fits
    ({"prompt": list(range(3, 150)), "max_tokens": 30}, "max_tokens"),
    ({"model": 7}, "model"),
]


@pytest.mark.parametrize(
    ("change", "field"), BAD_REQUESTS, ids=[f for _, f in BAD_REQUESTS]
)
def test_bad_request_is_400_naming_the_field_and_the_server_goes_on(
    url, reference, change, field
):
    body = {**VALID, **change}
    if change.get("prompt", 0) is None:
        del body["prompt"]
    status, error = post(url, body)
    assert status == 400, error
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["param"] == field or field in error["error"]["message"]
    status, ok = post(url, VALID)
    expected = reference.generate(
        {"prompt_token_ids": VALID["prompt"]},
        SamplingParams(temperature=0.0, max_tokens=4),
        use_tqdm=False,
    )
    assert status == 200 and ok["choices"][0]["text"] == expected[0].outputs[0].text


@pytest.mark.parametrize(
    "body", [b"{not json", b"[1, 2]", b"\xff\xfe"], ids=["malformed", "array", "bytes"]
)
def test_a_body_that_is_not_a_json_object_is_400(url, body):
    status, error = post(url, body)
    assert status == 400 and "error" in error
    assert post(url, VALID)[0] == 200


def test_unknown_model_is_404_and_models_and_health(url):
    status, error = post(url, {**VALID, "model": "gpt-9"})
    assert (
        status == 404
        and error["error"]["param"] == "model"
        and "gpt-9" in error["error"]["message"]
    )
    with urllib.request.urlopen(url + "/v1/models") as response:
        models = json.loads(response.read())
    assert [m["id"] for m in models["data"]] == [MODEL] and models["object"] == "list"
    with urllib.request.urlopen(url + "/health") as response:
        assert response.status == 200


def raw_request(url: str, body: dict) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps(body).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    sock.sendall(head.encode() + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


LONG = {**VALID, "max_tokens": 150, "ignore_eos": True, "prompt": [7, 8, 9]}


def test_disconnect_mid_stream_frees_the_blocks(url, llm):
    before = metrics(url)
    sock = raw_request(url, {**LONG, "stream": True})
    received = b""
    # the first event has arrived: the request is running
    while b"data: " not in received:
        received += sock.recv(4096)
    assert received.startswith(b"HTTP/1.1 200")
    sock.close()
    poll(lambda: idle(llm), what="the aborted request's blocks")
    aborted = before["minipaged_requests_aborted_total"] + 1
    poll(
        lambda: metrics(url)["minipaged_requests_aborted_total"] == aborted,
        what="the abort's count",
    )
    after = metrics(url)
    assert (
        after["minipaged_requests_finished_total"]
        == before["minipaged_requests_finished_total"]
    )
    assert post(url, VALID)[0] == 200


def test_disconnect_while_waiting_for_a_whole_completion_frees_the_blocks(url, llm):
    before = metrics(url)
    sock = raw_request(url, LONG)
    poll(llm.has_unfinished_requests, what="the request to start")
    sock.close()
    poll(lambda: idle(llm), what="the aborted request's blocks")
    aborted = before["minipaged_requests_aborted_total"] + 1
    poll(
        lambda: metrics(url)["minipaged_requests_aborted_total"] == aborted,
        what="the abort's count",
    )
    after = metrics(url)
    assert (
        after["minipaged_requests_finished_total"]
        == before["minipaged_requests_finished_total"]
    )


def test_metrics_move_with_the_requests(url, llm, client, rng):
    before = metrics(url)
    assert before["minipaged_kv_blocks_free"] == ENGINE_ARGS["num_gpu_blocks"]
    assert (
        before["minipaged_kv_blocks_used"] == 0
        and before["minipaged_num_requests_running"] == 0
    )
    prompt, max_tokens = random_prompt(rng), rng.randint(5, 15)
    response = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        n=2,
        seed=1,
        extra_body={"ignore_eos": True},
    )
    after = metrics(url)
    assert (
        after["minipaged_requests_finished_total"]
        == before["minipaged_requests_finished_total"] + 1
    )
    assert after["minipaged_prompt_tokens_total"] - before[
        "minipaged_prompt_tokens_total"
    ] == len(prompt)
    generated = (
        after["minipaged_generation_tokens_total"]
        - before["minipaged_generation_tokens_total"]
    )
    assert generated == response.usage.completion_tokens == 2 * max_tokens
    assert after["minipaged_kv_blocks_free"] == ENGINE_ARGS["num_gpu_blocks"]
    for name in [
        "num_requests_waiting",
        "num_requests_swapped",
        "prefix_cache_hit_rate",
    ]:
        assert f"minipaged_{name}" in after
    assert "minipaged_num_preemptions_total{mode=recompute}" in after

    # while a long request runs, the gauges show it
    sock = raw_request(url, {**LONG, "stream": True})
    poll(
        lambda: metrics(url)["minipaged_num_requests_running"] == 1,
        what="the running gauge",
    )
    running = metrics(url)
    assert running["minipaged_kv_blocks_used"] > 0
    assert (
        running["minipaged_kv_blocks_used"] + running["minipaged_kv_blocks_free"]
        == ENGINE_ARGS["num_gpu_blocks"]
    )
    sock.close()
    poll(lambda: idle(llm), what="the blocks")


def test_an_engine_error_is_500_and_the_server_goes_on(url, llm, reference, rng):
    execute, calls = llm.runner.execute, []

    def failing(out):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated device fault")
        return execute(out)

    llm.runner.execute = failing
    try:
        status, error = post(url, {**VALID, "prompt": random_prompt(rng)})
    finally:
        llm.runner.execute = execute
    assert status == 500 and "simulated device fault" in error["error"]["message"]
    assert idle(llm)
    prompt = random_prompt(rng)
    status, ok = post(url, {**VALID, "prompt": prompt})
    expected = reference.generate(
        {"prompt_token_ids": prompt},
        SamplingParams(temperature=0.0, max_tokens=4),
        use_tqdm=False,
    )
    assert status == 200 and ok["choices"][0]["text"] == expected[0].outputs[0].text


def test_a_full_queue_is_503():
    llm = LLM(MODEL, **ENGINE_ARGS)
    with running_server(llm, max_queued_requests=2, served_model_name="small") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        body = {"ignore_eos": True}
        streams = [
            client.completions.create(
                model="small",
                prompt=[5, 6],
                max_tokens=150,
                stream=True,
                extra_body=body,
            )
            for _ in range(2)
        ]
        for stream in streams:
            next(iter(stream))  # both are queued or running
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model="small", prompt=[5, 6], max_tokens=4)
        assert refused.value.status_code == 503
        assert "full" in refused.value.body["message"]
        for stream in streams:
            stream.close()
        poll(lambda: idle(llm), what="the closed streams' blocks")
        assert (
            client.completions.create(
                model="small", prompt=[5, 6], max_tokens=4
            ).usage.completion_tokens
            >= 1
        )


def test_build_app_checks_its_arguments(llm):
    with pytest.raises(ValueError, match="max_queued_requests"):
        build_app(llm, max_queued_requests=0)
    with pytest.raises(ValueError, match="served_model_name"):
        build_app(llm, served_model_name="")
    with pytest.raises(ValueError, match="port"), running_server(llm, port=-1):
        pass


# ---- the stream's text deltas, without a server ------------------------------------------------


def partial(token_ids: list[int], text: str | None = None, finish_reason=None):
    from minipaged.outputs import CompletionOutput, RequestOutput

    text = ByteTokenizer().decode(token_ids) if text is None else text
    completion = CompletionOutput(
        0, text, list(token_ids), 0.0, [0.0] * len(token_ids), finish_reason
    )
    return RequestOutput(
        "0", None, [5], [completion], finished=finish_reason is not None
    )


def streamed_text(outputs, stop=None) -> list[list[str]]:
    from minipaged.serving.responses import CompletionStream

    stream = CompletionStream(MODEL, ByteTokenizer(), 1, stop, False, False)
    chunks = [
        stream.chunks(out, i == len(outputs) - 1) for i, out in enumerate(outputs)
    ]
    return [[c["choices"][0]["text"] for c in step] for step in chunks]


def test_a_character_split_across_tokens_is_held_back_until_it_is_whole(rng):
    char = rng.choice("éß€😀")
    data = [b + BYTE_OFFSET for b in char.encode()]  # two to four tokens, one character
    head = [rng.randrange(BYTE_OFFSET + 65, BYTE_OFFSET + 91)]  # an ASCII capital
    outputs = [partial(head + data[:i]) for i in range(1, len(data) + 1)] + [
        partial(head + data, None, "length")
    ]
    deltas = streamed_text(outputs)
    assert (
        "".join(d for step in deltas for d in step) == chr(head[0] - BYTE_OFFSET) + char
    )
    # never half a character
    assert all("\ufffd" not in d for step in deltas for d in step)


def test_the_start_of_a_stop_string_is_held_back():
    # the output so far ends with "ST", which may begin the stop string "STOP": it is not sent yet;
    # the request then ends on "STOP" and its final text stops before it
    ids = [b + BYTE_OFFSET for b in b"go ST"]
    outputs = [
        partial(ids),
        partial([*ids, ord("O") + BYTE_OFFSET]),
        partial(ids, "go ", "stop"),
    ]
    deltas = streamed_text(outputs, stop=["STOP"])
    assert "".join(d for step in deltas for d in step) == "go "
    assert deltas[0] == ["go"]  # "go ST" less the 3 characters that may start "STOP"
