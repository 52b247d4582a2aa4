"""OpenAI completion bodies from the engine's RequestOutput: whole, or as streamed chunks.

OS idea: a terminal's line discipline. A program writes bytes; the tty layer decides when there is
enough to show (a whole character, a whole line) and never shows half of one. A byte-level
tokenizer can split one UTF-8 character across two tokens, so a stream decodes the whole output so
far and sends only what was not sent yet, holding back a trailing U+FFFD (an unfinished character)
and, with stop strings, the tail that could still turn out to be the start of one (the final text is
cut before the stop string, and a stream must never have sent what the final text drops).
"""

from __future__ import annotations

import time
import uuid

from minipaged.outputs import CompletionOutput, RequestOutput

REPLACEMENT_CHARACTER = "\ufffd"


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def token_text(tokenizer, token_id: int) -> str:
    """A token as OpenAI's logprobs show it: its text, or "token_id:N" when it has no text of its own
    (a special token, or part of a UTF-8 character), as vLLM's --return-tokens-as-token-ids spells it."""
    text = tokenizer.decode([token_id]) if tokenizer is not None else ""
    return (
        text if text and REPLACEMENT_CHARACTER not in text else f"token_id:{token_id}"
    )


def logprobs_body(
    tokenizer, completion: CompletionOutput, start: int = 0, end: int | None = None
) -> dict:
    """OpenAI's completions logprobs {tokens, token_logprobs, top_logprobs, text_offset} for the
    generated tokens start:end (a stream sends each chunk's new tokens)."""
    end = len(completion.token_ids) if end is None else end
    top = getattr(completion, "top_logprobs", None)
    body = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i in range(start, end):
        token = completion.token_ids[i]
        body["tokens"].append(token_text(tokenizer, token))
        body["token_logprobs"].append(completion.logprobs[i])
        candidates = dict(top[i]) if top is not None else {}
        # the sampled token is always listed
        candidates.setdefault(token, completion.logprobs[i])
        body["top_logprobs"].append(
            {token_text(tokenizer, t): lp for t, lp in candidates.items()}
        )
        prefix = (
            tokenizer.decode(completion.token_ids[:i]) if tokenizer is not None else ""
        )
        body["text_offset"].append(len(prefix))
    return body


def usage_body(output: RequestOutput) -> dict:
    prompt = len(output.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in output.outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion_body(
    output: RequestOutput,
    model: str,
    tokenizer,
    want_logprobs: bool,
    request_id: str | None = None,
) -> dict:
    """The whole response to a non-streamed request."""
    choices = [
        {
            "index": c.index,
            "text": c.text,
            "logprobs": logprobs_body(tokenizer, c) if want_logprobs else None,
            "finish_reason": c.finish_reason,
            # vLLM's extra: the stop string or token
            "stop_reason": getattr(c, "stop_reason", None),
        }
        for c in output.outputs
    ]
    return {
        "id": request_id or completion_id(),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_body(output),
    }


class CompletionStream:
    """Turns a request's successive outputs into OpenAI stream chunks, sending each token once.

    Args:
        model: the served model name; tokenizer: the engine's (for logprobs' token texts).
        n: the request's samples; stop: its stop strings (their length sets the text held back).
        want_logprobs: add each chunk's tokens' logprobs; include_usage: null usage on every chunk.
        continuous_usage: with include_usage, each chunk carries its choice's counts so far instead
            (vLLM's continuous_usage_stats).
    """

    def __init__(
        self,
        model: str,
        tokenizer,
        n: int,
        stop,
        want_logprobs: bool,
        include_usage: bool,
        continuous_usage: bool = False,
    ):
        self.id, self.created = completion_id(), int(time.time())
        self.model, self.tokenizer = model, tokenizer
        self.want_logprobs, self.include_usage = want_logprobs, include_usage
        self.continuous_usage = include_usage and continuous_usage
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        # a stop string's possible start
        self.hold_back = max((len(s) for s in stops), default=1) - 1
        self.sent_text = [""] * n
        self.sent_tokens = [0] * n
        self.done = [False] * n  # its finish_reason was sent: nothing more comes for it

    def chunks(self, output: RequestOutput, finished: bool) -> list[dict]:
        """The chunks for what `output` holds beyond what was sent. A choice that has ended (all of
        them when `finished`) gets the rest of its text and its finish_reason, once."""
        chunks = []
        for c in output.outputs:
            if self.done[c.index]:
                continue
            # a sample may end before its siblings
            done = finished or c.finish_reason is not None
            text = self._new_text(c, done)
            start, end = self.sent_tokens[c.index], len(c.token_ids)
            if not text and not done and not (self.want_logprobs and end > start):
                # nothing to show yet (the text is held back):
                # the tokens go in a later chunk
                continue
            self.sent_tokens[c.index], self.done[c.index] = end, done
            choice = {
                "index": c.index,
                "text": text,
                "logprobs": logprobs_body(self.tokenizer, c, start, end)
                if self.want_logprobs
                else None,
                "finish_reason": c.finish_reason if done else None,
            }
            if done:
                choice["stop_reason"] = getattr(c, "stop_reason", None)
            chunk = self._chunk([choice])
            # as vLLM counts it: the prompt and this choice's tokens so far
            if self.continuous_usage:
                prompt = len(output.prompt_token_ids)
                chunk["usage"] = dict(
                    prompt_tokens=prompt,
                    completion_tokens=end,
                    total_tokens=prompt + end,
                )
            chunks.append(chunk)
        return chunks

    def usage_chunk(self, output: RequestOutput) -> dict:
        """The last chunk when stream_options.include_usage: no choices, the usage counts."""
        return {**self._chunk([]), "usage": usage_body(output)}

    def _new_text(self, c: CompletionOutput, finished: bool) -> str:
        text = c.text
        # keep back what may still change: a split character, a stop string's start
        if not finished:
            text = text[: len(text) - self.hold_back] if self.hold_back else text
            text = text.rstrip(REPLACEMENT_CHARACTER)
        sent = self.sent_text[c.index]
        if len(text) <= len(sent):
            return ""
        self.sent_text[c.index] = text
        return text[len(sent) :]

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk
