"""The cost model beside published step times: how far its prices are from measured ones.

OS idea: a performance model is only as good as its validation: OSTEP's chapters on disks and
scheduling check each formula against measured numbers before using it (OSTEP ch. 37). KV
counterpart: the simulated runner prices vLLM paper section 6's steps with cost_model.CostModel;
this module holds the published timings of the same models on the same GPUs, the model's
predictions for them, and every number docs/experiments/cost-model.md quotes, so the page cannot
drift from the code (`python -m minipaged.experiments.cost_model_published --sync` rewrites it).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from minipaged.experiments.cost_model import KEYS, CostModel
from minipaged.experiments.hardware import gpu_table, model_table


def generation_time(
    cost: CostModel, batch_size: int, prompt_len: int, output_len: int
) -> float:
    """Seconds to serve `batch_size` equal requests batched statically: one prefill step of
    every prompt (it samples the first token), then output_len - 1 decode steps."""
    b, p = batch_size, prompt_len
    decodes = (cost.step_time([1] * b, [p + n] * b) for n in range(1, output_len))
    return cost.step_time([p] * b, [p] * b) + sum(decodes)


class Published(NamedTuple):
    """One published timing of a preset model on preset GPUs, and what it timed."""

    model: str
    gpu: str
    tensor_parallel_size: int
    # "prefill" | "decode" (one step) | "mean step" | "request" (whole generation)
    kind: str
    batch_size: int
    prompt_len: int
    output_len: int
    published_ms: float
    source: str  # a key of SOURCES


SOURCES = {  # key -> (engine, where the number is written)
    "kipply": (
        "FasterTransformer",
        "https://kipp.ly/transformer-inference-arithmetic/",
    ),
    "ft": (
        "FasterTransformer",
        "https://github.com/NVIDIA/FasterTransformer/blob/main/docs/gpt_guide.md",
    ),
    "distserve": ("vLLM, DistServe's fit", "https://github.com/LLMServe/DistServe"),
    "lmdeploy": (
        "LMDeploy 0.1",
        "https://github.com/InternLM/lmdeploy/blob/main/docs/en/benchmark/a100_fp16.md",
    ),
}


def _fit(a: float, b: float, c: float, x: float, y: float) -> float:
    """DistServe's latency model of a vLLM step, in ms: prefill a + b x tokens + c x tokens^2;
    decode a + b x context tokens + c x batch (simdistserve/estimators/time_estimator.py)."""
    return a + b * x + c * y


# DistServe's coefficients for vLLM on A100-80GB (profile_data/profiler-a100-80g.vllm.json)
_OPT13_PREFILL = (23.62736227, 0.15054561, 8.65348374e-06)
_OPT13_DECODE = (19.562534173678987, 0.0004941120550644942, 0.05060571771697455)
_OPT66_TP4_PREFILL = (30.68963525855282, 0.15204703019896387, 3.286440997304907e-05)
_OPT66_TP4_DECODE = (32.98482446677012, 0.000578810141033908, 0.11317390154663971)
PUBLISHED = (
    Published("opt-13b", "A100-40GB", 1, "prefill", 1, 512, 1, 63.17, "kipply"),
    Published("opt-13b", "A100-40GB", 1, "decode", 1, 512, 2, 22.0, "kipply"),
    Published("opt-13b", "A100-40GB", 2, "prefill", 1, 512, 1, 45.45, "kipply"),
    Published("opt-13b", "A100-40GB", 2, "decode", 1, 512, 2, 13.5, "kipply"),
    Published(
        "opt-13b",
        "A100-80GB",
        1,
        "prefill",
        1,
        512,
        1,
        _fit(*_OPT13_PREFILL, 512, 512**2),
        "distserve",
    ),
    Published(
        "opt-13b",
        "A100-80GB",
        1,
        "decode",
        1,
        512,
        2,
        _fit(*_OPT13_DECODE, 513, 1),
        "distserve",
    ),
    Published(
        "opt-13b",
        "A100-80GB",
        1,
        "decode",
        32,
        512,
        2,
        _fit(*_OPT13_DECODE, 513 * 32, 32),
        "distserve",
    ),
    Published(
        "opt-66b",
        "A100-80GB",
        4,
        "prefill",
        1,
        512,
        1,
        _fit(*_OPT66_TP4_PREFILL, 512, 512**2),
        "distserve",
    ),
    Published(
        "opt-66b",
        "A100-80GB",
        4,
        "decode",
        1,
        512,
        2,
        _fit(*_OPT66_TP4_DECODE, 513, 1),
        "distserve",
    ),
    Published("llama-13b", "A100-80GB", 1, "prefill", 1, 128, 1, 40, "lmdeploy"),
    Published("llama-13b", "A100-80GB", 1, "prefill", 1, 2048, 1, 242, "lmdeploy"),
    Published(
        "llama-13b", "A100-80GB", 1, "mean step", 1, 1, 128, 1000 / 57.49, "lmdeploy"
    ),
    Published(
        "llama-13b", "A100-80GB", 1, "mean step", 16, 1, 128, 16000 / 869.45, "lmdeploy"
    ),
    Published(
        "llama-13b",
        "A100-80GB",
        1,
        "mean step",
        64,
        1,
        128,
        64000 / 3049.16,
        "lmdeploy",
    ),
    Published("opt-175b", "A100-80GB", 8, "request", 1, 128, 8, 488.86, "ft"),
    Published("opt-175b", "A100-80GB", 8, "request", 1, 512, 32, 1719.96, "ft"),
    Published("opt-175b", "A100-80GB", 8, "request", 16, 512, 32, 3706.23, "ft"),
)


def predict_ms(row: Published, **settings: Any) -> float:
    """The model's milliseconds for what `row` timed (settings: CostModel's keywords)."""
    cost = CostModel(row.model, row.gpu, row.tensor_parallel_size, **settings)
    b, p, o = row.batch_size, row.prompt_len, row.output_len
    if row.kind == "decode":
        return 1e3 * cost.step_time([1] * b, [p + 1] * b)
    seconds = generation_time(cost, b, p, o if row.kind != "prefill" else 1)
    return 1e3 * seconds / (o if row.kind == "mean step" else 1)


def comparison_rows(**settings: Any) -> list[dict[str, Any]]:
    """Each published timing of PUBLISHED beside the model's prediction, as plain dicts."""
    return [
        {
            **row._asdict(),
            "predicted_ms": (ms := predict_ms(row, **settings)),
            "ratio": ms / row.published_ms,
        }
        for row in PUBLISHED
    ]


def ridge_tokens(cost: CostModel) -> int:
    """The shortest prefill whose linear layers are compute-bound (the roofline's ridge point)."""
    m = cost.model
    return math.ceil(
        m.weight_bytes * cost.flops_per_s / (2 * m.num_parameters * cost.bytes_per_s)
    )


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.{1 if seconds >= 0.01 else 2}f}"


def comparison_table() -> str:
    """comparison_rows() as the Markdown table of docs/experiments/cost-model.md."""
    lines = [
        "| model | GPUs | what was timed | engine | published ms | predicted ms | predicted ÷ published |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in comparison_rows():
        b, p, o = r["batch_size"], r["prompt_len"], r["output_len"]
        what = {
            "prefill": f"prefill of {p} tokens",
            "decode": f"decode step, batch {b}, context {p}",
            "mean step": f"mean step, batch {b}, {o} tokens from {p}",
            "request": f"request, batch {b}, {p} in, {o} out",
        }[r["kind"]]
        tp = r["tensor_parallel_size"]
        gpus = f"{tp} × {r['gpu']}" if tp > 1 else r["gpu"]
        engine = SOURCES[r["source"]][0]
        lines.append(
            f"| {r['model']} | {gpus} | {what} | [{engine}][{r['source']}] | {r['published_ms']:.1f} "
            f"| {r['predicted_ms']:.1f} | {r['ratio']:.2f} |"
        )
    return "\n".join(lines)


def doc_parts() -> dict[str, str]:
    """Every number docs/experiments/cost-model.md quotes, keyed by its `gen:` marker."""
    cost = CostModel("opt-13b", "A100-40GB")
    steps = {  # name -> (query_lens, seq_lens)
        "decode, batch 1, context 512": ([1], [513]),
        "decode, batch 32, context 512": ([1] * 32, [513] * 32),
        "prefill of 512 tokens": ([512], [512]),
        "prefill of 2,048 tokens": ([2048], [2048]),
    }
    lines = [
        "| step | linear: compute | linear: memory | attention: compute | attention: memory "
        "| overhead | step ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, (q, s) in steps.items():
        parts = cost.step_parts(q, s)
        cells = [
            _ms(parts[k]) for k in KEYS if k not in ("linear", "attention", "allreduce")
        ]
        lines.append(f"| {name} | {' | '.join(cells)} | {_ms(cost.step_time(q, s))} |")
    recompute = cost.step_time([512], [512])
    swap = [
        "| block size | copies each way | swap in, ms | swap out + in, ms | recompute, ms "
        "| recompute ÷ (out + in) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for block_size in (1, 4, 16, 64, 256):
        blocks = 512 // block_size
        copies = blocks * cost.model.num_layers * 2  # one a block, a layer, K or V
        t = cost.swap_time(blocks, block_size, copies)
        swap.append(
            f"| {block_size} | {copies:,} | {_ms(t)} | {_ms(2 * t)} | {_ms(recompute)} "
            f"| {recompute / (2 * t):.2f} |"
        )
    h100, h200 = (ridge_tokens(CostModel("opt-13b", g)) for g in ("H100", "H200"))
    return {
        "gpus": gpu_table(),
        "models": model_table(),
        "parts": "\n".join(lines),
        "ridge-a100": f"{ridge_tokens(cost)} tokens",
        "kv-slots": f"{cost.kv_cache_tokens():,}",
        "swap": "\n".join(swap),
        "comparison": comparison_table(),
        "exercise": f"the H200, from {h200} tokens (the H100 from {h100})",
    }


# print the comparison; --sync rewrites the docs page's numbers
if __name__ == "__main__":
    import sys
    from pathlib import Path

    from minipaged.experiments.pages import DOCS, stale_parts, sync_page

    print(comparison_table())
    page = DOCS / "cost-model.md"
    if "--sync" in sys.argv:
        page.write_text(sync_page(page.read_text(), doc_parts()))
    print(
        "\n".join(stale_parts(page.read_text(), doc_parts()))
        or f"{Path(page).name} is up to date"
    )


__all__ = [
    "PUBLISHED",
    "comparison_rows",
    "comparison_table",
    "doc_parts",
    "generation_time",
    "ridge_tokens",
]
