"""The generated parts of the serving page (docs/experiments/serving.md), from its JSON.

OS idea: one source and derived copies, as in pages.py (the kernel generates /proc from its own
counters). KV counterpart: vLLM paper section 6.2, Fig. 12: the sustained rates (max_rate) and
their ratios that the page puts beside the paper's are computed here from the run's rows.
"""

from __future__ import annotations

from minipaged.experiments.page_tables import table

SYSTEMS = ("vLLM", "Orca (Oracle)", "Orca (Pow2)", "Orca (Max)", "FasterTransformer")


def _ratio(a: float, b: float) -> str:
    return "∞" if b == 0 else f"{a / b:.2f}×"


def _max_rates(rows: list[dict]) -> dict[tuple[str, str], float]:
    return {
        (r["workload"], r["system"]): r["max_rate"] for r in rows if "max_rate" in r
    }


def _latency_table(rows: list[dict], workload: str) -> str:
    points = [r for r in rows if "rate" in r and r["workload"] == workload]
    rates = sorted({r["rate"] for r in points})
    at = {(r["rate"], r["system"]): r["normalized_latency"] for r in points}
    lines = [
        [
            f"{rate:g}",
            *(f"{at[rate, s]:.3f}" if (rate, s) in at else "—" for s in SYSTEMS),
        ]
        for rate in rates
    ]
    return table(["rate (req/s)", *SYSTEMS], lines, "r" * (len(SYSTEMS) + 1))


def serving(data: dict) -> dict[str, str]:
    """Parts: results (max_rate per workload and system), latency-sharegpt, latency-alpaca
    (normalized latency per rate), beside (ratios beside the paper's), goal, setup, threshold."""
    rows, paper, settings = data["rows"], data["paper"], data["settings"]
    best = _max_rates(rows)
    workloads = list(dict.fromkeys(w for w, _ in best))
    results = table(
        ["workload", *SYSTEMS],
        [[w, *(f"{best[w, s]:g}" for s in SYSTEMS)] for w in workloads],
        "l" + "r" * len(SYSTEMS),
    )
    theirs = paper["vllm_rate_vs"]
    beside = []
    for w in workloads:
        for other in ("Orca (Oracle)", "Orca (Pow2)", "Orca (Max)"):
            if w == "ShareGPT" and other in theirs:
                low, high = theirs[other]
                said = f"{low}×–{high}×"
            else:
                said = (
                    "smaller than on ShareGPT"
                    if w == "Alpaca" and other != "Orca (Pow2)"
                    else "—"
                )
            beside.append(
                [w, f"vLLM / {other}", said, _ratio(best[w, "vLLM"], best[w, other])]
            )
    for w in workloads:
        said = "up to 22×" if w == "ShareGPT" else "—"
        beside.append(
            [
                w,
                "vLLM / FasterTransformer",
                said,
                _ratio(best[w, "vLLM"], best[w, "FasterTransformer"]),
            ]
        )
    goal = paper["goal"]
    sharegpt = {
        other: best["ShareGPT", "vLLM"] / max(best["ShareGPT", other], 1e-12)
        for other in goal
    }
    met = all(sharegpt[o] >= goal[o] for o in goal)
    goal_text = (
        ("met" if met else "not met")
        + ": "
        + ", ".join(
            f"{_ratio(best['ShareGPT', 'vLLM'], best['ShareGPT', o])} over {o} (goal ≥ {goal[o]}×)"
            for o in goal
        )
    )
    gpus = settings["tensor_parallel_size"]
    return {
        "results": results,
        "latency-sharegpt": _latency_table(rows, "ShareGPT"),
        "latency-alpaca": _latency_table(rows, "Alpaca"),
        "beside": table(
            ["workload", "ratio of max_rate", "the paper (Fig. 12)", "measured here"],
            beside,
            "llrr",
        ),
        "goal": goal_text,
        "setup": (
            f"{settings['model'].upper()} on {gpus} × {settings['gpu']}, "
            f"{settings['kv_slots']:,} KV token slots"
        ),
        "threshold": f"{settings['threshold']:g} s/token",
    }


def serving_measured(data: dict) -> dict[str, str]:
    """Parts of serving-measured.md, from `minipaged experiment serving --measured --json`: points
    (every system at every rate), max-rates (max_rate per system at the measured threshold, and its
    ratio to vLLM's), setup."""
    rows, settings = data["rows"], data["settings"]
    points = [r for r in rows if "rate" in r]
    systems = list(dict.fromkeys(r["system"] for r in points))
    best = {r["system"]: r["max_rate"] for r in rows if "max_rate" in r}
    vllm = next(iter(best.values()))  # the engine on paged blocks is measured first
    lines = [
        [r["system"], f"{r['rate']:g}", f"{1000 * r['normalized_latency']:.1f}", f"{r['throughput']:.1f}",
         f"{r['mean_batch_size']:.1f}"]
        for r in sorted(points, key=lambda r: (systems.index(r["system"]), r["rate"]))
    ]  # fmt: skip
    return {
        "points": table(
            [
                "system",
                "rate (req/s)",
                "normalized latency (ms/token)",
                "throughput (req/s)",
                "mean batch",
            ],
            lines,
            "lrrrr",
        ),
        "max-rates": table(
            ["system", "max_rate (req/s)", "vLLM's over it"],
            [[s, f"{best[s]:g}", _ratio(vllm, best[s])] for s in systems],
            "lrr",
        ),
        "setup": (
            f"{settings['model']} on {settings['device']} ({settings['backend']} backend), a pool of "
            f"{settings['num_gpu_blocks']} blocks of {settings['block_size']} tokens, "
            f"{settings['window_s']:g} s of arrivals a point, threshold "
            f"{1000 * settings['threshold']:g} ms/token"
        ),
    }


__all__ = ["serving", "serving_measured"]
