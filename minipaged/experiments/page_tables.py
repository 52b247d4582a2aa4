"""The memory experiments' docs tables and quoted numbers, rendered from their JSON (see pages.py).

OS idea: one source, derived copies (pages.py). KV counterpart: the tables beside the vLLM paper's
Figs. 2 and 13a on docs/experiments/memory-waste.md and batch-size.md, and every number their prose
quotes from a run; with the helpers the other renderers share. The sharing pages' renderers are in
page_tables_sharing.py, the timed experiments' in page_tables_timed.py.

Each renderer takes the JSON of one run ({"experiment", "rows", "paper"}) and returns the page's parts,
{key: text}: a table, or a number as the sentence quotes it. A number the prose derives (a ratio, a
difference from the paper) is derived here, so that it moves with the run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from minipaged.experiments.serving import ALLOCATORS, LABELS, PAPER_LABELS

# A prefill token of a 13B model costs about 2 x 13e9 = 26 GFLOP; at half an A100's 312 TFLOP/s,
# about 0.17 ms. Only to size what the null model leaves out (its steps cost 40 ms whatever they do).
PREFILL_S_PER_TOKEN = 2 * 13e9 / (0.5 * 312e12)


def pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def points(measured: float, paper: float) -> str:
    """The difference of two percentages, in points: '+5.0 points'."""
    return f"{measured - paper:+.1f} points".replace("-", "−")


def num(n: float, digits: int = 0) -> str:
    return f"{n:,.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A markdown table; `align` has one letter per column: l(eft) or r(ight)."""
    rule = ["---" if a == "l" else "---:" for a in align]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *rows])


def _by(rows: list[dict], **where) -> dict[str, dict]:
    """The rows that match `where`, by allocator."""
    return {r["allocator"]: r for r in rows if all(r[k] == v for k, v in where.items())}


def _recompute_seconds(tokens: int) -> float:
    return tokens * PREFILL_S_PER_TOKEN


def memory_waste(data: dict) -> dict[str, str]:
    by, paper = _by(data["rows"]), data["paper"]["token_states_percent"]
    window = by["paged"]["window_s"]
    names = {"vattention": "vAttention (204-token pages)", "paged": "**vLLM (paged, block 16)**"}
    results = []
    for a in ALLOCATORS:
        r, theirs = by[a], paper.get(PAPER_LABELS.get(a, LABELS[a]))
        cells = [
            pct(r[k]) for k in ("reserved", "internal_fragmentation", "external_fragmentation", "stranded")
        ]
        theirs = "—" if theirs is None else f"{theirs}%"
        name, tokens, batch = (
            names.get(a, LABELS[a]),
            f"**{pct(r['token_states'])}**",
            f"{r['mean_batch_size']:.2f}",
        )
        results.append([name, tokens, *cells, theirs, batch])
    recompute = []
    for a in ALLOCATORS:
        r = by[a]
        fresh = r["prefill_tokens"] - r["recomputed_tokens"]
        seconds = _recompute_seconds(r["recomputed_tokens"])
        time = f"{seconds:.0f} s ({pct(seconds / window)})"
        recompute.append(
            [names.get(a, LABELS[a]), num(r["preemptions"]), num(fresh), num(r["recomputed_tokens"]), time]
        )
    beside = []
    for a in ("orca-max", "orca-pow2", "orca-oracle", "paged"):
        theirs, ours = paper[PAPER_LABELS.get(a, LABELS[a])], by[a]["token_states"]
        beside.append([LABELS[a], f"{theirs}%", pct(ours), points(100 * ours, theirs)])
    paged, vatt = by["paged"], by["vattention"]
    return {
        "results": table(
            [
                "allocator",
                "token states",
                "reserved",
                "internal frag.",
                "external frag.",
                "stranded",
                "paper: token states",
                "mean batch",
            ],
            results,
            "lrrrrrrr",
        ),
        "recompute": table(
            [
                "allocator",
                "preemptions",
                "prompt tokens computed once",
                "tokens recomputed",
                "their time at 0.17 ms a token",
            ],
            recompute,
            "lrrrr",
        ),
        "beside": table(["", "the paper (Fig. 2)", "measured here", "difference"], beside, "lrrr"),
        "window": num(window),
        "paged": pct(paged["token_states"]),
        "paged-stranded": pct(paged["stranded"]),
        "paged-internal": pct(paged["internal_fragmentation"]),
        "paged-pool": pct(paged["pool_token_states"]),
        "paged-pool-internal": pct(paged["pool_internal_fragmentation"]),
        "paged-pool-stranded": pct(paged["pool_stranded"]),
        "paged-pool-free": pct(paged["pool_free"]),
        "paged-waiting": f"{paged['mean_waiting']:.0f}",
        "paged-gap": points(100 * paged["token_states"], paper["vLLM"]),
        "paged-waste": pct(1 - paged["token_states"]),
        "max-stranded": pct(by["orca-max"]["stranded"]),
        "max-gap": points(100 * by["orca-max"]["token_states"], paper["Orca (Max)"]),
        "oracle-internal": pct(by["orca-oracle"]["internal_fragmentation"]),
        "oracle-external": pct(by["orca-oracle"]["external_fragmentation"]),
        "pow2-external": pct(by["orca-pow2"]["external_fragmentation"]),
        "vattention-internal": pct(vatt["internal_fragmentation"]),
        "paged-recomputed": num(paged["recomputed_tokens"]),
        "paged-fresh": num(paged["prefill_tokens"] - paged["recomputed_tokens"]),
        "paged-preemptions": num(paged["preemptions"]),
    }


def batch_size(data: dict) -> dict[str, str]:
    rows, paper = data["rows"], data["paper"]
    rates = sorted({r["rate"] for r in rows})
    header = ["rate (req/s)", *(LABELS[a] for a in ALLOCATORS)]

    def grid(key: str, fmt: Callable[[float], str]) -> str:
        lines = []
        for rate in rates:
            at = _by(rows, rate=rate)
            cells = [f"{rate:g}", *(fmt(at[a][key]) for a in ALLOCATORS)]
            lines.append([f"**{c}**" for c in cells] if rate == 2.0 else cells)
        return table(header, lines, "r" * len(header))

    recompute = []
    for rate in rates:
        at = _by(rows, rate=rate)
        cells = [f"{rate:g}"]
        for a in ("vattention", "paged"):
            r = at[a]
            share = r["recomputed_tokens"] / r["prefill_tokens"]
            cells += [num(r["preemptions"]), f"{num(r['recomputed_tokens'])} ({pct(share, 0)})"]
        recompute.append(cells)
    two, top = _by(rows, rate=2.0), _by(rows, rate=max(rates))
    batch_paper = paper["mean_batch_size"]
    beside = []
    for a in ("orca-max", "orca-pow2", "orca-oracle", "paged"):
        theirs, ours = batch_paper[PAPER_LABELS.get(a, LABELS[a])], two[a]["mean_batch_size"]
        diff = "0" if round(ours, 2) == theirs else f"{100 * (ours / theirs - 1):+.1f}%".replace("-", "−")
        beside.append([LABELS[a].replace(" (paged)", ""), f"{theirs:.2f}", f"{ours:.2f}", diff])
    for a, theirs in paper["vllm_batch_vs"].items():
        key = "orca-oracle" if "Oracle" in a else "orca-max"
        ratio = two["paged"]["mean_batch_size"] / two[key]["mean_batch_size"]
        beside.append([f"vLLM / {a}", f"{theirs}×", f"{ratio:.2f}×", ""])
    paged1 = _by(rows, rate=1.0)["paged"]
    little = round(1.0 * 337.99 * 0.04, 1)  # rate x mean output x step time, as the exercise rounds it: 13.5
    saturated = {
        key: top["paged"]["throughput_rps"] / top[key]["throughput_rps"]
        for key in ("orca-oracle", "orca-max")
    }
    return {
        "batch": grid("mean_batch_size", lambda v: f"{v:.2f}"),
        "throughput": grid("throughput_rps", lambda v: f"{v:.2f}"),
        "recompute": table(
            [
                "rate (req/s)",
                "vAttention preemptions",
                "vAttention tokens recomputed (share of prefill)",
                "vLLM preemptions",
                "vLLM tokens recomputed (share of prefill)",
            ],
            recompute,
            "rrrrr",
        ),
        "beside": table(
            ["at 2 requests/s", "the paper (Fig. 13a)", "measured here", "difference"], beside, "lrrr"
        ),
        "top-rate": f"{max(rates):g}",
        "paged-2": f"{two['paged']['mean_batch_size']:.2f}",
        "paged-top": f"{top['paged']['mean_batch_size']:.2f}",
        "paged-gap": f"{100 * (1 - two['paged']['mean_batch_size'] / batch_paper['vLLM']):.0f}%",
        "pow2-gap": f"{100 * (two['orca-pow2']['mean_batch_size'] / batch_paper['Orca (Pow2)'] - 1):.1f}%",
        "oracle-ratio": f"{saturated['orca-oracle']:.2f}× "
        f"({top['paged']['throughput_rps']:.2f} / {top['orca-oracle']['throughput_rps']:.2f} requests/s)",
        "max-ratio": f"{saturated['orca-max']:.2f}× "
        f"({top['paged']['throughput_rps']:.2f} / {top['orca-max']['throughput_rps']:.2f})",
        "vattention-share": pct(top["vattention"]["mean_batch_size"] / top["paged"]["mean_batch_size"], 0),
        "paged-1": f"{paged1['mean_batch_size']:.2f}",
        "little-1": f"{(round(paged1['mean_batch_size'], 2) / little - 1) * 100:.1f}%",  # as shown
        "paged-recomputed-2": num(two["paged"]["recomputed_tokens"]),
        "paged-fresh-2": num(two["paged"]["prefill_tokens"] - two["paged"]["recomputed_tokens"]),
        "paged-recompute-time-2": f"{_recompute_seconds(two['paged']['recomputed_tokens']):.0f} s "
        f"({pct(_recompute_seconds(two['paged']['recomputed_tokens']) / two['paged']['window_s'])})",
        "vattention-recompute-time-2": pct(
            _recompute_seconds(two["vattention"]["recomputed_tokens"]) / two["vattention"]["window_s"]
        ),
    }


__all__ = [
    "PREFILL_S_PER_TOKEN",
    "batch_size",
    "memory_waste",
    "num",
    "pct",
    "points",
    "table",
]
