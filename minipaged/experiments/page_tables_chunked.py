"""The generated parts of the chunked-prefill page (docs/experiments/chunked-prefill.md), from its JSON.

OS idea: one source and derived copies, as in pages.py (the kernel generates /proc from its own
counters). KV counterpart: the table of every (rate, budget) point of the chunked-prefill experiment,
and each number its prose quotes, named `RATE-BUDGET-KEY` ("8-128-itl_p99"; BUDGET "whole" for the
run without chunking), so that a new run rewrites the sentences too.
"""

from __future__ import annotations

from minipaged.experiments.page_tables import table

# (rate, budget or None for no chunking, key): the numbers the page's prose quotes
QUOTES = (
    (4.0, None, "itl_max"),
    (4.0, 128, "itl_max"),
    (4.0, None, "tpot_mean"),
    (4.0, 128, "tpot_mean"),
    (4.0, None, "ttft_long"),
    (4.0, 128, "ttft_long"),
    (4.0, 64, "ttft_long"),
    (4.0, None, "itl_p99"),
    (4.0, 1024, "itl_p99"),
    (8.0, None, "itl_p99"),
    (8.0, 128, "itl_p99"),
    (8.0, None, "tpot_mean"),
    (8.0, 128, "tpot_mean"),
    (8.0, None, "ttft_long"),
    (8.0, 128, "ttft_long"),
    (8.0, None, "ttft_mean"),
    (8.0, 256, "ttft_mean"),
    (8.0, 256, "ttft_long"),
    (8.0, 256, "itl_p99"),
    (8.0, 64, "throughput"),
    (8.0, 64, "ttft_mean"),
    (10.0, None, "throughput"),
    (10.0, None, "preemptions"),
    (10.0, None, "ttft_mean"),
    (10.0, 128, "throughput"),
    (10.0, 128, "preemptions"),
    (10.0, 128, "ttft_mean"),
)


def seconds(value: float) -> str:
    """A time as the page writes it: seconds from 1 s up, else milliseconds."""
    if value >= 1:
        return f"{value:.1f} s"
    return f"{1e3 * value:.1f} ms" if value < 0.1 else f"{1e3 * value:.0f} ms"


def _quote(key: str, value: float) -> str:
    if key == "throughput":
        return f"{value:.2f} requests/s"
    return str(value) if key == "preemptions" else seconds(value)


def _row(rows: list[dict], rate: float, budget: int | None) -> dict:
    return next(
        r
        for r in rows
        if r["rate"] == rate
        and r["chunking"] == (budget is not None)
        and (budget is None or r["budget"] == budget)
    )


def chunked_prefill(data: dict) -> dict[str, str]:
    """Parts: results (every row), the QUOTES, gain-8 (how many times shorter the p99 wait for a
    token is with a budget of 128 at 8 requests/s), gain-10 (the throughput gained with a budget of
    128 at 10 requests/s), 8-under-50ms (the largest budget whose p99 wait at 8 requests/s is under
    50 ms), kv-slots (the pool) and the paper's capacity figures."""
    rows = data["rows"]
    ordered = sorted(rows, key=lambda r: (r["rate"], r["chunking"], r["budget"]))
    header = ["rate (req/s)", "chunking", "budget", "TTFT mean", "TTFT p99", "TTFT, long",
              "TPOT mean", "TPOT p99", "wait p99", "longest wait", "served (req/s)",
              "preemptions", "batch"]  # fmt: skip
    lines = [
        [f"{r['rate']:g}", "yes" if r["chunking"] else "no", str(r["budget"]),
         *(seconds(r[k]) for k in ("ttft_mean", "ttft_p99", "ttft_long", "tpot_mean",
                                   "tpot_p99", "itl_p99", "itl_max")),
         f"{r['throughput']:.2f}", str(r["preemptions"]), f"{r['mean_batch_size']:.1f}"]
        for r in ordered
    ]  # fmt: skip
    parts = {"results": table(header, lines, "rlr" + "r" * 10)}
    for rate, budget, key in QUOTES:
        name = f"{rate:g}-{budget or 'whole'}-{key}"
        parts[name] = _quote(key, _row(rows, rate, budget)[key])
    whole, chunked = _row(rows, 8.0, None), _row(rows, 8.0, 128)
    parts["gain-8"] = f"{whole['itl_p99'] / chunked['itl_p99']:.1f}"
    whole, chunked = _row(rows, 10.0, None), _row(rows, 10.0, 128)
    parts["gain-10"] = f"{100 * (chunked['throughput'] / whole['throughput'] - 1):.0f}%"
    steady = [r["budget"] for r in rows if r["rate"] == 8.0 and r["chunking"]]
    steady = [b for b in steady if _row(rows, 8.0, b)["itl_p99"] < 0.05]
    parts["8-under-50ms"] = f"{max(steady):,}" if steady else "none"
    parts["kv-slots"] = f"{data['settings']['kv_slots']:,}"
    for setup, gain in data["paper"]["capacity_vs_vllm"].items():
        parts[f"paper-{setup.split(',')[0].lower()}"] = f"{gain:g}×"
    return parts


__all__ = ["QUOTES", "chunked_prefill", "seconds"]
