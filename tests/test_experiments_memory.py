"""The memory experiments (vLLM paper sections 3 and 6.2-6.4): memory-waste, batch-size, sharing and
shared-prefix. Their small runs return the keys their docs pages document, with sane values: shares
in [0, 1] that sum to 1, paged holding more token states than every Orca, sharing saving more with
beam search than with parallel sampling, prefix caching saving blocks and prefill. Also the
simulator's per-step counters they are built on, determinism under a seed, the figures and the CLI.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest

from minipaged import cli
from minipaged.experiments import batch_size, memory_waste, shared_prefix, sharing
from minipaged.experiments.serving import COST_MODEL, KV_SLOTS, serve, sharegpt_load
from minipaged.experiments.simulator import simulate
from minipaged.workloads import Request
from minipaged.workloads import shared_prefix as shared_prefix_workload

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_NUM_SEQS = 256  # simulate()'s default, the experiments' per-step sequence budget
USED = (
    "token_states",
    "reserved",
    "internal_fragmentation",
    "external_fragmentation",
    "stranded",
)
POOL = tuple(f"pool_{k}" for k in (*USED, "free"))
MEMORY_WASTE_KEYS = {
    "allocator",
    "label",
    "kv_slots",
    "rate",
    "window_s",
    *USED,
    *POOL,
    "mean_batch_size",
    "mean_waiting",
    "mean_step_s",
    "preemptions",
    "prefill_tokens",
    "recomputed_tokens",
}
BATCH_SIZE_KEYS = {
    "allocator",
    "label",
    "rate",
    "kv_slots",
    "window_s",
    "mean_batch_size",
    "mean_waiting",
    "requests_arrived",
    "requests_finished",
    "throughput_rps",
    "mean_step_s",
    "preemptions",
    "prefill_tokens",
    "recomputed_tokens",
}
SHARING_KEYS = {
    "workload",
    "mode",
    "width",
    "rate",
    "kv_slots",
    "window_s",
    "saving",
    "saving_of_totals",
    "mean_blocks_used",
    "mean_blocks_unshared",
    "mean_batch_size",
    "mean_seqs",
    "max_seqs",
    "mean_waiting",
    "mean_step_s",
    "cow_copies",
    "preemptions",
    "prompt_block_share",
}
SHARED_PREFIX_KEYS = {
    "part",
    "prefix_len",
    "allocator",
    "label",
    "prefix_caching",
    "requests",
    "kv_slots",
    "steps",
    "duration_s",
    "throughput_rps",
    "throughput_vs_orca_oracle",
    "mean_batch_size",
    "peak_blocks",
    "mean_blocks",
    "blocks_per_request",
    "prefill_tokens",
    "prefill_tokens_per_request",
    "prefix_hit_rate",
    "preemptions",
}
CURVE_KEYS = {"part", "prefix_len", "system", "workload"}
# the throughput part (Fig. 16): a point, and a summary per curve
SHARED_PREFIX_RATE_KEYS = {
    "rate": CURVE_KEYS
    | {"rate", "normalized_latency", "throughput", "mean_batch_size"},
    "max_rate": CURVE_KEYS
    | {"max_rate", "max_rate_vs_orca_oracle", "paper_vs_orca_oracle"},
}
MODULES = {
    "memory-waste": memory_waste,
    "batch-size": batch_size,
    "sharing": sharing,
    "shared-prefix": shared_prefix,
}
KEYS = {
    "memory-waste": MEMORY_WASTE_KEYS,
    "batch-size": BATCH_SIZE_KEYS,
    "sharing": SHARING_KEYS,
    "shared-prefix": SHARED_PREFIX_KEYS,
}


@pytest.fixture(scope="module")
def results():
    return {
        name: module.run("small", seed=0, progress=False)
        for name, module in MODULES.items()
    }


@pytest.mark.parametrize("name", list(MODULES))
def test_rows_have_the_documented_keys(results, name):
    result = results[name]
    assert result.experiment == name and result.rows
    for row in result.rows:
        # shared-prefix's rate part
        keys = SHARED_PREFIX_RATE_KEYS.get(row.get("part"), KEYS[name])
        assert set(row) == keys, set(row) ^ keys
    assert (
        result.paper["section"] and result.paper["figure"] and result.paper["finding"]
    )
    # plain JSON values, no NaN left behind
    json.dumps(result.to_json(), allow_nan=False)


def test_memory_waste_shares_sum_to_one_and_paged_wastes_least(results):
    rows = {r["allocator"]: r for r in results["memory-waste"].rows}
    assert list(rows) == ["orca-max", "orca-pow2", "orca-oracle", "vattention", "paged"]
    for r in rows.values():
        assert all(0.0 <= r[k] <= 1.0 for k in USED + POOL)
        assert math.isclose(sum(r[k] for k in USED), 1.0) and math.isclose(
            sum(r[k] for k in POOL), 1.0
        )
        # the pool also counts the free slots
        assert r["pool_token_states"] <= r["token_states"] + 1e-9
    paged = rows["paged"]["token_states"]
    assert paged > 0.9 and all(
        paged > rows[a]["token_states"]
        for a in ("orca-max", "orca-pow2", "orca-oracle")
    )
    # on demand: nothing reserved, no external fragmentation
    for name in ("paged", "vattention"):
        assert rows[name]["reserved"] == rows[name]["external_fragmentation"] == 0.0
        # free pages are stranded only while a request waits; in this short run both keep up and
        # never wait (the documented run has stranded pages: test_experiment_docs.py checks them)
        assert rows[name]["stranded"] == 0.0 or rows[name]["mean_waiting"] > 0.0
    # Oracle reserves the true length in a buddy block: the rounding up to a power of two (less than
    # half the block) and the never-stored last token's slot are never used
    assert 0.01 < rows["orca-oracle"]["internal_fragmentation"] < 0.5
    # prefill_tokens counts the recomputed ones; only preemption recomputes
    for name, r in rows.items():
        assert 0 <= r["recomputed_tokens"] < r["prefill_tokens"]
        assert (r["recomputed_tokens"] > 0) == (r["preemptions"] > 0), name
    # 15,000 // 2,048: see the exercise
    assert rows["orca-max"]["mean_batch_size"] == 7.0
    assert "goal: paged token states >= 96%" in memory_waste.goal_line(
        results["memory-waste"].rows
    )


def test_batch_size_orders_the_allocators(results):
    rows = results["batch-size"].rows
    for r in rows:
        assert r["throughput_rps"] == pytest.approx(
            r["requests_finished"] / r["window_s"]
        )
        assert r["mean_batch_size"] > 0 and r["requests_finished"] > 0
    at = {r["allocator"]: r for r in rows if r["rate"] == 2.0}
    batch = [at[a]["mean_batch_size"] for a in ("orca-max", "orca-oracle", "paged")]
    assert batch == sorted(batch) and batch[-1] > 2 * batch[0]
    assert (
        at["paged"]["throughput_rps"]
        > at["orca-oracle"]["throughput_rps"]
        > at["orca-max"]["throughput_rps"]
    )
    assert at["orca-max"]["mean_waiting"] > 10, (
        "the budget must put the baselines under memory pressure"
    )


def test_memory_waste_and_batch_size_replay_the_same_requests(results):
    keys = ("mean_batch_size", "mean_step_s")
    waste = {r["allocator"]: [r[k] for k in keys] for r in results["memory-waste"].rows}
    batch = {
        r["allocator"]: [r[k] for k in keys]
        for r in results["batch-size"].rows
        if r["rate"] == 2.0
    }
    assert waste == batch


def test_sharing_saves_more_with_beams(results):
    rows = results["sharing"].rows
    assert {r["workload"] for r in rows} == {"alpaca-like", "sharegpt-like"}
    by = {(r["workload"], r["mode"], r["width"]): r for r in rows}
    for r in rows:
        assert 0.0 < r["saving"] < 1.0 and 0.0 < r["saving_of_totals"] < 1.0
        assert r["mean_blocks_unshared"] > r["mean_blocks_used"] > 0
        assert r["mean_seqs"] == pytest.approx(
            r["width"] * r["mean_batch_size"], rel=0.25
        )
        # the scheduler's budget (simulate's max_num_seqs, 256) holds at every step, beam searches
        # included: a group counts the width it forks into from its admission on
        assert 0 < r["mean_seqs"] <= r["max_seqs"] <= MAX_NUM_SEQS, r
    for workload in ("alpaca-like", "sharegpt-like"):
        for width in sharing.WIDTHS:
            assert (
                by[workload, "beam", width]["saving"]
                > by[workload, "parallel", width]["saving"]
            )
            assert by[workload, "beam", width]["cow_copies"] > 0


def test_prompt_block_share_counts_blocks_step_by_step():
    """The closed form equals the step-by-step count: a (20, 3) request holds 2 blocks at each of its
    3 steps (20 to 22 tokens), 1 of them a full prompt block; a (40, 10) one holds 3 blocks at 9 steps
    (40 to 48 tokens) and 4 at the last (49), 2 of them full prompt blocks."""
    reqs = [Request("a", 0.0, 20, 3), Request("b", 0.0, 40, 10)]
    assert sharing.prompt_block_share(reqs) == pytest.approx(
        (1 * 3 + 2 * 10) / (2 * 3 + 3 * 9 + 4)
    )


def test_prefix_caching_saves_blocks_and_prefill(results):
    rows = [r for r in results["shared-prefix"].rows if r["part"] == "memory"]
    for prefix_len in shared_prefix.PREFIX_LENS:
        by = {
            (r["allocator"], r["prefix_caching"]): r
            for r in rows
            if r["prefix_len"] == prefix_len
        }
        oracle, off, on = (
            by["orca-oracle", False],
            by["paged", False],
            by["paged", True],
        )
        assert oracle["throughput_vs_orca_oracle"] == 1.0
        assert (
            on["prefill_tokens"] < off["prefill_tokens"]
            and on["blocks_per_request"] < off["blocks_per_request"]
        )
        assert on["throughput_rps"] > off["throughput_rps"] >= oracle["throughput_rps"]
        assert (
            0.0 < on["prefix_hit_rate"] <= 1.0
            and off["prefix_hit_rate"] == oracle["prefix_hit_rate"] == 0.0
        )
        assert on["peak_blocks"] <= KV_SLOTS / 16
    long = {
        r["label"]: r["throughput_vs_orca_oracle"]
        for r in rows
        if r["prefix_len"] == 341
    }
    short = {
        r["label"]: r["throughput_vs_orca_oracle"]
        for r in rows
        if r["prefix_len"] == 80
    }
    assert long["paged + prefix caching"] > short["paged + prefix caching"], (
        "a longer prefix saves more"
    )


def test_shared_prefix_rate_part_rises_with_rate_and_vllm_sustains_more(results):
    """Fig. 16: every curve's latency rises with the rate; vLLM with prefix caching sustains at least
    Orca (Oracle)'s rate behind each prefix, more behind the longer one; the ratios sit beside the paper's."""
    rows = results["shared-prefix"].rows
    assert {r["part"] for r in rows} == {"memory", "rate", "max_rate"}
    # LLaMA-13B, A100-40GB, 0.9 of memory
    assert results["shared-prefix"].settings["kv_slots"] == 15_409
    summary = {
        (r["prefix_len"], r["system"]): r for r in rows if r["part"] == "max_rate"
    }
    assert len(summary) == len(shared_prefix.PREFIX_LENS) * len(
        shared_prefix.RATE_SYSTEMS
    )
    for (prefix_len, system), s in summary.items():
        mine = [
            r
            for r in rows
            if r["part"] == "rate"
            and (r["prefix_len"], r["system"]) == (prefix_len, system)
        ]
        curve = sorted((r["rate"], r["normalized_latency"]) for r in mine)
        latencies = [lat for _, lat in curve]
        assert all(b >= a for a, b in itertools.pairwise(latencies)), (
            prefix_len,
            system,
            curve,
        )
        assert latencies[-1] > 0.1 > latencies[0] > 0, "each curve shows its knee"
        assert s["max_rate"] in [rate for rate, _ in curve]
    for prefix_len in shared_prefix.PREFIX_LENS:
        vllm, oracle = summary[prefix_len, "vLLM"], summary[prefix_len, "Orca (Oracle)"]
        assert vllm["max_rate"] >= oracle["max_rate"] > 0, prefix_len
        assert vllm["max_rate_vs_orca_oracle"] == vllm["max_rate"] / oracle["max_rate"]
        paper = shared_prefix.PAPER["throughput_vs_orca_oracle"][str(prefix_len)]
        assert vllm["paper_vs_orca_oracle"] == paper
        assert (
            oracle["max_rate_vs_orca_oracle"] == oracle["paper_vs_orca_oracle"] == 1.0
        )
    assert (
        summary[341, "vLLM"]["max_rate_vs_orca_oracle"]
        > summary[80, "vLLM"]["max_rate_vs_orca_oracle"]
    )


def test_same_seed_same_rows_another_seed_differs(results):
    assert (
        shared_prefix.run("small", seed=0, progress=False).rows
        == results["shared-prefix"].rows
    )
    assert (
        shared_prefix.run("small", seed=1, progress=False).rows
        != results["shared-prefix"].rows
    )
    assert (
        memory_waste.run("small", seed=0, progress=False).rows
        == results["memory-waste"].rows
    )


@pytest.mark.parametrize("module", list(MODULES.values()))
def test_run_refuses_bad_arguments(module):
    with pytest.raises(ValueError, match="scale must be 'small' or 'full'"):
        module.run("medium", progress=False)
    with pytest.raises(ValueError, match="seed"):
        module.run("small", seed=-1, progress=False)
    assert set(module.SCALES) == {"small", "full"}


def test_plots_are_pngs(results, tmp_path):
    for name, module in MODULES.items():
        path = tmp_path / f"{name}.png"
        module.plot(results[name], path)
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name


def test_cli_runs_memory_waste(tmp_path, capsys):
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    argv = [
        "experiment",
        "memory-waste",
        "--scale",
        "small",
        "--no-progress",
        "--json",
        str(out),
        "--plot",
        str(png),
    ]
    assert cli.main(argv) == 0
    data = json.loads(out.read_text())
    assert (
        set(data) == {"experiment", "rows", "paper", "settings"}
        and data["experiment"] == "memory-waste"
    )
    assert [set(r) for r in data["rows"]] == [MEMORY_WASTE_KEYS] * 5
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert "Orca (Oracle)" in capsys.readouterr().out


# ---- the simulator's counters the experiments are built on ----------------------------------------


def test_step_counters_add_up():
    reqs = [Request(f"r{i}", 0.1 * i, 30 + 7 * i, 20 + 3 * i) for i in range(12)]
    for allocator in ("paged", "orca-oracle"):
        result = simulate(reqs, allocator, kv_slots=1024, max_model_len=512)
        assert sum(r.num_finished for r in result.records) == result.num_finished == 12
        assert sum(r.num_preempted for r in result.records) == result.num_preemptions
        # more if preempted
        assert result.prefill_tokens >= sum(r.prompt_len for r in reqs)
        if not result.num_preemptions:
            assert result.prefill_tokens == sum(r.prompt_len for r in reqs)
        assert math.isclose(sum(result.mean_used_fractions.values()), 1.0)
        assert result.throughput == pytest.approx(12 / result.duration)
        half = result.window(
            result.records[0].time, result.records[len(result.records) // 2].time
        )
        assert half.steps == len(result.records) // 2 and half.num_finished < 12


def test_window_leaves_out_the_warmup():
    """serve() prices each step with the cost model and keeps the steps that start in [warmup, end):
    they follow one another without a gap (the pool is never idle at 2 requests/s) and cover the
    window to within a step."""
    workload = sharegpt_load(2.0, 60.0, seed=0)
    later = serve(workload, "paged", 60.0, 20.0)
    whole = serve(workload, "paged", 60.0, 0.0)
    records = later.records
    assert all(20.0 <= r.time < 60.0 for r in records)
    # the first step from 20 s
    assert records[0].time - 20.0 < max(r.duration for r in whole.records)
    assert all(
        b.time == pytest.approx(a.time + a.duration)
        for a, b in itertools.pairwise(records)
    )
    assert sum(r.duration for r in records) == pytest.approx(
        40.0, abs=max(r.duration for r in records)
    )
    # priced by the cost model, not a fixed step
    assert len({r.duration for r in records}) > 1
    first = records[0]  # the cost model's price, as the runner asked it
    assert (
        first.duration
        >= COST_MODEL.step_overhead
        + COST_MODEL.model.weight_bytes / COST_MODEL.bytes_per_s
    )
    assert (
        later.num_finished == sum(r.num_finished for r in records) < whole.num_finished
    )


# ---- the docs pages' exercises ---------------------------------------------------------------------


def test_exercise_memory_waste_page(results):
    """docs/experiments/memory-waste.md: Orca (Max) runs 15,000 // 2,048 = 7 requests; the 664 slots
    left can never hold an 8th range, so while requests wait they are stranded (not external
    fragmentation: together they would not hold the head), 664 / 15,000 = 4.4% of the pool."""
    max_row = next(
        r for r in results["memory-waste"].rows if r["allocator"] == "orca-max"
    )
    assert max_row["mean_batch_size"] == KV_SLOTS // 2048 == 7
    assert max_row["mean_waiting"] > 10  # requests wait at every step of the window ...
    # ... 664 slots
    assert max_row["pool_stranded"] == pytest.approx((KV_SLOTS - 7 * 2048) / KV_SLOTS)
    assert max_row["pool_external_fragmentation"] == max_row["pool_free"] == 0.0
    # the share of the memory in use: the whole pool
    assert round(100 * max_row["stranded"], 1) == 4.4


def test_exercise_batch_size_page(results):
    """docs/experiments/batch-size.md: Little's law, batch = rate x output_len x the mean step time
    (the row's mean_step_s, priced by the cost model), while paged keeps up (1 request/s)."""
    mean_output = sharegpt_load(
        1.0, batch_size.SCALES["small"].end, seed=0
    ).mean_output_len
    paged = next(
        r
        for r in results["batch-size"].rows
        if r["rate"] == 1.0 and r["allocator"] == "paged"
    )
    assert paged["mean_waiting"] < 1.0
    # an OPT-13B decode step on an A100: tens of ms
    assert 0.02 < paged["mean_step_s"] < 0.04
    assert paged["mean_batch_size"] == pytest.approx(
        1.0 * mean_output * paged["mean_step_s"], rel=0.15
    )


def test_exercise_sharing_page():
    """docs/experiments/sharing.md: a 20-token prompt, n = 4, 60 output tokens, blocks of 16."""
    result = simulate([Request("a", 0.0, 20, 60, n=4)], kv_slots=4096)
    first, last = result.records[0], result.records[-1]
    # the prompt's 2 blocks, 4 tables
    assert (first.blocks_used, first.blocks_saved_by_sharing) == (2, 6)
    # 15% saved at the end
    assert (last.blocks_used, last.blocks_saved_by_sharing) == (17, 3)
    # the prompt's partial block, copied by 3 of the 4 samples
    assert result.cow_copies == 3


def test_exercise_shared_prefix_page():
    """docs/experiments/shared-prefix.md: behind a 341-token prefix, 21 blocks are found cached."""
    first, second = shared_prefix_workload(2, 341, seed=0)
    result = simulate([first, second], kv_slots=KV_SLOTS, enable_prefix_caching=True)
    assert result.prefix_cache_hits == 21 == 341 // 16
    assert result.prefill_tokens == first.prompt_len + second.prompt_len - 21 * 16
