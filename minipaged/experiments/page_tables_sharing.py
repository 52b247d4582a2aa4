"""The sharing experiments' docs tables and quoted numbers, rendered from their JSON (see pages.py).

OS idea: one source, derived copies (pages.py). KV counterpart: the tables beside the vLLM paper's
Figs. 15 (parallel sampling and beam search) and 16 (shared prefix) on docs/experiments/sharing.md and
shared-prefix.md, and every number their prose quotes from a run, with the gaps to the paper's
figures derived here so that they move with the run.
"""

from __future__ import annotations

from minipaged.experiments.page_tables import ms, num, pct, points, table
from minipaged.experiments.serving import BLOCK_SIZE
from minipaged.workloads import ALPACA


def sharing(data: dict) -> dict[str, str]:
    rows, paper = data["rows"], data["paper"]["saving_percent"]
    by = {(r["workload"], r["mode"], r["width"]): r for r in rows}
    widths = sorted({r["width"] for r in rows})
    results = []
    for workload in ("alpaca-like", "sharegpt-like"):
        for mode in ("parallel", "beam"):
            low, high = paper[workload.removesuffix("-like")][mode]
            cells = [pct(by[workload, mode, w]["saving"]) for w in widths]
            if mode == "parallel":
                share = by[workload, mode, widths[0]]["prompt_block_share"]
                rule = " / ".join(pct((w - 1) / w * share) for w in widths)
            else:
                rule = " / ".join(pct((w - 1) / w, 0) for w in widths) + " (limit)"
            name = {"parallel": "parallel sampling", "beam": "beam search"}[mode]
            label = workload.replace("sharegpt", "ShareGPT").replace("alpaca", "Alpaca")
            results.append([label, name, *cells, rule, f"{low}% – {high}%"])
    header = [
        "workload",
        "mode",
        *(f"width {w}" for w in widths),
        "rule of thumb",
        "the paper",
    ]
    load = []
    for (workload, mode, width), r in by.items():
        cells = [
            f"{r['rate']:g}",
            f"{r['mean_batch_size']:.1f}",
            f"{r['mean_seqs']:.0f}",
        ]
        cells += [
            f"{r['mean_blocks_used']:.0f} / {r['kv_slots'] // BLOCK_SIZE}",
            f"{r['mean_waiting']:.1f}",
        ]
        cells += [num(r["preemptions"]), ms(r["mean_step_s"])]
        label = workload.replace("sharegpt", "ShareGPT").replace("alpaca", "Alpaca")
        load.append([label, mode, str(width), *cells])
    load_header = ["workload", "mode", "width", "req/s", "mean batch", "mean sequences"]
    load_header += ["blocks used / pool", "mean waiting", "preemptions", "mean step"]
    ratios = [
        by[w, "beam", n]["saving"] / by[w, "parallel", n]["saving"]
        for (w, m, n) in by
        if m == "beam"
    ]
    cows = [r["cow_copies"] for r in rows if r["mode"] == "beam"]
    sg, al = "sharegpt-like", "alpaca-like"
    sg_share, al_share = (
        by[sg, "parallel", 2]["prompt_block_share"],
        by[al, "parallel", 2]["prompt_block_share"],
    )
    low_sg, high_sg = paper["sharegpt"]["parallel"]
    al2 = by[al, "parallel", 2]
    best = max(
        (w for w in widths if w > 2), key=lambda w: by[sg, "parallel", w]["saving"]
    )
    # points between the measured saving and (n - 1) / n of the prompt block share
    rule_gaps = [
        100 * abs(r["saving"] - (r["width"] - 1) / r["width"] * r["prompt_block_share"])
        for r in rows
        if r["mode"] == "parallel"
    ]
    return {
        "results": table(header, results, "llrrrrr"),
        "load": table(load_header, load, "llrrrrrrrr"),
        "alpaca-little": f"{al2['rate']:g} × {ALPACA.mean_output_len:.0f} × {ms(al2['mean_step_s'])} = "
        f"{al2['rate'] * ALPACA.mean_output_len * al2['mean_step_s']:.0f}",
        "ratio-range": f"{min(ratios):.1f} to {max(ratios):.1f}",
        "cow-range": f"{num(min(cows))} to {num(max(cows))}",
        "preemptions-max": num(max(r["preemptions"] for r in rows)),
        "alpaca-batch-2": f"{by[al, 'parallel', 2]['mean_batch_size']:.1f}",
        "sharegpt-share": pct(sg_share),
        "alpaca-share": pct(al_share),
        "rule-gap": f"{max(rule_gaps):.1f}",
        "sharegpt-best": f"{pct(by[sg, 'parallel', best]['saving'])} (n = {best})",
        "alpaca-beam-seqs": " and ".join(
            f"{by[al, 'beam', w]['mean_seqs']:.0f}" for w in widths if w > 2
        ),
        "alpaca-beam-max": " and ".join(
            f"{by[al, 'beam', w]['max_seqs']}" for w in widths if w > 2
        ),
        "alpaca-beam-batch": " and ".join(
            f"{by[al, 'beam', w]['mean_batch_size']:.1f}" for w in widths if w > 2
        ),
        "alpaca-beam-blocks": " and ".join(
            f"{by[al, 'beam', w]['mean_blocks_used']:.0f}" for w in widths if w > 2
        ),
        "sharegpt-2": pct(by[sg, "parallel", 2]["saving"]),
        "sharegpt-2-gap": points(100 * by[sg, "parallel", 2]["saving"], low_sg),
        "sharegpt-2-needed": pct(2 * low_sg / 100),
        "alpaca-6": pct(by[al, "parallel", 6]["saving"]),
        "alpaca-6-gap": points(
            100 * by[al, "parallel", 6]["saving"], paper["alpaca"]["parallel"][1]
        ),
        "alpaca-6-rule": pct(5 / 6 * al_share),
        "alpaca-6-batch": f"{by[al, 'parallel', 6]['mean_batch_size']:.1f}",
        "alpaca-2-batch": f"{by[al, 'parallel', 2]['mean_batch_size']:.1f}",
        "sharegpt-4": pct(by[sg, "parallel", 4]["saving"]),
        "sharegpt-6": pct(by[sg, "parallel", 6]["saving"]),
        "sharegpt-6-totals": pct(by[sg, "parallel", 6]["saving_of_totals"]),
        "sharegpt-4-totals": pct(by[sg, "parallel", 4]["saving_of_totals"]),
        "sharegpt-6-batch": f"{by[sg, 'parallel', 6]['mean_batch_size']:.1f}",
        "sharegpt-6-rule": pct(5 / 6 * sg_share),
        "sharegpt-6-gap": points(100 * by[sg, "parallel", 6]["saving"], high_sg),
        "sharegpt-high-needed": pct(6 / 5 * high_sg / 100),
        "beam-2-gaps": " and ".join(
            points(
                100 * by[w, "beam", 2]["saving"],
                paper[w.removesuffix("-like")]["beam"][0],
            )
            for w in (al, sg)
        ),
        "beam-6-gaps": " and ".join(
            points(
                100 * by[w, "beam", 6]["saving"],
                paper[w.removesuffix("-like")]["beam"][1],
            )
            for w in (al, sg)
        ),
        "sharegpt-beams": ", ".join(pct(by[sg, "beam", w]["saving"]) for w in widths),
    }


def shared_prefix(data: dict) -> dict[str, str]:
    """The memory part's tables and numbers, then the throughput part's (shared_prefix_rates)."""
    rows, paper = (
        [r for r in data["rows"] if r["part"] == "memory"],
        data["paper"]["throughput_vs_orca_oracle"],
    )
    prefixes = sorted({r["prefix_len"] for r in rows})
    results, by = [], {}
    for r in rows:
        by[r["prefix_len"], r["allocator"], r["prefix_caching"]] = r
        bold = (lambda s: f"**{s}**") if r["prefix_caching"] else (lambda s: s)
        label = {"orca-oracle": "Orca (Oracle)"}.get(
            r["allocator"], "paged, no caching"
        )
        label = bold("paged + caching") if r["prefix_caching"] else label
        results.append(
            [
                str(r["prefix_len"]),
                label,
                bold(f"{r['throughput_rps']:.1f}"),
                bold(f"{r['throughput_vs_orca_oracle']:.2f}"),
                f"{r['mean_batch_size']:.1f}",
                bold(f"{r['blocks_per_request']:.2f}"),
                bold(f"{r['prefill_tokens_per_request']:.1f}"),
                pct(r["prefix_hit_rate"])
                if r["prefix_caching"]
                else "0%"
                if r["allocator"] == "paged"
                else "—",
            ]
        )
    header = [
        "prefix",
        "system",
        "requests/s",
        "× Orca (Oracle)",
        "mean batch",
        "blocks per request",
        "prefill tokens per request",
        "prefix hit rate",
    ]
    on = {p: by[p, "paged", True] for p in prefixes}
    off = {p: by[p, "paged", False] for p in prefixes}
    oracle = {p: by[p, "orca-oracle", False] for p in prefixes}
    short, long = prefixes[0], prefixes[-1]
    names = {80: "1-shot, 80-token prefix", 341: "5-shot, 341-token prefix"}
    beside = [
        [
            names.get(p, f"{p}-token prefix"),
            f"{paper[str(p)]}×",
            f"{on[p]['throughput_vs_orca_oracle']:.2f}×",
        ]
        for p in prefixes
    ]
    gain = {p: on[p]["throughput_vs_orca_oracle"] for p in prefixes}
    return {
        "results": table(header, results, "rlrrrrrr"),
        "beside": table(
            [
                "throughput over Orca (Oracle)",
                "the paper (Fig. 16, vLLM)",
                "measured here (paged + caching)",
            ],
            beside,
            "lrr",
        ),
        "requests": num(rows[0]["requests"]),
        "peak-range": " to ".join(
            f"{f(r['peak_blocks'] for r in rows):.0f}" for f in (min, max)
        ),
        "blocks-cut": " and ".join(
            f"{pct(1 - on[p]['blocks_per_request'] / off[p]['blocks_per_request'], 0)} ({p})"
            for p in prefixes
        ),
        "prefill-cut": " and ".join(
            pct(
                1
                - on[p]["prefill_tokens_per_request"]
                / off[p]["prefill_tokens_per_request"],
                0,
            )
            for p in prefixes
        ),
        "trend": f"{gain[long] / gain[short]:.1f}",
        "paper-trend": f"{paper[str(long)] / paper[str(short)]:.1f}",
        "excess": " and ".join(pct(gain[p] / paper[str(p)] - 1, 0) for p in prefixes),
        "batch-ratio": f"{on[short]['mean_batch_size']:.1f} / {oracle[short]['mean_batch_size']:.1f} = "
        f"{on[short]['mean_batch_size'] / oracle[short]['mean_batch_size']:.2f}",
        "oracle-blocks": " and ".join(
            f"{oracle[p]['blocks_per_request'] / off[p]['blocks_per_request']:.2f}× ({p})"
            for p in prefixes
        ),
        "no-caching-range": " to ".join(
            f"{v:.2f}×"
            for v in sorted(off[p]["throughput_vs_orca_oracle"] for p in prefixes)
        ),
        **shared_prefix_rates(data),
    }


def _rate(x: float) -> str:
    return f"{x:g}"


def shared_prefix_rates(data: dict) -> dict[str, str]:
    """The throughput part: max_rate per prefix and system beside the paper's ratio, every point's
    normalized latency, and the numbers the prose quotes."""
    summaries = {
        (r["prefix_len"], r["system"]): r
        for r in data["rows"]
        if r["part"] == "max_rate"
    }
    points_ = [r for r in data["rows"] if r["part"] == "rate"]
    prefixes = sorted({p for p, _ in summaries})
    systems = list(dict.fromkeys(s for _, s in summaries))  # Orca (Oracle), then vLLM
    names = {80: "1-shot, 80 tokens", 341: "5-shot, 341 tokens"}
    vllm = {p: summaries[p, "vLLM"] for p in prefixes}
    oracle = {p: summaries[p, "Orca (Oracle)"] for p in prefixes}

    def ratio(r: dict) -> str:
        return (
            "—"
            if r["max_rate_vs_orca_oracle"] is None
            else f"**{r['max_rate_vs_orca_oracle']:.2f}×**"
        )

    rates = table(
        ["prefix", "Orca (Oracle) max_rate", "vLLM max_rate", "vLLM / Orca (Oracle)", "the paper (Fig. 16)"],
        [
            [names.get(p, f"{p} tokens"), _rate(oracle[p]["max_rate"]), _rate(vllm[p]["max_rate"]),
             ratio(vllm[p]), f"{vllm[p]['paper_vs_orca_oracle']}×"]
            for p in prefixes
        ],
        "lrrrr",
    )  # fmt: skip
    columns = [(p, s) for p in prefixes for s in systems]
    latency = {
        (r["prefix_len"], r["system"], r["rate"]): r["normalized_latency"]
        for r in points_
    }
    grid = sorted({r["rate"] for r in points_})
    curve = table(
        ["requests/s", *(f"{p}: {s}" for p, s in columns)],
        [[_rate(x), *(f"{latency[p, s, x]:.3f}" if (p, s, x) in latency else "—" for p, s in columns)]
         for x in grid],
        "r" * (1 + len(columns)),
    )  # fmt: skip
    gains = {p: vllm[p]["max_rate_vs_orca_oracle"] for p in prefixes}
    settings = data["settings"]
    return {
        "rates": rates,
        "rate-points": curve,
        "rate-kv": num(settings["kv_slots"]),
        "rate-window": f"{settings['window_s']:g} s",
        "rate-excess": " and ".join(
            "—"
            if gains[p] is None
            else f"{pct(gains[p] / vllm[p]['paper_vs_orca_oracle'] - 1, 0)} ({p})".replace(
                "-", "−"
            )
            for p in prefixes
        ),
        "rate-batch": " and ".join(
            f"{_batch_at(points_, p, 'vLLM', vllm[p]['max_rate']):.0f} against "
            f"{_batch_at(points_, p, 'Orca (Oracle)', oracle[p]['max_rate']):.0f} ({p})"
            for p in prefixes
        ),
    }


def _batch_at(points_: list[dict], prefix_len: int, system: str, rate: float) -> float:
    """The mean batch of one system's point at `rate` (its max_rate), 0.0 if there is none."""
    found = [
        r["mean_batch_size"]
        for r in points_
        if (r["prefix_len"], r["system"], r["rate"]) == (prefix_len, system, rate)
    ]
    return found[0] if found else 0.0


__all__ = ["shared_prefix", "shared_prefix_rates", "sharing"]
