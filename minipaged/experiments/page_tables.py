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

from minipaged.experiments.memory_waste import ORCA_GOAL_POINTS as GOAL_POINTS
from minipaged.experiments.serving import (
    ALLOCATORS,
    COST_MODEL,
    KV_SLOTS,
    LABELS,
    PAPER_LABELS,
)
from minipaged.workloads import SHAREGPT

# What the cost model charges for one more prompt token once a step is compute-bound: 2 FLOP a
# parameter at its efficiency (OPT-13B: 2 x 12.8e9 / (0.7 x 312e12) = 0.12 ms). Below about 175
# tokens a step, reading the weights dominates and a token costs less: so this is an upper bound.
PREFILL_S_PER_TOKEN = 2 * COST_MODEL.model.num_parameters / COST_MODEL.flops_per_s
ORCA = ("orca-max", "orca-pow2", "orca-oracle")


def pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def points(measured: float, paper: float, digits: int = 1) -> str:
    """The difference of two percentages, in points: '+5.0 points'."""
    return f"{measured - paper:+.{digits}f} points".replace("-", "−")


def num(n: float, digits: int = 0) -> str:
    return f"{n:,.{digits}f}"


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f} ms"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A markdown table; `align` has one letter per column: l(eft) or r(ight)."""
    rule = ["---" if a == "l" else "---:" for a in align]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *rows])


def _by(rows: list[dict], **where) -> dict[str, dict]:
    """The rows that match `where`, by allocator."""
    return {r["allocator"]: r for r in rows if all(r[k] == v for k, v in where.items())}


def _recompute_seconds(tokens: int) -> float:
    return tokens * PREFILL_S_PER_TOKEN


def _little(rate: float, step_s: float) -> float:
    """Little's law for a system that keeps up: rate x (mean output x mean step) requests in it."""
    return rate * SHAREGPT.mean_output_len * step_s


def _little_text(rate: float, step_s: float) -> str:
    return f"{rate:g} × {SHAREGPT.mean_output_len:.0f} × {ms(step_s)} = {_little(rate, step_s):.1f}"


def _goal(ours: float, theirs: float) -> str:
    """'yes' if within GOAL_POINTS of the paper's share, else 'no, by N points'."""
    off = abs(ours - theirs) - GOAL_POINTS
    return "yes" if off <= 0 else f"no, by {off:.2f} points"


def memory_waste(data: dict) -> dict[str, str]:
    by, paper = _by(data["rows"]), data["paper"]["token_states_percent"]
    paper_batch = data["paper"]["mean_batch_size"]
    window = by["paged"]["window_s"]
    names = {
        "vattention": "vAttention (204-token pages)",
        "paged": "**vLLM (paged, block 16)**",
    }
    results = []
    for a in ALLOCATORS:
        r, theirs = by[a], paper.get(PAPER_LABELS.get(a, LABELS[a]))
        cells = [
            pct(r[k])
            for k in (
                "reserved",
                "internal_fragmentation",
                "external_fragmentation",
                "stranded",
            )
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
            [
                names.get(a, LABELS[a]),
                num(r["preemptions"]),
                num(fresh),
                num(r["recomputed_tokens"]),
                time,
            ]
        )
    beside, within = [], []
    for a in (*ORCA, "paged"):
        theirs, ours = paper[PAPER_LABELS.get(a, LABELS[a])], by[a]["token_states"]
        goal = (
            _goal(100 * ours, theirs)
            if a in ORCA
            else ("yes (≥ 96%)" if ours >= 0.96 else "no (< 96%)")
        )
        beside.append(
            [LABELS[a], f"{theirs}%", pct(ours), points(100 * ours, theirs, 2), goal]
        )
        if a in ORCA and goal == "yes":
            within.append(a)
    misses = [
        f"{LABELS[a]} misses by {abs(100 * by[a]['token_states'] - paper[LABELS[a]]) - GOAL_POINTS:.2f}"
        for a in ORCA
        if a not in within
    ]
    # tokens a running request holds:
    # token share x the pool / batch (Orca's pools are full)
    held = []
    for a in ORCA:
        r, label = by[a], LABELS[a]
        theirs = paper[label] / 100 * KV_SLOTS / paper_batch[label]
        ours = r["pool_token_states"] * r["kv_slots"] / r["mean_batch_size"]
        implied = f"{paper[label]}% × {num(KV_SLOTS)} / {paper_batch[label]:.2f} = {theirs:.0f}"
        diff = f"{100 * (ours / theirs - 1):+.0f}%".replace("-", "−")
        held.append([label, implied, f"{ours:.0f}", diff])
    oracle, paged, vatt = by["orca-oracle"], by["paged"], by["vattention"]
    oracle_held = sum(
        oracle[k] for k in ("token_states", "reserved", "internal_fragmentation")
    )
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
                f"their compute, at most {1e3 * PREFILL_S_PER_TOKEN:.2f} ms a token",
            ],
            recompute,
            "lrrrr",
        ),
        "beside": table(
            [
                "",
                "the paper (Fig. 2)",
                "measured here",
                "difference",
                f"within {GOAL_POINTS:g} points?",
            ],
            beside,
            "lrrrl",
        ),
        "held": table(
            [
                "",
                "the paper: token share × pool / batch (Fig. 13a)",
                "measured here",
                "difference",
            ],
            held,
            "lrrr",
        ),
        "orca-goal": f"{len(within)} of the 3"
        + (f" ({'; '.join(misses)} points)" if misses else ""),
        "window": num(window),
        "paged": pct(paged["token_states"]),
        "paged-stranded": pct(paged["stranded"]),
        "paged-internal": pct(paged["internal_fragmentation"]),
        "paged-pool": pct(paged["pool_token_states"]),
        "paged-pool-internal": pct(paged["pool_internal_fragmentation"]),
        "paged-pool-stranded": pct(paged["pool_stranded"]),
        "paged-pool-free": pct(paged["pool_free"]),
        "paged-waiting": f"{paged['mean_waiting']:.0f}",
        "paged-batch": f"{paged['mean_batch_size']:.2f}",
        "paged-step": ms(paged["mean_step_s"]),
        "paged-little": _little_text(paged["rate"], paged["mean_step_s"]),
        "paper-step": ms(
            paper_batch["vLLM"] / (paged["rate"] * SHAREGPT.mean_output_len)
        ),
        "orca-batch-range": " to ".join(
            f"{by[a]['mean_batch_size']:.2f}" for a in ("orca-max", "orca-oracle")
        ),
        "orca-waiting-range": " to ".join(
            f"{f(by[a]['mean_waiting'] for a in ORCA):.0f}" for f in (min, max)
        ),
        "paged-gap": points(100 * paged["token_states"], paper["vLLM"]),
        "paged-waste": pct(1 - paged["token_states"]),
        "max-stranded": pct(by["orca-max"]["stranded"]),
        "oracle-internal": pct(oracle["internal_fragmentation"]),
        "oracle-rounding": pct(oracle["internal_fragmentation"] / oracle_held),
        "oracle-external": pct(oracle["external_fragmentation"]),
        "pow2-external": pct(by["orca-pow2"]["external_fragmentation"]),
        "vattention-internal": pct(vatt["internal_fragmentation"]),
        "paged-recomputed": num(paged["recomputed_tokens"]),
        "paged-fresh": num(paged["prefill_tokens"] - paged["recomputed_tokens"]),
        "paged-preemptions": num(paged["preemptions"]),
        "paged-recompute-time": f"{_recompute_seconds(paged['recomputed_tokens']):.0f} s "
        f"({pct(_recompute_seconds(paged['recomputed_tokens']) / window)})",
    }


def _keeps_up(rows: list[dict], allocator: str) -> str:
    """The highest rate at which `allocator` finishes at least 95% of the offered requests/s."""
    kept = [
        r["rate"]
        for r in rows
        if r["allocator"] == allocator and r["throughput_rps"] >= 0.95 * r["rate"]
    ]
    return f"{max(kept):g}" if kept else "none"


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
            cells += [
                num(r["preemptions"]),
                f"{num(r['recomputed_tokens'])} ({pct(share, 0)})",
            ]
        recompute.append(cells)
    two, top = _by(rows, rate=2.0), _by(rows, rate=max(rates))
    batch_paper = paper["mean_batch_size"]
    beside = []
    for a in (*ORCA, "paged"):
        theirs, ours = (
            batch_paper[PAPER_LABELS.get(a, LABELS[a])],
            two[a]["mean_batch_size"],
        )
        diff = (
            "0"
            if round(ours, 2) == theirs
            else f"{100 * (ours / theirs - 1):+.1f}%".replace("-", "−")
        )
        beside.append(
            [LABELS[a].replace(" (paged)", ""), f"{theirs:.2f}", f"{ours:.2f}", diff]
        )
    for a, theirs in paper["vllm_batch_vs"].items():
        key = "orca-oracle" if "Oracle" in a else "orca-max"
        ratio = two["paged"]["mean_batch_size"] / two[key]["mean_batch_size"]
        beside.append([f"vLLM / {a}", f"{theirs}×", f"{ratio:.2f}×", ""])
    paged1 = _by(rows, rate=1.0)["paged"]
    # as the exercise rounds it
    predicted1 = round(_little(1.0, paged1["mean_step_s"]), 2)
    saturated = {
        key: top["paged"]["throughput_rps"] / top[key]["throughput_rps"]
        for key in ("orca-oracle", "orca-max")
    }

    def gap(a: str) -> str:  # ours against the paper's, signed
        ours, theirs = two[a]["mean_batch_size"], batch_paper[LABELS[a]]
        return f"{100 * (ours / theirs - 1):+.1f}%".replace("-", "−")

    return {
        "batch": grid("mean_batch_size", lambda v: f"{v:.2f}"),
        "throughput": grid("throughput_rps", lambda v: f"{v:.2f}"),
        "step": grid("mean_step_s", lambda v: f"{1e3 * v:.1f}"),
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
            ["at 2 requests/s", "the paper (Fig. 13a)", "measured here", "difference"],
            beside,
            "lrrr",
        ),
        "keeps-up": ", ".join(f"{LABELS[a]} {_keeps_up(rows, a)}" for a in ALLOCATORS),
        "top-rate": f"{max(rates):g}",
        "paged-2": f"{two['paged']['mean_batch_size']:.2f}",
        "paged-waiting-2": f"{two['paged']['mean_waiting']:.0f}",
        "paged-step-2": ms(two["paged"]["mean_step_s"]),
        "little-2": _little_text(2.0, two["paged"]["mean_step_s"]),
        "paper-step": ms(batch_paper["vLLM"] / (2.0 * SHAREGPT.mean_output_len)),
        "paged-top": f"{top['paged']['mean_batch_size']:.2f}",
        "paged-top-step": ms(top["paged"]["mean_step_s"]),
        "paged-gap": f"{100 * (1 - two['paged']['mean_batch_size'] / batch_paper['vLLM']):.0f}%",
        "pow2-gap": gap("orca-pow2"),
        "oracle-gap": gap("orca-oracle"),
        "oracle-ratio": f"{saturated['orca-oracle']:.2f}× "
        f"({top['paged']['throughput_rps']:.2f} / {top['orca-oracle']['throughput_rps']:.2f} requests/s)",
        "max-ratio": f"{saturated['orca-max']:.2f}× "
        f"({top['paged']['throughput_rps']:.2f} / {top['orca-max']['throughput_rps']:.2f})",
        "vattention-share": pct(
            top["vattention"]["mean_batch_size"] / top["paged"]["mean_batch_size"], 0
        ),
        "paged-1": f"{paged1['mean_batch_size']:.2f}",
        "step-1": ms(paged1["mean_step_s"]),
        "step-1-s": f"{paged1['mean_step_s']:.4f}",
        "little-pred-1": f"{predicted1:.2f}",
        "little-1": f"{(round(paged1['mean_batch_size'], 2) / predicted1 - 1) * 100:+.1f}%".replace(
            "-", "−"
        ),
        "paged-recomputed-2": num(two["paged"]["recomputed_tokens"]),
        "paged-fresh-2": num(
            two["paged"]["prefill_tokens"] - two["paged"]["recomputed_tokens"]
        ),
        "paged-recompute-time-2": f"{_recompute_seconds(two['paged']['recomputed_tokens']):.0f} s "
        f"({pct(_recompute_seconds(two['paged']['recomputed_tokens']) / two['paged']['window_s'])})",
        "vattention-recompute-time-2": pct(
            _recompute_seconds(two["vattention"]["recomputed_tokens"])
            / two["vattention"]["window_s"]
        ),
    }


__all__ = [
    "PREFILL_S_PER_TOKEN",
    "batch_size",
    "memory_waste",
    "ms",
    "num",
    "pct",
    "points",
    "table",
]
