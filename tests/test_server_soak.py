"""A soak test: 2,000 requests through the server into a pool small enough to preempt.

OS idea: a long-running daemon must not leak: after any number of clients, its memory is what it was
after the first few. Here 16 clients send 2,000 short requests (some streamed, some with n = 2, a
few abandoned mid-stream) to a server whose pool holds a fraction of them, so the scheduler preempts
again and again. Afterwards every block is free, and the Python memory allocated by minipaged's own code, the
engine's and the server's (tracemalloc, comparing a snapshot after a warm-up batch with one after the
rest), has not grown by more than a bound that a leak of per-request state (a queue, an
output, a step record per request) would exceed many times.
"""

from __future__ import annotations

import gc
import json
import random
import socket
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import openai

from minipaged import LLM
from minipaged.serving import running_server

NUM_REQUESTS, WARMUP, CLIENTS = 2000, 200, 16
POOL = 40  # blocks of 4 tokens: 16 clients of up to 2 x (12 + 10) tokens need up to 176
SEED = random.randrange(2**31)
print(f"test_server_soak: SEED={SEED}")
LEAK_BOUND = 64 * 1024  # bytes: 1,800 requests leaking 40 bytes each would pass it
# what counts: the allocations that minipaged's own lines make (the engine's and the server's state);
# the libraries' caches (torch's, transformers' per-shape ones) grow and level off on their own
OURS = [tracemalloc.Filter(True, "*/minipaged/*")]


def send(url: str, client: openai.OpenAI, rng: random.Random) -> int:
    """One request: whole, streamed, or streamed and abandoned after the first event."""
    prompt = [rng.randrange(3, 259) for _ in range(rng.randint(1, 12))]
    kind = rng.choices(["whole", "stream", "abandon"], [0.6, 0.35, 0.05])[0]
    n = 2 if rng.random() < 0.2 else 1
    extra = {"ignore_eos": True, "top_k": 20}
    if kind == "abandon":
        return abandon(url, prompt)
    response = client.completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=rng.randint(1, 10), n=n, seed=rng.randrange(1000),
        stream=kind == "stream", extra_body=extra,
    )  # fmt: skip
    return len(list(response)) if kind == "stream" else len(response.choices)


def abandon(url: str, prompt: list[int]) -> int:
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(
        {"prompt": prompt, "max_tokens": 10, "ignore_eos": True, "stream": True}
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        received = b""
        while b"data: " not in received:
            received += sock.recv(4096)
    return 0


def run_batch(url: str, count: int, rng: random.Random) -> None:
    seeds = [rng.randrange(2**31) for _ in range(count)]
    client = openai.OpenAI(
        base_url=url + "/v1", api_key="x", max_retries=0, timeout=120
    )
    with ThreadPoolExecutor(CLIENTS) as pool:
        for result in pool.map(lambda s: send(url, client, random.Random(s)), seeds):
            assert result >= 0


def settle(llm: LLM) -> None:
    import time

    deadline = time.monotonic() + 30
    while llm.has_unfinished_requests() or llm.block_manager.device.num_free != POOL:
        assert time.monotonic() < deadline, "requests or blocks left behind"
        time.sleep(0.01)


def test_soak_2000_requests_preempt_and_leak_nothing():
    rng = random.Random(SEED)
    llm = LLM(
        "tiny-llama",
        block_size=4,
        num_gpu_blocks=POOL,
        num_cpu_blocks=0,
        max_step_stats=4,
    )
    with running_server(llm, max_queued_requests=4 * CLIENTS) as url:
        run_batch(url, WARMUP, rng)
        settle(llm)
        gc.collect()
        tracemalloc.start(1)
        before = tracemalloc.take_snapshot()
        run_batch(url, NUM_REQUESTS - WARMUP, rng)
        settle(llm)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
    before, after = before.filter_traces(OURS), after.filter_traces(OURS)
    assert sum(llm.stats.num_preemptions.values()) > 0, (
        "the pool was never short: no preemption happened"
    )
    assert len(llm.step_stats) <= 4
    growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    top = "\n".join(str(stat) for stat in after.compare_to(before, "lineno")[:5])
    assert growth < LEAK_BOUND, (
        f"Python memory grew by {growth} bytes over {NUM_REQUESTS - WARMUP} requests:\n{top}"
    )
    assert (
        llm.block_manager.device.num_free == POOL and not llm.has_unfinished_requests()
    )
