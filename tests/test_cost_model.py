"""The GPU step-time cost model: its arithmetic by hand, its presets, its roofline, its errors.

A tiny made-up model on a made-up GPU, with round numbers, pins every formula to a value worked
out here; the presets are held to their published sizes; the docs page must quote what the code
computes.
"""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, OPTConfig

from minipaged.experiments.cost_model import (
    GPU,
    GPUS,
    MODELS,
    CostModel,
    ModelSpec,
    get_gpu,
    get_model,
)
from minipaged.experiments.cost_model_published import (
    comparison_rows,
    doc_parts,
    ridge_tokens,
)
from minipaged.experiments.pages import DOCS, stale_parts

# 2 layers, hidden 8 = 2 heads x 4 dims, MLP 16, vocab 10, fp16, tied embeddings
TINY = ModelSpec("tiny", 2, 8, 2, 2, 4, 16, 10, gated_mlp=False)
# 1,000 FLOP/s, 100 B/s of HBM, 10 B/s of PCIe, 50 B/s of NVLink
TOY_GPU = GPU("toy", 1000.0, 100.0, 10_000, 10.0, 50.0)
EXACT = {"compute_efficiency": 1.0, "bandwidth_efficiency": 1.0, "step_overhead": 0.0}


def toy(tp: int = 1, **settings) -> CostModel:
    return CostModel(TINY, TOY_GPU, tp, **{**EXACT, **settings})


def test_sizes_of_the_tiny_model_by_hand():
    # per layer: Q, K, V, O are 4 matrices of 8 x 8 = 256; the MLP 2 x 8 x 16 = 256
    assert TINY.num_parameters == 2 * (256 + 256) + 10 * 8 == 1104  # + tied embeddings
    assert TINY.weight_bytes == 2208
    # K and V x layers x heads x dims x 2 B
    assert TINY.kv_bytes_per_token == 2 * 2 * 2 * 4 * 2 == 64
    gated = ModelSpec(
        "g", 2, 8, 2, 2, 4, 16, 10, gated_mlp=True, tie_word_embeddings=False
    )
    # 3 MLP matrices, own LM head
    assert gated.num_parameters == 2 * (256 + 3 * 128) + 2 * 80 == 1440


def test_step_parts_of_the_tiny_model_by_hand():
    # a 3-token prefill (seq_len 3) and a decode at seq_len 5: 4 tokens
    parts = toy().step_parts([3, 1], [3, 5])
    assert parts["linear_compute"] == pytest.approx(2 * 1104 * 4 / 1000)  # 8.832 s
    assert parts["linear_memory"] == pytest.approx(2208 / 100)  # 22.08 s: memory-bound
    assert parts["linear"] == parts["linear_memory"]
    # causal pairs: 1 + 2 + 3 for the prefill, 5 for the decode; 4 x layers x heads x dims each
    # 0.704 s
    assert parts["attention_compute"] == pytest.approx(4 * 2 * 2 * 4 * (6 + 5) / 1000)
    # K/V read (3 and 5 tokens) plus written (3 and 1): 12 tokens of 64 bytes
    assert parts["attention_memory"] == pytest.approx(12 * 64 / 100)  # 7.68 s
    assert parts["attention"] == parts["attention_memory"]
    assert parts["allreduce"] == 0.0 and parts["overhead"] == 0.0
    assert toy().step_time([3, 1], [3, 5]) == pytest.approx(22.08 + 7.68)


def test_efficiencies_overhead_and_tensor_parallel_by_hand():
    half = toy(compute_efficiency=0.5, bandwidth_efficiency=0.5, step_overhead=0.25)
    parts = half.step_parts([3, 1], [3, 5])
    assert parts["linear_compute"] == pytest.approx(8.832 * 2)
    assert half.step_time([3, 1], [3, 5]) == pytest.approx(2 * (22.08 + 7.68) + 0.25)
    two = toy(2, allreduce_latency=0.5, allreduce_step_latency=0.25)
    parts = two.step_parts([3, 1], [3, 5])
    assert parts["linear_memory"] == pytest.approx(22.08 / 2)
    assert parts["attention_memory"] == pytest.approx(7.68 / 2)
    # 2 all-reduces x 2 layers of 4 tokens x 8 x 2 B = 64 B: ring 2(N-1)/N = 1 of them at 50 B/s
    one_allreduce = 0.5 + 2 * 0.25 + 64 / 50
    assert two.allreduce_time(64) == pytest.approx(one_allreduce)
    assert parts["allreduce"] == pytest.approx(4 * one_allreduce)


def test_swap_copy_and_kv_slots_by_hand():
    cost = toy(swap_overhead=0.5)
    # 3 blocks of 2 tokens of 64 B over 10 B/s, in 4 copies of 0.5 s
    assert cost.swap_time(3, 2, 4) == pytest.approx(384 / 10 + 4 * 0.5)
    assert cost.copy_time(3, 2) == pytest.approx(2 * 384 / 100)
    assert cost.kv_cache_tokens(0.5) == (5000 - 2208) // 64 == 43
    # each GPU: half the heads
    assert toy(2).kv_cache_tokens(0.5) == (5000 - 1104) // 32


def test_presets_have_the_published_sizes():
    assert MODELS["opt-13b"].kv_bytes_per_token == 819_200  # the paper's "800 KB"
    assert MODELS["opt-13b"].num_parameters == pytest.approx(13e9, rel=0.02)
    assert MODELS["opt-66b"].num_parameters == pytest.approx(66e9, rel=0.02)
    assert MODELS["opt-175b"].num_parameters == pytest.approx(175e9, rel=0.02)
    assert MODELS["llama-13b"].num_parameters == pytest.approx(13.0e9, rel=0.02)
    assert set(GPUS) == {"A100-40GB", "A100-80GB", "H100", "H200"}
    # the paper's setup: about 26 GB of weights and 12 GB of KV on a 40 GB A100
    assert MODELS["opt-13b"].weight_bytes == pytest.approx(26e9, rel=0.02)
    assert 15_000 <= CostModel().kv_cache_tokens() <= 16_000


def test_from_config_gives_the_presets_shapes():
    opt = OPTConfig(
        hidden_size=5120,
        num_hidden_layers=40,
        ffn_dim=20480,
        num_attention_heads=40,
        word_embed_proj_dim=5120,
    )
    assert ModelSpec.from_config(opt, name="opt-13b") == MODELS["opt-13b"]
    llama = LlamaConfig(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
    )
    assert ModelSpec.from_config(llama, name="llama-13b") == MODELS["llama-13b"]
    assert get_model(llama).num_parameters == MODELS["llama-13b"].num_parameters
    assert CostModel(opt).model.kv_bytes_per_token == 819_200


def test_decode_is_memory_bound_and_long_prefill_compute_bound():
    cost = CostModel("opt-13b", "A100-40GB")
    decode = cost.step_parts([1] * 32, [513] * 32)
    assert decode["linear_memory"] > 5 * decode["linear_compute"]
    assert decode["attention_memory"] > decode["attention_compute"]
    prefill = cost.step_parts([2048], [2048])
    assert prefill["linear_compute"] > 5 * prefill["linear_memory"]
    assert prefill["attention_compute"] > prefill["attention_memory"]


def test_step_time_grows_with_batch_and_context():
    cost = CostModel("llama-13b", "H100")
    by_batch = [cost.step_time([1] * b, [1000] * b) for b in (1, 8, 64, 256)]
    by_context = [cost.step_time([1] * 8, [n] * 8) for n in (16, 512, 2048)]
    assert by_batch == sorted(by_batch) and len(set(by_batch)) == 4
    assert by_context == sorted(by_context) and len(set(by_context)) == 3
    assert cost.step_time([], []) == 0.0
    assert cost.step_parts([], []) == dict.fromkeys(cost.step_parts([1], [1]), 0.0)


def test_tensor_parallel_cuts_the_step_but_adds_allreduce():
    # one hypothetical GPU with 4 A100-80GBs' rates and memory, against 4 real ones
    a100 = GPUS["A100-80GB"]
    big = GPU(
        "4xA100",
        4 * a100.peak_flops,
        4 * a100.memory_bandwidth,
        4 * a100.memory_bytes,
        32e9,
        300e9,
    )
    q, s = [1] * 16, [1024] * 16
    one, four = (
        CostModel("opt-66b", big).step_parts(q, s),
        CostModel("opt-66b", "A100-80GB", 4).step_parts(q, s),
    )
    assert four["linear"] == pytest.approx(one["linear"]) and four[
        "attention"
    ] == pytest.approx(one["attention"])
    assert one["allreduce"] == 0.0 < four["allreduce"]
    single = CostModel(
        "opt-66b",
        GPU("one", a100.peak_flops, a100.memory_bandwidth, 4 * a100.memory_bytes, 1, 1),
    )
    assert (
        CostModel("opt-66b", "A100-80GB", 4).step_time(q, s)
        < single.step_time(q, s) / 3
    )


def test_swap_time_is_linear_in_blocks_plus_a_cost_per_transfer():
    cost = CostModel("opt-13b", "A100-40GB")
    per_block = cost.swap_time(1, 16, 1) - cost.swap_overhead  # the bytes of one block
    for blocks in (1, 10, 100):
        assert cost.swap_time(blocks, 16, blocks) == pytest.approx(
            blocks * (per_block + cost.swap_overhead)
        )
    assert cost.swap_time(100, 16, 8000) - cost.swap_time(
        100, 16, 100
    ) == pytest.approx(7900 * cost.swap_overhead)
    # Fig. 19: per-block copies make small blocks slow; large blocks beat a recompute
    recompute = cost.step_time([512], [512])
    assert cost.swap_time(512, 1, 512 * 80) > recompute > cost.swap_time(2, 256, 2 * 80)
    assert cost.swap_time(0, 16, 0) == 0.0


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: CostModel("opt-7b"), "model"),
        (lambda: CostModel(42), "model"),
        (lambda: CostModel(gpu="V100"), "gpu"),
        (lambda: CostModel(tensor_parallel_size=0), "tensor_parallel_size"),
        (lambda: CostModel(tensor_parallel_size=2.0), "tensor_parallel_size"),
        (lambda: CostModel("opt-66b", tensor_parallel_size=5), "tensor_parallel_size"),
        (lambda: CostModel(compute_efficiency=1.5), "compute_efficiency"),
        (lambda: CostModel(bandwidth_efficiency=0), "bandwidth_efficiency"),
        (lambda: CostModel(step_overhead=-1), "step_overhead"),
        (lambda: CostModel().step_time([1, 1], [5]), "query_lens and seq_lens"),
        (lambda: CostModel().step_time([6], [5]), "query_lens[0]"),
        (lambda: CostModel().step_time([1, -1], [5, 5]), "query_lens[1]"),
        (lambda: CostModel().step_time([1.5], [5]), "query_lens and seq_lens"),
        (lambda: CostModel().swap_time(-1, 16, 1), "num_blocks"),
        (lambda: CostModel().swap_time(1, 0, 1), "block_size"),
        (lambda: CostModel().swap_time(4, 16, 0), "num_transfers"),
        (lambda: CostModel().copy_time(1, -16), "block_size"),
        (lambda: CostModel().kv_cache_tokens(0), "gpu_memory_utilization"),
        (lambda: CostModel("opt-175b", "A100-80GB").kv_cache_tokens(), "opt-175b"),
        (lambda: ModelSpec("x", 0, 8, 2, 2, 4, 16, 10, gated_mlp=False), "num_layers"),
        (lambda: GPU("x", 0, 1, 1, 1, 1), "peak_flops"),
        (lambda: get_gpu(None), "gpu"),
        (lambda: get_model(None), "model"),
    ],
)
def test_bad_input_raises_naming_the_argument(make, argument):
    with pytest.raises(
        ValueError, match=argument.replace("[", r"\[").replace("]", r"\]")
    ):
        make()


def test_weights_that_do_not_fit_name_model_and_gpu():
    with pytest.raises(ValueError, match=r"opt-175b.*8 x A100-40GB"):
        CostModel("opt-175b", "A100-40GB", 8).kv_cache_tokens()
    assert CostModel("opt-175b", "A100-80GB", 8).kv_cache_tokens() > 50_000


def test_the_page_quotes_what_the_code_computes():
    problems = stale_parts((DOCS / "cost-model.md").read_text(), doc_parts())
    sync = "python -m minipaged.experiments.cost_model_published --sync"
    assert not problems, f"run `{sync}`:\n" + "\n".join(problems)
    # the guard works: a number the code no longer gives makes the page stale
    changed = {
        **doc_parts(),
        "kv-slots": f"{CostModel(step_overhead=0).kv_cache_tokens() + 1:,}",
    }
    assert stale_parts((DOCS / "cost-model.md").read_text(), changed) == [
        f"kv-slots: the page says '15,837', the JSON gives '{changed['kv-slots']}'"
    ]


def test_comparison_rows_are_predictions_beside_published_figures():
    rows = comparison_rows()
    assert len(rows) >= 10 and {r["model"] for r in rows} == set(MODELS)
    for r in rows:
        assert r["ratio"] == pytest.approx(r["predicted_ms"] / r["published_ms"])
    single_gpu_decodes = [
        r["ratio"]
        for r in rows
        if r["kind"] != "prefill" and r["tensor_parallel_size"] == 1
    ]
    assert all(0.85 < ratio < 1.15 for ratio in single_gpu_decodes)


def test_exercise_answer():
    """docs/experiments/cost-model.md: the ridge point of OPT-13B on an H100 and an H200."""

    def ridge_by_scan(gpu: str) -> int:
        cost = CostModel("opt-13b", gpu)
        for tokens in range(1, 1000):
            parts = cost.step_parts([tokens], [tokens])
            if parts["linear_compute"] >= parts["linear_memory"]:
                return tokens
        raise AssertionError("no ridge under 1,000 tokens")

    h100, h200 = ridge_by_scan("H100"), ridge_by_scan("H200")
    assert (h100, h200) == (259, 181)
    assert [ridge_tokens(CostModel("opt-13b", g)) for g in ("H100", "H200")] == [
        h100,
        h200,
    ]
    assert (
        doc_parts()["exercise"]
        == f"the H200, from {h200} tokens (the H100 from {h100})"
    )
