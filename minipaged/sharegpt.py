"""Real workloads: the request lengths of a ShareGPT JSON file on disk.

OS idea: trace-driven simulation. Synthetic traces are only as good as the distributions they are drawn
from, so allocators and page-replacement policies are also measured on traces recorded from real
programs, replayed as they were (OSTEP ch. 22, whose homework replays recorded reference traces).
KV counterpart: vLLM paper section 6.1: the paper tokenizes ShareGPT's conversations and replays their
real prompt and output lengths; vLLM's benchmark_serving.py reads the same JSON. None is shipped with
minipaged; minipaged.workloads synthesizes look-alikes, and this module reads a real file when there
is one, into the same Workload of lengths.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

from minipaged.workloads import (
    Request,
    Workload,
    _check,
    _check_int,
    _stream,
    poisson_arrivals,
)


def _sharegpt_pairs(
    data: Any, path: Path, first_turn_only: bool
) -> list[tuple[str, str]]:
    """(prompt, output) texts: each human turn followed directly by a gpt turn."""
    shape = 'a JSON list of {"conversations": [{"from": "human" | "gpt", "value": str}, ...]}'
    _check(
        isinstance(data, list),
        f"path {str(path)!r} must hold {shape}, got a {type(data).__name__}",
    )
    pairs = []
    for k, item in enumerate(data):
        turns = item.get("conversations") if isinstance(item, dict) else None
        ok = isinstance(turns, list) and all(
            isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns
        )
        _check(ok, f"path {str(path)!r} must hold {shape}; entry {k} does not")
        pairs_of = itertools.pairwise(turns)
        found = [
            (a["value"], b["value"])
            for a, b in pairs_of
            if (a.get("from"), b.get("from")) == ("human", "gpt")
        ]
        pairs += found[:1] if first_turn_only else found
    return pairs


def load_sharegpt(
    path: str | Path,
    num_requests: int | None = None,
    tokenizer: Any = None,
    seed: int = 0,
    max_model_len: int = 2048,
    rate: float = math.inf,
    first_turn_only: bool = False,
) -> Workload:
    """Requests with the lengths of real ShareGPT conversations, read from a local JSON file.

    Each human turn followed by a gpt turn is one (prompt, output) pair; vLLM's benchmark_serving keeps
    only the first pair of a conversation (`first_turn_only=True`). A length is
    `len(tokenizer.encode(text))`, or the whitespace-separated word count without a tokenizer. Pairs
    with an empty side or longer than `max_model_len` in all are dropped. The texts are not kept: the
    requests carry lengths, like the synthetic ones.

    Args:
        path: a JSON list of `{"id": str, "conversations": [{"from": "human"|"gpt", "value": str}]}`.
        num_requests: pairs to sample without replacement (None: all of them, in file order).
        tokenizer: anything with `encode(str) -> list[int]`, e.g. `minipaged.presets.ByteTokenizer()`.
        seed: picks the sample and the arrival times.
        max_model_len: the longest prompt plus output kept.
        rate: Poisson arrival rate in requests/second (inf: all at time 0).
        first_turn_only: one pair per conversation, as vLLM's benchmark.

    Raises:
        ValueError: naming the argument: a missing file, JSON of the wrong shape, no usable pairs, or
            more requests than usable pairs.
    """
    path = Path(path)
    _check(
        path.is_file(),
        f"path {str(path)!r} is not a file (download a ShareGPT JSON first)",
    )
    encode = getattr(tokenizer, "encode", None)
    _check(
        tokenizer is None or callable(encode),
        f"tokenizer must have encode(str) -> list[int], got {tokenizer!r}",
    )
    _check_int("num_requests", 1 if num_requests is None else num_requests, 1)
    _check_int("max_model_len", max_model_len, 2)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"path {str(path)!r} is not UTF-8 JSON: {err}") from err
    count = (
        (lambda text: len(text.split()))
        if encode is None
        else (lambda text: len(encode(text)))
    )
    lens = [
        (count(p), count(o)) for p, o in _sharegpt_pairs(data, path, first_turn_only)
    ]
    lens = [(p, o) for p, o in lens if p >= 1 and o >= 1 and p + o <= max_model_len]
    _check(
        bool(lens),
        f"path {str(path)!r} has no usable pairs (non-empty, <= max_model_len={max_model_len})",
    )
    if num_requests is not None:
        _check(
            num_requests <= len(lens),
            f"num_requests must be <= {len(lens)} usable pairs, got {num_requests}",
        )
        lens = [
            lens[i]
            for i in _stream(seed, 3).choice(len(lens), num_requests, replace=False)
        ]
    arrivals = poisson_arrivals(len(lens), rate, seed)
    requests = tuple(
        Request(f"sharegpt-{i}", arrivals[i], p, o) for i, (p, o) in enumerate(lens)
    )
    return Workload(
        "sharegpt",
        requests,
        dict(path=str(path), rate=rate, seed=seed, max_model_len=max_model_len),
    )


__all__ = ["load_sharegpt"]
