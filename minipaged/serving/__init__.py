"""`minipaged serve`: an OpenAI-compatible HTTP server over the engine (vLLM's api_server).

OS idea: a server process. One event loop multiplexes every client connection (protocol.py checks
what they send, app.py routes it), and one engine loop, in a thread of its own, runs the model for
all of them at once (engine_loop.py), as the kernel's run loop serves every process. metrics.py is
its /proc; server.py starts and stops it.

    from minipaged import LLM
    from minipaged.serving import running_server
    with running_server(LLM("tiny-llama")) as url:
        ...  # openai.OpenAI(base_url=url + "/v1", api_key="none").completions.create(...)
"""

from minipaged.serving.app import build_app
from minipaged.serving.server import running_server, serve

__all__ = ["build_app", "running_server", "serve"]
