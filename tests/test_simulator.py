"""The null-model memory simulator: PagedAttention (the real scheduler and block manager) and the
baselines on one pool. Workloads are built here (a small Request-like dataclass), so these tests do
not depend on minipaged.workloads.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import pytest

from minipaged.experiments import simulator
from minipaged.experiments.memory_breakdown import BREAKDOWN_FIELDS, MemoryBreakdown
from minipaged.experiments.simulator import ALLOCATORS, simulate
from minipaged.reference.memory_stats import pool_stats


@dataclass(frozen=True)
class Req:
    request_id: str
    arrival_time: float
    prompt_len: int
    output_len: int
    prefix_len: int = 0
    prefix_id: int = 0
    n: int = 1
    beam_width: int = 0


def sharegpt_toy(
    num: int, seed: int = 0, rate: float = 4.0, max_model_len: int = 1024
) -> list[Req]:
    """ShareGPT-shaped: long-tailed prompts and outputs (log-normal), Poisson arrivals."""
    rng, t, reqs = random.Random(seed), 0.0, []
    for i in range(num):
        t += rng.expovariate(rate)
        prompt = min(
            max_model_len - 1, max(1, round(rng.lognormvariate(math.log(120), 0.8)))
        )
        output = min(
            max_model_len - prompt,
            max(1, round(rng.lognormvariate(math.log(200), 0.9))),
        )
        reqs.append(Req(f"r{i}", t, prompt, output))
    return reqs


def fixed(lens, gap: float = 0.0, **fields) -> list[Req]:
    """Requests of the given (prompt_len, output_len), one every `gap` seconds."""
    return [Req(f"r{i}", i * gap, p, o, **fields) for i, (p, o) in enumerate(lens)]


WORKLOAD = sharegpt_toy(150)
KV_SLOTS = 8192


@pytest.fixture(scope="module")
def runs():
    runs = {
        name: simulate(WORKLOAD, name, kv_slots=KV_SLOTS, max_model_len=1024)
        for name in ALLOCATORS
    }
    # the Orca baselines as first fit places them
    for name in ("orca-max", "orca-pow2", "orca-oracle"):
        runs[f"{name}/first-fit"] = simulate(
            WORKLOAD, name, kv_slots=KV_SLOTS, max_model_len=1024, placement="first-fit"
        )
    return runs


def test_every_request_finishes(runs):
    for name, result in runs.items():
        assert result.num_finished == result.num_requests == len(WORKLOAD), name


def test_breakdown_sums_to_capacity_every_step(runs):
    for name, result in runs.items():
        for r in result.records:
            assert r.breakdown.capacity == result.capacity, (name, r.step)
            assert all(getattr(r.breakdown, f) >= 0 for f in BREAKDOWN_FIELDS), (
                name,
                r,
            )
        assert math.isclose(sum(result.mean_fractions.values()), 1.0)


def test_each_allocator_wastes_what_it_should(runs):
    # on demand: nothing reserved ahead, no external fragmentation
    for name in ("paged", "vattention"):
        assert all(
            r.breakdown.reserved == r.breakdown.external_fragmentation == 0
            for r in runs[name].records
        )
    # Oracle reserves the true length; the last token is never stored, so one slot per range is left
    first_fit = runs["orca-oracle/first-fit"].records
    assert all(r.breakdown.internal_fragmentation == r.num_seqs for r in first_fit)
    # ... and a buddy block rounds the range up to a power of two: more is left
    buddy = runs["orca-oracle"].records
    assert all(r.breakdown.internal_fragmentation >= r.num_seqs for r in buddy)
    assert sum(r.breakdown.internal_fragmentation for r in buddy) > 10 * sum(
        r.num_seqs for r in buddy
    )
    for name in ("orca-max", "orca-pow2", "orca-oracle"):
        for r in runs[name].records:
            # all at their last token
            assert r.breakdown.reserved > 0 or r.num_running == r.num_finished
    # one rule for all: free slots are waste only while one waits
    for result in runs.values():
        for r in result.records:
            b = r.breakdown
            if b.external_fragmentation or b.stranded:
                assert (
                    r.num_waiting
                    and b.free == 0
                    and not (b.external_fragmentation and b.stranded)
                )
    # requests wait with memory free
    for name in ("paged", "vattention", "orca-pow2", "orca-oracle"):
        assert any(r.breakdown.stranded for r in runs[name].records), name
    # ... and, for ranges only, with enough of it in holes
    for name in ("orca-pow2", "orca-oracle"):
        assert any(r.breakdown.external_fragmentation for r in runs[name].records), name
    # A paged sequence wastes less than a block: at most block_size - 1 slots each.
    assert all(
        r.breakdown.internal_fragmentation <= 15 * r.num_seqs
        for r in runs["paged"].records
    )


def test_paged_free_blocks_are_stranded_while_the_head_waits():
    """4 blocks of 16: A's 40-token prompt takes 3, B's 20-token prompt needs 2 and waits: the free
    block is stranded (never external fragmentation: any block would serve B, there are too few)."""
    result = simulate(fixed([(40, 10), (20, 5)]), kv_slots=64, watermark=0.0)
    first = result.records[0].breakdown
    assert (first.token_states, first.internal_fragmentation) == (40, 8)
    assert (first.external_fragmentation, first.stranded, first.free) == (0, 16, 0)
    assert result.records[0].num_waiting == 1
    # B runs alone at the end: nothing waits, its free slots are free
    last = result.records[-1].breakdown
    assert last.stranded == 0 and last.free > 0


def test_paged_uses_memory_far_better_than_orca(runs):
    u = {name: result.mean_utilization for name, result in runs.items()}
    assert u["paged"] > 0.9
    assert u["orca-max"] < 0.5
    assert u["orca-max"] < u["orca-pow2"] < u["orca-oracle"] < u["paged"]
    assert u["vattention"] < u["paged"]  # its pages are 204 tokens: a large tail each
    assert runs["paged"].mean_batch_size > 2 * runs["orca-max"].mean_batch_size
    assert runs["paged"].steps < runs["orca-max"].steps


def test_summary_is_plain_data(runs):
    summary = runs["paged"].summary()
    assert summary["finished"] == len(WORKLOAD) and summary["allocator"] == "paged"
    assert all(isinstance(v, (int, float, str)) for v in summary.values())
    assert summary["fraction_token_states"] == pytest.approx(
        runs["paged"].mean_token_fraction
    )


def test_requests_start_after_they_arrive():
    reqs = fixed([(20, 5), (20, 5)], gap=10.0)
    result = simulate(reqs, kv_slots=1024, step_time=0.5)
    times = [r.time for r in result.records if r.num_running]
    # 5 steps, then the clock jumps to the next arrival
    assert times[0] == 0.0 and times[5] == 10.0
    assert len(result.records) == 10


def beams_and_samples(seed_offset: int = 0) -> list[Req]:
    lens = [(40 + 7 * i, 30 + 11 * i) for i in range(8)]
    return [
        replace(r, n=2) if i % 2 else replace(r, beam_width=3)
        for i, r in enumerate(fixed(lens, gap=0.05))
    ]


def test_same_seed_same_records_and_another_seed_differs():
    a = simulate(beams_and_samples(), kv_slots=2048, seed=1)
    b = simulate(beams_and_samples(), kv_slots=2048, seed=1)
    c = simulate(beams_and_samples(), kv_slots=2048, seed=2)
    assert a.records == b.records
    assert a.records != c.records  # the seed drives the null beam policy's parents


@pytest.mark.parametrize(
    "allocator", ["orca-max", "orca-pow2", "orca-oracle", "vattention"]
)
def test_baselines_are_deterministic(allocator):
    """The baselines draw nothing: the same workload gives the same records, whatever the seed;
    a workload drawn with another seed gives others."""
    reqs = sharegpt_toy(60, seed=3, rate=8.0)
    a = simulate(reqs, allocator, kv_slots=4096, max_model_len=1024, seed=1)
    b = simulate(reqs, allocator, kv_slots=4096, max_model_len=1024, seed=2)
    assert a.records == b.records and a.num_preemptions == b.num_preemptions
    assert (
        simulate(
            sharegpt_toy(60, seed=4, rate=8.0),
            allocator,
            kv_slots=4096,
            max_model_len=1024,
        ).records
        != a.records
    )


def test_recomputed_tokens_are_counted():
    """A preemption by recompute computes the victim's prompt and generated tokens again: paged
    and vAttention count them apart from the fresh prefill (the null model charges no time for them)."""
    for allocator, kwargs in [
        ("paged", dict(block_size=16)),
        ("vattention", dict(page_tokens=64)),
    ]:
        result = simulate(
            fixed([(10, 300)] * 6),
            allocator,
            kv_slots=1024,
            max_model_len=512,
            **kwargs,
        )
        assert result.num_preemptions > 0 and result.recomputed_tokens > 0
        fresh = result.prefill_tokens - result.recomputed_tokens
        assert fresh == 6 * 10  # every prompt once; the rest is recomputation
        assert result.summary()["recomputed_tokens"] == result.recomputed_tokens
    assert (
        simulate(fixed([(10, 30)] * 2), "orca-max", kv_slots=4096).recomputed_tokens
        == 0
    )


def test_parallel_samples_share_their_prompt_blocks():
    """n=2 holds what two n=1 copies would hold, minus the shared prompt blocks (no contention)."""
    one = simulate(fixed([(37, 20), (50, 9), (16, 30)], gap=0.2), kv_slots=4096)
    two = simulate(fixed([(37, 20), (50, 9), (16, 30)], gap=0.2, n=2), kv_slots=4096)
    assert len(one.records) == len(two.records)
    for r1, r2 in zip(one.records, two.records, strict=True):
        assert r2.blocks_used + r2.blocks_saved_by_sharing == 2 * r1.blocks_used
        assert r2.blocks_used < 2 * r1.blocks_used
    assert two.max_blocks_saved_by_sharing > 0 and one.max_blocks_saved_by_sharing == 0


def test_beam_search_saves_more_than_parallel_sampling():
    base = fixed([(30 + 5 * i, 60 + 9 * i) for i in range(6)], gap=0.1)
    sampling = simulate([replace(r, n=4) for r in base], kv_slots=8192)
    beams = simulate([replace(r, beam_width=4) for r in base], kv_slots=8192)
    assert sampling.num_finished == beams.num_finished == len(base)
    assert beams.mean_sharing_saving > sampling.mean_sharing_saving > 0
    assert beams.cow_copies > 0


def test_prefix_caching_cuts_allocated_blocks():
    reqs = [Req(f"r{i}", 0.0, 64 + 3 + i % 5, 10, prefix_len=64) for i in range(20)]
    off = simulate(reqs, kv_slots=4096)
    on = simulate(reqs, kv_slots=4096, enable_prefix_caching=True)
    assert on.num_finished == off.num_finished == 20
    # every request after the first finds the 4 prefix blocks
    assert on.prefix_cache_hits >= 19 * 4
    assert max(r.blocks_used for r in on.records) < max(
        r.blocks_used for r in off.records
    )
    assert on.mean_sharing_saving > 0.5


def test_quick_memory_count_matches_pool_stats(monkeypatch):
    """The simulator's O(sequences) count equals pool_stats under sharing, prefix hits and preemption."""
    calls = []

    def checked(manager, scheduler):
        breakdown, used, saved = quick_count(manager, scheduler)
        stats = pool_stats(manager.device, manager.device_tables, manager.block_size)
        assert (breakdown.token_states, used, saved) == (
            stats.slots_used,
            stats.num_used,
            stats.blocks_saved_by_sharing,
        )
        assert breakdown.internal_fragmentation == stats.internal_waste
        calls.append(saved)
        return breakdown, used, saved

    quick_count = simulator._paged_breakdown
    monkeypatch.setattr(simulator, "_paged_breakdown", checked)
    reqs = beams_and_samples() + [
        Req(f"p{i}", 0.1 * i, 40 + i, 20, prefix_len=32) for i in range(6)
    ]
    for mode in ("recompute", "swap"):
        result = simulate(
            reqs,
            kv_slots=640,
            block_size=8,
            preemption_mode=mode,
            enable_prefix_caching=True,
        )
        assert result.num_finished == len(reqs) and result.num_preemptions > 0
    assert len(calls) > 100


def test_vattention_preempts_when_pages_run_out():
    result = simulate(
        fixed([(10, 300)] * 6),
        "vattention",
        kv_slots=1024,
        page_tokens=64,
        max_model_len=512,
    )
    assert result.num_finished == 6 and result.num_preemptions > 0


def test_max_steps_stops_early():
    result = simulate(WORKLOAD, kv_slots=KV_SLOTS, max_model_len=1024, max_steps=20)
    assert result.steps == 20 and result.num_finished < len(WORKLOAD)


def test_progress_bar_runs():
    assert simulate(fixed([(8, 4)]), kv_slots=64, progress=True).num_finished == 1


def test_paged_run_matches_the_engine_block_for_block():
    """The simulator drives the real scheduler as LLM.step does: same blocks every step, preemption too."""
    from minipaged import LLM, SamplingParams

    # (prompt, output, n)
    lens = [(9, 12, 1), (5, 20, 2), (14, 6, 1), (3, 15, 2), (7, 9, 1)]
    llm = LLM("tiny-llama", block_size=4, num_gpu_blocks=20, max_model_len=64)
    for p, o, n in lens:
        params = SamplingParams(n=n, temperature=1.0, max_tokens=o, ignore_eos=True)
        llm.add_request(
            {"prompt_token_ids": list(range(3, 3 + p))}, params, arrival_time=0.0
        )
    # (request id, tokens of each sample), in the order the engine finished them
    finished_by_engine = []
    while llm.has_unfinished_requests():
        finished_by_engine += [
            (o.request_id, [len(c.token_ids) for c in o.outputs]) for o in llm.step()
        ]
    reqs = [Req(str(i), 0.0, p, o, n=n) for i, (p, o, n) in enumerate(lens)]
    result = simulate(reqs, kv_slots=20 * 4, block_size=4, max_model_len=64)
    assert [s.blocks_used for s in llm.step_stats] == [
        r.blocks_used for r in result.records
    ]
    assert [s.num_running for s in llm.step_stats] == [
        r.num_running for r in result.records
    ]
    # the same admissions (prefill tokens) and preemptions, step by step
    assert [s.num_prefill_tokens for s in llm.step_stats] == [
        r.num_prefill_tokens for r in result.records
    ]
    assert [len(s.preempted) for s in llm.step_stats] == [
        r.num_preempted for r in result.records
    ]
    assert sum(llm.stats.num_preemptions.values()) == result.num_preemptions > 0
    # ... and the same lengths: the requests finish in the same order, at the same lengths
    assert [request_id for request_id, _ in finished_by_engine] == [
        f.request_id for f in result.finished
    ]
    for (request_id, samples), f in zip(
        finished_by_engine, result.finished, strict=True
    ):
        assert samples == [f.output_len] * lens[int(request_id)][2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(allocator="best-fit"), "allocator"),
        (dict(step_time=0), "step_time"),
        (dict(max_steps=-1), "max_steps"),
        (dict(allocator="orca-oracle", preemption_mode="evict"), "preemption_mode"),
        (
            dict(kv_slots=8),
            "kv_slots must hold at least one block of block_size=16 slots, got 8",
        ),
        (dict(block_size=0), "block_size must be a positive int, got 0"),
        (dict(kv_slots=0), "kv_slots must be a positive int, got 0"),
        (
            dict(allocator="orca-max", kv_slots=0),
            "kv_slots must be a positive int, got 0",
        ),
        (dict(allocator="orca-max", kv_slots=1000), "can never fit"),
        (
            dict(allocator="vattention", page_tokens=4096),
            "one page of page_tokens=4096 slots, got 1024",
        ),
        (
            dict(allocator="vattention", kv_slots=100),
            "kv_slots must hold at least one page",
        ),
        (
            dict(allocator="orca-max", preemption_mode="swap"),
            "preemption_mode='swap' needs allocator 'paged'",
        ),
        (
            dict(allocator="vattention", preemption_mode="swap"),
            "preemption_mode='swap' needs allocator",
        ),
        (
            dict(allocator="orca-oracle", enable_prefix_caching=True),
            "enable_prefix_caching=True needs",
        ),
        (
            dict(allocator="vattention", enable_prefix_caching=True),
            "enable_prefix_caching=True needs",
        ),
        (
            dict(allocator="orca-oracle", enable_chunked_prefill=True),
            "enable_chunked_prefill=True needs allocator 'paged'",
        ),
    ],
)
def test_bad_settings_raise_naming_them(kwargs, match):
    kwargs = {"kv_slots": 1024, **kwargs}
    with pytest.raises(ValueError, match=match):
        simulate(fixed([(8, 4)]), **kwargs)


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_requests_that_can_never_run_are_refused(allocator):
    with pytest.raises(ValueError, match="'r0'"):
        simulate(fixed([(1500, 600)]), allocator, kv_slots=8192)  # beyond max_model_len
    with pytest.raises(ValueError, match="n=2"):
        simulate(fixed([(8, 4)], n=2, beam_width=2), allocator, kv_slots=8192)


def test_duplicate_request_ids_are_refused():
    with pytest.raises(ValueError, match="unique"):
        simulate(fixed([(8, 4)]) * 2, kv_slots=1024)


def test_breakdown_fields_are_the_papers():
    assert MemoryBreakdown(1, 2, 3, 4, 5, 6).fractions() == pytest.approx(
        {"token_states": 1 / 21, "reserved": 2 / 21, "internal_fragmentation": 3 / 21,
         "external_fragmentation": 4 / 21, "stranded": 5 / 21, "free": 6 / 21}
    )  # fmt: skip
    assert MemoryBreakdown(1, 2, 3, 4, 5, 6).used == 15  # all but the free slots


def test_chunked_prefill_spreads_a_prompt_over_steps_and_counts_each_decode():
    """A 100-token prompt under a budget of 16 with another request decoding beside it: no step
    computes more than 16 tokens, the long prompt's tokens are all computed once, and every token
    but a request's first was decoded in a step that counted it (num_decodes)."""
    requests = fixed([(4, 40), (100, 5)], gap=0.05)
    result = simulate(
        requests, kv_slots=1024, max_model_len=512, step_time=0.01,
        max_num_seqs=4, max_num_batched_tokens=16, enable_chunked_prefill=True,
    )  # fmt: skip
    tokens = [r.num_prefill_tokens + r.num_decodes for r in result.records]
    assert max(tokens) <= 16 and result.prefill_tokens == 4 + 100
    assert sum(r.num_decodes for r in result.records) == (40 - 1) + (5 - 1)
    long = next(f for f in result.finished if f.request_id == "r1")
    # at least 100 / 15 steps of chunks (the other request decodes in each of them)
    assert long.first_token_time - long.arrival_time >= 7 * 0.01 - 1e-9
    whole = simulate(requests, kv_slots=1024, max_model_len=512, step_time=0.01)
    assert max(r.num_prefill_tokens for r in whole.records) == 100
