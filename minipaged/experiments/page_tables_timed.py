"""The timed experiments' docs tables and quoted numbers, rendered from their JSON (see pages.py).

OS idea: one source, derived copies (pages.py). KV counterpart: the tables beside the vLLM paper's
Fig. 18b (block size) and Fig. 19a (swap or recompute) on docs/experiments/block-size.md and
swap-vs-recompute.md, the numbers their prose quotes, and the JSON example of the experiments' index.
Their times were measured on an idle machine: a page is only ever re-rendered from the JSON of that
run, never from a new measurement on a busy one.
"""

from __future__ import annotations

import json

from minipaged.experiments.page_tables import pct, table


def ms(seconds: float) -> str:
    """Milliseconds: two decimals from 1 ms up (11.78, 4.31), three below (0.553, 0.048)."""
    value = 1000 * seconds
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _ratio(x: float) -> str:
    return f"{x:.2f}" if x < 2 else f"{x:.1f}" if x < 10 else f"{x:.0f}"


def block_size(data: dict) -> dict[str, str]:
    waste = {
        (r["workload"], r["block_size"]): r
        for r in data["rows"]
        if r["part"] == "waste"
    }
    time = {r["block_size"]: r for r in data["rows"] if r["part"] == "time"}
    sizes = sorted(time)
    results = []
    for b in sizes:
        cells = [str(b), pct(waste["sharegpt-like", b]["waste_fraction"], 2)]
        cells += [pct(waste["alpaca-like", b]["waste_fraction"], 2)]
        cells += [
            f"{1000 * time[b]['seconds_per_step']:.2f}",
            f"{1000 * time[b]['model_seconds_per_step']:.2f}",
        ]
        results.append([f"**{c}**" for c in cells] if b == 16 else cells)
    step = {b: time[b]["seconds_per_step"] for b in sizes}
    model = {b: time[b]["model_seconds_per_step"] for b in sizes}
    fastest = min(sizes, key=step.get)
    mean_len = {w: waste[w, 1]["mean_len"] for w in ("sharegpt-like", "alpaca-like")}
    alpaca = [
        pct(waste["alpaca-like", b]["waste_fraction"]) for b in (16, 32, 64, 128, 256)
    ]
    sharegpt = {
        b: pct(waste["sharegpt-like", b]["waste_fraction"]) for b in (16, 128, 256)
    }
    from_4 = max(step[b] / step[fastest] - 1 for b in sizes if b >= 4)
    rows_16 = [b for b in sizes if b >= 16]
    beside = [
        [
            "large blocks",
            "hurt Alpaca beyond 32, ShareGPT beyond 128",
            f"Alpaca-like wastes {alpaca[0]} at 16, {alpaca[1]} at 32, then {', '.join(alpaca[2:])}; "
            f"ShareGPT-like stays at or under {sharegpt[128]} up to 128 and reaches {sharegpt[256]} at 256. "
            + _capacity_sentence(data),
        ],
        [
            "small blocks",
            "slow: the GPU kernel reads many small blocks",
            f"a decode step at block size 1 takes {ms(step[1])} ms against {ms(step[16])} ms at 16 "
            f"({pct(step[1] / step[16] - 1, 0).replace('%', '')}% more); {ms(step[2])} ms at 2; from 4 up, "
            f"within {pct(from_4, 0)} of the fastest",
        ],
        [
            "default",
            "16",
            f"16 is where both costs are small here too: {sharegpt[16]} / {alpaca[0]} waste, and a step "
            f"within {pct(step[16] / step[fastest] - 1, 0)} of the fastest measured "
            f"({ms(step[fastest])} ms at {fastest})",
        ],
    ]
    return {
        **_block_size_load(data),
        "results": table(
            [
                "block size",
                "ShareGPT-like waste",
                "Alpaca-like waste",
                "ms per decode step",
                "of which model part",
            ],
            results,
            "rrrrr",
        ),
        "beside": table(["", "the paper (Fig. 18b)", "measured here"], beside, "lll"),
        "mean-len-sharegpt": f"{mean_len['sharegpt-like']:.1f}",
        "mean-len-alpaca": f"{mean_len['alpaca-like']:.1f}",
        "context": f"{time[sizes[0]]['mean_context_len']:.1f}",
        "rule-16": " and ".join(
            f"7.5 / ({mean_len[w]:.1f} + 7.5) = {pct(7.5 / (mean_len[w] + 7.5))} for {name}"
            for w, name in (
                ("sharegpt-like", "ShareGPT-like"),
                ("alpaca-like", "Alpaca-like"),
            )
        ),
        "alpaca-256": pct(waste["alpaca-like", 256]["waste_fraction"], 0),
        "model-growth": pct(model[1] / model[16] - 1, 0),
        "model-range": f"{ms(model[16])} to {ms(model[1])} ms",
        "rest-growth": f"{ms(step[16] - model[16])} ms to {ms(step[1] - model[1])} ms",
        "flat": f"{ms(min(step[b] for b in rows_16))} to {ms(max(step[b] for b in rows_16))} ms",
        "fastest": f"{ms(step[fastest])} ms at {fastest}",
    }


def _loads(data: dict) -> dict[tuple[str, int], dict]:
    return {
        (r["workload"], r["block_size"]): r for r in data["rows"] if r["part"] == "load"
    }


def _served(loads: dict, workload: str, b: int) -> float:
    """Requests/s served at block size b, relative to block size 1."""
    return loads[workload, b]["throughput_rps"] / loads[workload, 1]["throughput_rps"]


def _capacity_sentence(data: dict) -> str:
    loads = _loads(data)
    alpaca = ", ".join(
        pct(_served(loads, "alpaca-like", b), 0) for b in (16, 32, 64, 128, 256)
    )
    sharegpt = ", ".join(
        pct(_served(loads, "sharegpt-like", b), 0) for b in (16, 128, 256)
    )
    return (
        f"Served at saturation, relative to block size 1: Alpaca-like {alpaca} at 16, 32, 64, 128, 256; "
        f"ShareGPT-like {sharegpt} at 16, 128, 256"
    )


def _block_size_load(data: dict) -> dict[str, str]:
    """The load part: what the 15,000-slot budget serves at each block size (block_size_load.py)."""
    loads = _loads(data)
    sizes = sorted({b for _, b in loads})
    rows = []
    for b in sizes:
        cells = [str(b)]
        for workload in ("sharegpt-like", "alpaca-like"):
            r = loads[workload, b]
            cells += [
                f"{r['mean_batch_size']:.1f}",
                f"{r['throughput_rps']:.2f}",
                pct(_served(loads, workload, b), 0),
            ]
            cells += [pct(r["internal_fragmentation"])]
        rows.append([f"**{c}**" for c in cells] if b == 16 else cells)
    header = ["block size"]
    for name in ("ShareGPT-like", "Alpaca-like"):
        header += [f"{name}: running", "served req/s", "vs block 1", "last-block waste"]
    first = loads["sharegpt-like", sizes[0]], loads["alpaca-like", sizes[0]]
    return {
        "load": table(header, rows, "r" * len(header)),
        "load-rates": f"{first[0]['rate']:g} and {first[1]['rate']:g}",
        "load-windows": f"{first[0]['window_s']:.0f} and {first[1]['window_s']:.0f}",
        "load-alpaca-64": pct(1 - _served(loads, "alpaca-like", 64), 0),
        "load-alpaca-256": pct(1 - _served(loads, "alpaca-like", 256), 0),
        "load-sharegpt-128": pct(1 - _served(loads, "sharegpt-like", 128), 0),
        "load-16": " and ".join(
            pct(1 - _served(loads, w, 16)) for w in ("sharegpt-like", "alpaca-like")
        ),
    }


def swap_vs_recompute(data: dict) -> dict[str, str]:
    rows = sorted(data["rows"], key=lambda r: r["block_size"])
    by = {r["block_size"]: r for r in rows}
    per_block = {
        b: r["swap_out_per_block_s"] + r["swap_in_per_block_s"] for b, r in by.items()
    }
    batched = {b: r["swap_out_s"] + r["swap_in_s"] for b, r in by.items()}
    ratio = {b: by[b]["recompute_s"] / per_block[b] for b in by}
    results = []
    for b, r in by.items():
        cells = [
            str(b),
            str(r["blocks"]),
            ms(r["swap_out_per_block_s"]),
            ms(r["swap_in_per_block_s"]),
        ]
        cells += [
            ms(per_block[b]),
            ms(batched[b]),
            ms(r["recompute_s"]),
            _ratio(ratio[b]),
        ]
        results.append([f"**{b}**", *cells[1:]] if b == 16 else cells)
    first, last = rows[0], rows[-1]
    pools = 4  # 2 layers x (K, V) of tiny-llama
    copies = {b: by[b]["blocks"] * pools for b in by}
    sizes = sorted(by)
    recompute = [by[b]["recompute_s"] for b in sizes]
    batched_wins = [b for b in sizes if batched[b] < per_block[b]]
    mid = [b for b in sizes if 16 <= b <= 64]
    lo, hi = sizes[0], sizes[-1]
    beside = [
        [
            "swap vs block size",
            "slow at small blocks, fast at large ones",
            f"the same shape: per-block swap time halves with each doubling of the block size, "
            f"{ms(per_block[lo])} ms at {lo} to {ms(per_block[hi])} ms at {hi} "
            f"({per_block[lo] / per_block[hi]:.0f}×)",
        ],
        [
            "recompute vs block size",
            "constant",
            f"no trend, but noisy: {ms(min(recompute))} to {ms(max(recompute))} ms",
        ],
        [
            "which is cheaper",
            "recompute at small blocks, swap at large ones; comparable at 16 to 64",
            f"swap at every block size: recompute costs {_ratio(ratio[lo])}× the per-block swap at {lo}, "
            f"{_ratio(ratio[2])}× at 2, {_ratio(min(ratio[b] for b in mid))}× to "
            f"{_ratio(max(ratio[b] for b in mid))}× at 16 to 64 and {_ratio(ratio[hi])}× at {hi}",
        ],
        [
            "recompute's worst case",
            "at most about 20% above swapping",
            f"{_ratio(max(ratio.values()))}× swapping",
        ],
    ]
    return {
        "results": table(
            [
                "block size",
                "blocks",
                "swap out, per block",
                "swap in, per block",
                "swap in + out, per block",
                "swap in + out, `swap_blocks`",
                "recompute",
                "recompute ÷ swap in + out, per block",
            ],
            results,
            "rrrrrrrr",
        ),
        "beside": table(
            ["", "the paper (Fig. 19a, GPU)", "measured here (CPU)"], beside, "lll"
        ),
        "copy-cost": f"{copies[lo]:,} copies ({first['blocks']} blocks × {pools} pools) take "
        f"{ms(first['swap_out_per_block_s'])} ms at block size {lo} "
        f"({1e6 * first['swap_out_per_block_s'] / copies[lo]:.1f} µs each), {copies[hi]} copies of "
        f"{last['bytes'] // copies[hi] // 1024} KiB take {ms(last['swap_out_per_block_s'])} ms at {hi} "
        f"({1e6 * last['swap_out_per_block_s'] / copies[hi]:.1f} µs each)",
        "bytes-last": f"{ms(last['swap_out_per_block_s'])} ms",
        "swap-1": f"{ms(per_block[lo])} ms",
        "recompute-1": f"{ms(by[lo]['recompute_s'])} ms",
        "ratio-1": _ratio(ratio[lo]),
        "out-in-1": f"{ms(first['swap_out_per_block_s'])} and {ms(first['swap_in_per_block_s'])} ms",
        "recompute-range": f"{ms(min(recompute))} to {ms(max(recompute))} ms",
        "batched-range": f"{ms(min(batched.values()))} to {ms(max(batched.values()))} ms",
        "batched-cross": f"up to {max(batched_wins)} tokens per block and loses from "
        f"{min(b for b in sizes if b > max(batched_wins))} up",
        "batched-vs-recompute": f"{min(by[b]['recompute_s'] / batched[b] for b in sizes):.0f}× to "
        f"{max(by[b]['recompute_s'] / batched[b] for b in sizes):.0f}×",
    }


def json_example(data: dict) -> dict[str, str]:
    """The index page's example of the JSON format: the first row of swap-vs-recompute's JSON."""
    row = data["rows"][0]
    cells = [
        f'"{k}": {json.dumps(v) if not isinstance(v, float) else f"{v:.3g}"}'
        for k, v in row.items()
    ]
    lines, line = [], "    {"
    for cell in cells:
        if len(line) + len(cell) + 2 > 88:  # the docs' code column
            lines.append(line.rstrip() + ",")
            line = "     "
        line += ("" if line.endswith(("{", " ")) else ", ") + cell
    lines.append(line + "},")
    paper = data["paper"]
    text = [
        "```json",
        "{",
        f'  "experiment": "{data["experiment"]}",',
        '  "rows": [',
        *lines,
        '    "..."',
        "  ],",
        f'  "paper": {{"section": "{paper["section"]}", "figure": "{paper["figure"]}",',
        f'            "finding": "{paper["finding"].split(":")[0]}: ..."}}',
        "}",
        "```",
    ]
    return {"json-example": "\n".join(text)}


__all__ = ["block_size", "json_example", "ms", "swap_vs_recompute"]
