"""Running the app: `serve` (blocking, for `minipaged serve`) and `running_server` (in a thread).

OS idea: a daemon's start and stop. It binds its port, runs until a signal (Ctrl-C is SIGINT),
then shuts down in order: stop accepting, let the open connections end, stop the workers (here the
engine loop, which aborts what is left so that every KV block is free again).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import uvicorn

from minipaged.serving.app import DEFAULT_MAX_QUEUED_REQUESTS, build_app

# open streams get this long to end at shutdown, then they are cancelled
GRACEFUL_SHUTDOWN_S = 5


def serve(
    llm,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    served_model_name: str | None = None,
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
) -> None:
    """Serve `llm` over HTTP until Ctrl-C (blocking), as `minipaged serve` does.

    Args:
        llm: the engine (minipaged.LLM).
        host, port: where to listen.
        served_model_name, max_queued_requests: as build_app's.

    Raises:
        ValueError: naming the argument, for a bad port or a bad build_app argument.
    """
    _check_port(port)
    app = build_app(
        llm,
        served_model_name=served_model_name,
        max_queued_requests=max_queued_requests,
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    # handles SIGINT/SIGTERM: a clean shutdown runs the app's lifespan end
    uvicorn.Server(config).run()


@contextlib.contextmanager
def running_server(
    llm,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    served_model_name: str | None = None,
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
    startup_timeout: float = 60.0,
) -> Iterator[str]:
    """Serve `llm` from a background thread for the length of a `with` block.

        with running_server(llm) as url:   # "http://127.0.0.1:PORT"
            client = openai.OpenAI(base_url=url + "/v1", api_key="none")

    Args:
        llm: the engine (minipaged.LLM); only the server's engine thread calls it until the block ends.
        host, port: where to listen (port 0: a free port, chosen by the OS).
        served_model_name, max_queued_requests: as build_app's.
        startup_timeout: seconds to wait for /health to answer.

    Yields:
        The base URL, once /health answers 200. On exit the server and its engine loop stop;
        requests still running are aborted, so every block is free again.

    Raises:
        ValueError: naming the argument, for a bad port or a bad build_app argument.
        RuntimeError: if the server does not come up within startup_timeout.
    """
    _check_port(port)
    app = build_app(
        llm,
        served_model_name=served_model_name,
        max_queued_requests=max_queued_requests,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))  # bound here, so the port is known before uvicorn starts
    url = f"http://{host}:{sock.getsockname()[1]}"
    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S
    )
    server = uvicorn.Server(config)
    # uvicorn leaves signals alone off the main thread: Ctrl-C still reaches the caller
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="minipaged-uvicorn"
    )
    thread.daemon = True
    thread.start()
    try:
        _wait_healthy(url, thread, startup_timeout)
        yield url
    finally:
        server.should_exit = True
        thread.join(GRACEFUL_SHUTDOWN_S + 30)
        # a no-op after a clean shutdown; here if uvicorn never started
        app.state.engine.stop()
        sock.close()


def _wait_healthy(url: str, thread: threading.Thread, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError(
                "the server thread ended while starting (see its log above)"
            )
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url + "/health", timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.02)
    raise RuntimeError(f"the server at {url} did not answer /health within {timeout} s")


def _check_port(port: object) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in [0, 65535], got {port!r}")
