"""The HTTP routes: /v1/completions, /v1/models, /health, /metrics (an OpenAI-compatible server).

OS idea: a server process's event loop (select/epoll). One thread multiplexes every connection and
never blocks on any one of them: a handler parses its request, posts it to the engine loop and
sleeps (await) until an event comes back, so thousands of clients cost a coroutine each while the
model runs on its own thread. KV counterpart: vLLM's api_server over AsyncLLMEngine (paper section
5, "frontend"). A client that goes away has its request aborted, which frees its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask

from minipaged.serving.engine_loop import (
    ACCEPTED,
    ERROR,
    FINISHED,
    EngineLoop,
    Event,
    Submission,
)
from minipaged.serving.metrics import make_registry
from minipaged.serving.protocol import (
    CompletionRequest,
    ProtocolError,
    field_named_in,
    parse_completion_request,
)
from minipaged.serving.responses import CompletionStream, completion_body

DEFAULT_MAX_QUEUED_REQUESTS = 1024


def build_app(
    llm,
    *,
    served_model_name: str | None = None,
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
) -> FastAPI:
    """An OpenAI-compatible FastAPI app over `llm`, with one engine loop for all its connections.

    The engine loop's thread starts with the app (its lifespan) and stops with it; from then on only
    that thread calls `llm`. An app is served once.

    Args:
        llm: the engine (minipaged.LLM).
        served_model_name: the name /v1/models lists and requests give as "model" (None: the
            preset's name or the checkpoint directory's basename).
        max_queued_requests: the most requests submitted and not yet finished; beyond, HTTP 503.

    Raises:
        ValueError: naming the argument, for a bad served_model_name or max_queued_requests.
    """
    if served_model_name is not None and (
        not isinstance(served_model_name, str) or not served_model_name
    ):
        raise ValueError(
            f"served_model_name must be a non-empty string, got {served_model_name!r}"
        )
    if type(max_queued_requests) is not int or max_queued_requests < 1:
        raise ValueError(
            f"max_queued_requests must be an int >= 1, got {max_queued_requests!r}"
        )
    engine = EngineLoop(llm)
    model_name = served_model_name or default_model_name(llm)
    registry = make_registry(engine)
    # requests submitted and not finished (touched on the event loop only)
    in_flight = {"count": 0}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            # aborts what is left: every block comes back
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="minipaged", lifespan=lifespan)
    app.state.engine, app.state.llm, app.state.model_name = engine, llm, model_name

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_alive() else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "minipaged",
        }
        card["max_model_len"] = llm.scheduler_config.max_model_len
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            completion = parse_completion_request(await _json_body(request))
            _check_token_ids(completion.params.stop_token_ids, llm.vocab_size)
            if completion.model not in (None, model_name):
                raise ProtocolError(
                    f"the model `{completion.model}` does not exist (this server serves `{model_name}`)",
                    "model", status=404, code="model_not_found",
                )  # fmt: skip
            if in_flight["count"] >= max_queued_requests:
                raise ProtocolError(
                    f"the server is full: {max_queued_requests} requests are queued or running; retry later",
                    None, status=503,
                )  # fmt: skip
        except ProtocolError as error:
            return _error_response(error)
        in_flight["count"] += 1
        handle = _Handle(engine, completion, in_flight)
        return await handle.respond(request, model_name, llm.tokenizer)

    return app


class _Handle:
    """One completion request between its handler and the engine loop.

    Its slot in the queue (in_flight) is given back exactly once, by _release, whichever way the
    request ends; a request that ends before the engine is done with it (the client left) is aborted.
    """

    def __init__(
        self, engine: EngineLoop, completion: CompletionRequest, in_flight: dict
    ) -> None:
        self.engine, self.completion, self.in_flight = engine, completion, in_flight
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.submission = Submission(
            completion.prompt,
            completion.params,
            completion.stream,
            deliver=self._deliver_from(loop),
        )
        self.over = False  # the engine is done with it: finished, refused or failed
        self.released = False
        self.streaming = False  # the stream's generator releases it

    def _deliver_from(self, loop: asyncio.AbstractEventLoop):
        # on the engine thread: hand over, never block
        def deliver(event: Event) -> None:
            # the event loop has closed: nobody is waiting
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.queue.put_nowait, event)

        return deliver

    async def respond(self, request: Request, model_name: str, tokenizer) -> Response:
        """Submit, then answer: an error, the whole completion, or a stream of events."""
        self.engine.submit(self.submission)
        try:
            # ACCEPTED, or an ERROR: the engine refused it
            event = await self._next(request)
            if event is not None and event.kind == ACCEPTED and self.completion.stream:
                self.streaming = True
                return StreamingResponse(
                    self._sse(model_name, tokenizer),
                    media_type="text/event-stream",
                    # runs even if the stream never started
                    background=BackgroundTask(self._release_async),
                )
            while event is not None and event.kind == ACCEPTED:
                event = await self._next(request)
            if event is None:  # the client left: _release aborts the request
                return Response(status_code=499)
            if event.kind == ERROR:
                param = field_named_in(event.message) if event.status == 400 else None
                return _error_response(
                    ProtocolError(event.message, param, event.status)
                )
            want_logprobs = self.completion.params.logprobs is not None
            return JSONResponse(
                completion_body(event.output, model_name, tokenizer, want_logprobs)
            )
        finally:
            if not self.streaming:
                self._release()

    async def _next(self, request: Request) -> Event | None:
        """The next event from the engine loop, or None if the client disconnected first."""
        get = asyncio.ensure_future(self.queue.get())
        gone = asyncio.ensure_future(_disconnected(request))
        done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
        for task in (get, gone):
            if task not in done:
                task.cancel()
        return self._seen(get.result()) if get in done else None

    def _seen(self, event: Event) -> Event:
        self.over = self.over or event.kind in (FINISHED, ERROR)
        return event

    async def _sse(self, model_name: str, tokenizer):
        """Server-sent events: a chunk per step with each choice's new text, then [DONE]."""
        completion, params = self.completion, self.completion.params
        want_logprobs = params.logprobs is not None
        stream = CompletionStream(
            model_name,
            tokenizer,
            params.n,
            params.stop,
            want_logprobs,
            completion.include_usage,
            completion.continuous_usage,
        )
        try:
            while True:
                event = self._seen(await self.queue.get())
                # the client is behind: the latest output holds it all
                while not self.queue.empty():
                    event = self._seen(self.queue.get_nowait())
                if event.kind == ERROR:
                    yield _sse_data(
                        ProtocolError(event.message, None, event.status).body()
                    )
                    break
                finished = event.kind == FINISHED
                for chunk in stream.chunks(event.output, finished):
                    yield _sse_data(chunk)
                if finished:
                    if completion.include_usage:
                        yield _sse_data(stream.usage_chunk(event.output))
                    break
            yield "data: [DONE]\n\n"
        # also on disconnect: Starlette cancels this generator when the client goes away
        finally:
            self._release()

    async def _release_async(self) -> None:
        self._release()

    def _release(self) -> None:
        if self.released:
            return
        self.released = True
        self.in_flight["count"] -= 1
        # the client left before the end: the engine must free its blocks
        if not self.over:
            self.engine.abort(self.submission)


async def _json_body(request: Request) -> object:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ProtocolError(f"the body is not valid JSON: {error}", None) from None


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body was read: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse_data(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _check_token_ids(stop_token_ids: tuple[int, ...], vocab_size: int) -> None:
    """A stop token the model can never sample is a mistake, refused as vLLM does (400)."""
    bad = [t for t in stop_token_ids if t >= vocab_size]
    if bad:
        message = f"stop_token_ids must be token ids in [0, {vocab_size}) (the vocabulary), got {bad[:5]}"
        raise ProtocolError(message, "stop_token_ids")


def _error_response(error: ProtocolError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def default_model_name(llm) -> str:
    """The preset's name or the checkpoint directory's basename (LLM.model_name), else "minipaged"."""
    name = getattr(llm, "model_name", None)
    if isinstance(name, str) and name:
        return os.path.basename(name.rstrip("/")) or name
    return "minipaged"
