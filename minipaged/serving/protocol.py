"""The OpenAI completions protocol: a request body in, a prompt and SamplingParams out.

OS idea: the system-call boundary. The kernel checks every argument a process passes in (a bad
pointer or flag is EFAULT or EINVAL, and the process goes on) before any of it reaches kernel state.
Here the HTTP handler checks every field of a JSON body before anything reaches the engine: a bad
field is an HTTP 400 whose error body names it, in OpenAI's format, and the engine never sees it.

Fields follow OpenAI's /v1/completions and vLLM's extras (top_k, ignore_eos, stop_token_ids):

    {"model": "tiny-llama", "prompt": "Hello" | [1, 75, 104], "max_tokens": 16, "temperature": 1.0,
     "top_p": 1.0, "top_k": 0, "n": 1, "seed": null, "stop": null, "stop_token_ids": null,
     "logprobs": null, "ignore_eos": false, "stream": false,
     "stream_options": {"include_usage": true, "continuous_usage_stats": false}}
"""

from __future__ import annotations

from dataclasses import dataclass

from minipaged.sampling import SamplingParams

MAX_LOGPROBS = 20  # vLLM's default max_logprobs (OpenAI allows 5)

# OpenAI fields minipaged does not implement, and the value that means "not used": accepted at it.
_INERT = {
    "echo": (False,),
    "suffix": (None, ""),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
}
_IGNORED = {"user"}  # accepted and ignored, as vLLM does
# the second is vLLM's extra
_STREAM_OPTIONS = {"include_usage", "continuous_usage_stats"}
_KNOWN = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop",
    "stop_token_ids", "logprobs", "ignore_eos", "stream", "stream_options", "best_of", "logit_bias",
} | set(_INERT) | _IGNORED  # fmt: skip


class ProtocolError(Exception):
    """A request the server refuses: HTTP `status` with an OpenAI-style error body naming `param`."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict:
        """The error body as OpenAI sends it."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class CompletionRequest:
    """A checked /v1/completions request: what the engine loop and the response builder need.

    Attributes:
        model: the model name the client asked for (None: the served one).
        prompt: a string or {"prompt_token_ids": [...]}, as LLM.add_request takes it.
        params: the SamplingParams built from the body.
        stream: send server-sent events token by token.
        include_usage: with stream, end with a chunk that carries the usage counts.
        continuous_usage: with include_usage, every chunk also carries the counts so far (vLLM's
            stream_options.continuous_usage_stats).
    """

    model: str | None
    prompt: str | dict
    params: SamplingParams
    stream: bool
    include_usage: bool
    continuous_usage: bool = False


def parse_completion_request(body: object) -> CompletionRequest:
    """Check an OpenAI /v1/completions body and turn it into a CompletionRequest.

    Args:
        body: the parsed JSON body.

    Raises:
        ProtocolError: HTTP 400 naming the field, for a missing, unknown or ill-typed field.
    """
    if not isinstance(body, dict):
        raise ProtocolError(
            f"the body must be a JSON object, got {type(body).__name__}", None
        )
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise ProtocolError(f"unknown field(s): {', '.join(unknown)}", unknown[0])
    for name, inert in _INERT.items():
        if name in body and body[name] not in inert:
            raise ProtocolError(
                f"{name}={body[name]!r} is not supported by minipaged", name
            )
    model = _optional(body, "model", str)
    n = _get(body, "n", int, 1)
    best_of = _optional(body, "best_of", int)
    if best_of is not None and best_of != n:
        raise ProtocolError(
            f"best_of must equal n ({n}) in minipaged, got {best_of}", "best_of"
        )
    if body.get("logit_bias"):
        raise ProtocolError("logit_bias is not supported by minipaged", "logit_bias")
    stream = _get(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and not stream:
        raise ProtocolError(
            "stream_options is only allowed with stream: true", "stream_options"
        )
    if options is not None and (
        not isinstance(options, dict) or set(options) - _STREAM_OPTIONS
    ):
        message = 'stream_options must be {"include_usage": bool, "continuous_usage_stats": bool}'
        raise ProtocolError(message, "stream_options")
    include_usage = _get(
        options or {}, "include_usage", bool, False, "stream_options.include_usage"
    )
    continuous = _get(
        options or {},
        "continuous_usage_stats",
        bool,
        False,
        "stream_options.continuous_usage_stats",
    )
    params = _sampling_params(body, n)
    # counts on every chunk only when counts were asked
    continuous = include_usage and continuous
    return CompletionRequest(
        model, _prompt(body), params, stream, include_usage, continuous
    )


def _sampling_params(body: dict, n: int) -> SamplingParams:
    top_k = _get(body, "top_k", int, 0)
    logprobs = _optional(body, "logprobs", int)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise ProtocolError(
            f"logprobs must be an int in [0, {MAX_LOGPROBS}], got {logprobs}",
            "logprobs",
        )
    stop = body.get("stop")
    if not (stop is None or isinstance(stop, str) or _is_list_of(stop, str)):
        raise ProtocolError(
            f"stop must be a string or a list of strings, got {stop!r}", "stop"
        )
    stop_token_ids = body.get("stop_token_ids")
    if not (stop_token_ids is None or _is_list_of(stop_token_ids, int)):
        message = f"stop_token_ids must be a list of ints, got {stop_token_ids!r}"
        raise ProtocolError(message, "stop_token_ids")
    fields = dict(
        n=n,
        temperature=_get(body, "temperature", float, 1.0),
        top_p=_get(body, "top_p", float, 1.0),
        top_k=0 if top_k == -1 else top_k,  # vLLM spells "off" -1
        max_tokens=_get(body, "max_tokens", int, 16),  # OpenAI's default
        seed=_optional(body, "seed", int),
        ignore_eos=_get(body, "ignore_eos", bool, False),
        # "" goes on to be refused, as [""] is
        stop=None if stop in (None, []) else stop,
        stop_token_ids=stop_token_ids or None,
        logprobs=logprobs,
    )
    try:
        return SamplingParams(**fields)
    # a value out of range: the message names the field
    except (ValueError, TypeError) as error:
        raise ProtocolError(str(error), field_named_in(str(error))) from None


def _prompt(body: dict) -> str | dict:
    """One prompt: a string, or token ids. A batch of prompts is refused: send one request each."""
    if "prompt" not in body:
        raise ProtocolError("prompt is required", "prompt")
    prompt = body["prompt"]
    if (
        isinstance(prompt, list)
        and len(prompt) == 1
        and isinstance(prompt[0], (str, list))
    ):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return {"prompt_token_ids": prompt}
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, (str, list)) for p in prompt)
    ):
        raise ProtocolError(
            "prompt: one prompt per request in minipaged (send several requests: they batch together)",
            "prompt",
        )
    raise ProtocolError(
        f"prompt must be a string or a non-empty list of token ids, got {prompt!r}",
        "prompt",
    )


def _get(body: dict, name: str, kind: type, default, label: str | None = None):
    """body[name] checked to be of `kind` (an int passes as a float; bool never passes as int)."""
    value = body.get(name)
    if value is None:
        return default
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ProtocolError(
            f"{label or name} must be {_KIND_NAMES[kind]}, got {value!r}", label or name
        )
    return value


def _optional(body: dict, name: str, kind: type):
    return _get(body, name, kind, None)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_list_of(value: object, kind: type) -> bool:
    check = _is_int if kind is int else (lambda item: isinstance(item, kind))
    return isinstance(value, list) and all(check(item) for item in value)


_KIND_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}


def field_named_in(message: str) -> str | None:
    """The request field that an engine error message opens with ("top_p must be ..."), if any."""
    words = message.replace("=", " ").replace(":", " ").split()
    first = words[0] if words else ""
    if first == "prompt_token_ids":
        return "prompt"
    return first if first in _KNOWN else None
