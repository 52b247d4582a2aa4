"""The generated parts of the decoding page (docs/experiments/decoding.md), from its JSON.

OS idea: one source and derived copies, as in pages.py (the kernel generates /proc from its own
counters). KV counterpart: vLLM paper section 6.3, Fig. 14: the sustained rates (max_rate) of
vLLM and Orca (Oracle) per decoding setting, their ratios beside the paper's, and the batch each
system ran at its sustained rate, computed here from the run's rows.
"""

from __future__ import annotations

from minipaged.experiments.page_tables import table
from minipaged.workloads import ALPACA

SYSTEMS = ("vLLM", "Orca (Oracle)")


def _ratio(a: float, b: float) -> str:
    return "∞" if b == 0 else f"{a / b:.2f}×"


def _width(workload: str) -> int:
    """The n or width of a setting: 'parallel n=4' -> 4, 'beam width=6' -> 6."""
    return int(workload.rpartition("=")[2])


def _max_rates(rows: list[dict]) -> dict[tuple[str, str], float]:
    return {
        (r["workload"], r["system"]): r["max_rate"] for r in rows if "max_rate" in r
    }


def _latency_table(rows: list[dict], kind: str) -> str:
    """Normalized latency per rate, one column per (setting of `kind`, system); — where not run."""
    points = [r for r in rows if "rate" in r and r["workload"].startswith(kind)]
    workloads = list(dict.fromkeys(r["workload"] for r in points))
    rates = sorted({r["rate"] for r in points})
    at = {
        (r["rate"], r["workload"], r["system"]): r["normalized_latency"] for r in points
    }
    header = [
        "rate (req/s)",
        *(f"{w.partition(' ')[2]} {s.split()[0]}" for w in workloads for s in SYSTEMS),
    ]
    lines = [
        [f"{rate:g}", *(f"{at[key]:.3f}" if (key := (rate, w, s)) in at else "—"
                        for w in workloads for s in SYSTEMS)]
        for rate in rates
    ]  # fmt: skip
    return table(header, lines, "r" * len(header))


def _batches(
    rows: list[dict], best: dict[tuple[str, str], float]
) -> dict[tuple[str, str], float]:
    """Each (workload, system)'s mean batch, in requests, at its max_rate (absent if max_rate is 0)."""
    at = {
        (r["workload"], r["system"], r["rate"]): r["mean_batch_size"]
        for r in rows
        if "rate" in r
    }
    return {key: at[(*key, rate)] for key, rate in best.items() if (*key, rate) in at}


def _batch_table(batches: dict[tuple[str, str], float]) -> str:
    """Each system's mean batch at its max_rate: requests, and sequences (requests x width)."""
    lines = []
    for w in dict.fromkeys(w for w, _ in batches):
        cells = [w]
        for s in SYSTEMS:
            batch = batches.get((w, s))
            cells += (
                ["—", "—"]
                if batch is None
                else [f"{batch:.1f}", f"{batch * _width(w):.0f}"]
            )
        lines.append(cells)
    header = [
        "setting",
        *(f"{s} {unit}" for s in SYSTEMS for unit in ("requests", "sequences")),
    ]
    return table(header, lines, "l" + "r" * 4)


def _seqs_range(batches: dict[tuple[str, str], float], system: str) -> str:
    seqs = [b * _width(w) for (w, s), b in batches.items() if s == system]
    return f"{min(seqs):.0f}–{max(seqs):.0f}" if seqs else "—"


def _versus(ours: float, theirs: float) -> str:
    """'32% lower' / '43% higher' / 'the same': ours against the paper's."""
    change = round(100 * (ours / theirs - 1))
    return (
        "the same"
        if change == 0
        else f"{abs(change)}% {'higher' if change > 0 else 'lower'}"
    )


def decoding(data: dict) -> dict[str, str]:
    """Parts: results (max_rate per setting and system, and their ratio), latency-parallel and
    latency-beam (normalized latency per rate), batch (the batch at each max_rate) and seqs (its
    range in sequences), beside (the ratios beside the paper's), trend (the ratios in a sentence),
    versus (ours against the paper's two numbers), demand (the tokens/s of vLLM's max_rate at
    n = 2), setup, threshold, window."""
    rows, paper, settings = data["rows"], data["paper"], data["settings"]
    best = _max_rates(rows)
    workloads = list(dict.fromkeys(w for w, _ in best))
    ratio = {w: _ratio(best[w, "vLLM"], best[w, "Orca (Oracle)"]) for w in workloads}
    value = {
        w: best[w, "vLLM"] / max(best[w, "Orca (Oracle)"], 1e-12) for w in workloads
    }
    batches = _batches(rows, best)
    results = table(
        ["setting", *SYSTEMS, "vLLM / Orca (Oracle)"],
        [[w, *(f"{best[w, s]:g}" for s in SYSTEMS), ratio[w]] for w in workloads],
        "lrrr",
    )
    theirs = paper["vllm_rate_vs_orca_oracle"]
    beside = [
        [
            "basic sampling (n=1, Fig. 12)",
            f"{theirs['basic sampling']}×",
            "the serving experiment",
        ]
    ]
    for w in workloads:
        if w in theirs:
            said = f"{theirs[w]}×"
        else:
            said = "grows with n" if w.startswith("parallel") else "grows with width"
        beside.append([w, said, ratio[w]])
    trend = "; ".join(
        ", ".join(f"{ratio[w]} at {w.partition(' ')[2].replace('=', ' = ')}" for w in workloads
                  if w.startswith(kind))
        for kind in ("parallel", "beam")
    )  # fmt: skip
    windows = sorted(set(settings["window_s"].values()))
    first, widest = "parallel n=2", "beam width=6"
    versus = (
        f"at beam width 6, {ratio[widest]} against the paper's {theirs[widest]}× "
        f"({_versus(value[widest], theirs[widest])}); at n = 2, {ratio[first]}, "
        f"{_versus(value[first], theirs['basic sampling'])} than the paper's {theirs['basic sampling']}× "
        "for one sample per request"
    )
    return {
        "results": results,
        "latency-parallel": _latency_table(rows, "parallel"),
        "latency-beam": _latency_table(rows, "beam"),
        "batch": _batch_table(batches),
        "seqs": (
            f"Orca (Oracle) runs {_seqs_range(batches, 'Orca (Oracle)')} sequences at its max_rate "
            f"whatever the width, vLLM {_seqs_range(batches, 'vLLM')}"
        ),
        "versus": versus,
        "demand": (  # the decode tokens/s that vLLM's max_rate at n = 2 asks for
            f"{best[first, 'vLLM']:g} × 2 × {ALPACA.mean_output_len} ≈ "
            f"{round(best[first, 'vLLM'] * 2 * ALPACA.mean_output_len, -2):,.0f} tokens/s"
        ),
        "beside": table(
            ["decoding", "the paper (vLLM / Orca (Oracle))", "measured here"],
            beside,
            "lrr",
        ),
        "trend": trend,
        "setup": (
            f"{settings['model'].upper()} on {settings['tensor_parallel_size']} × {settings['gpu']}, "
            f"{settings['kv_slots']:,} KV token slots"
        ),
        "threshold": f"{settings['threshold']:g} s/token",
        "window": " and ".join(f"{w:g} s" for w in windows),
    }


__all__ = ["decoding"]
