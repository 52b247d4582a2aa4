"""The baselines behind the scheduler's memory interface (experiments/reservation.py).

One Scheduler serves every system: these tests drive the real engine loop with a simulated runner
over a ReservationManager, and check that each baseline's rule (a range per sequence, reserved at
admission; nothing shared; no swap) holds step by step and that every slot comes back.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipaged import LLM, SamplingParams
from minipaged.experiments.baselines import ContiguousAllocator
from minipaged.experiments.reservation import RangeRequest, ReservationManager
from minipaged.experiments.simulated_runner import SimulatedRunner
from minipaged.experiments.simulator import ALLOCATORS, simulate
from minipaged.experiments.vattention import VAttentionAllocator
from minipaged.sampling import BeamSearchParams


def engine(allocator, max_model_len: int = 64) -> LLM:
    runner = SimulatedRunner(step_time=0.1, max_model_len=max_model_len, seed=1)
    return LLM(
        runner=runner,
        block_manager=ReservationManager(allocator),
        max_model_len=max_model_len,
    )


def greedy(max_tokens: int, n: int = 1) -> SamplingParams:
    return SamplingParams(n=n, temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def test_orca_max_reserves_max_model_len_per_sample_and_computes_each_prompt():
    alloc = ContiguousAllocator(256, "max", max_model_len=64, placement="first-fit")
    llm = engine(alloc)
    llm.add_request({"prompt_token_ids": list(range(1, 11))}, greedy(5, n=3))
    llm.step()
    assert sorted(alloc.range_of(f"0/{k}")[1] for k in range(3)) == [64, 64, 64]
    # no sharing: each sample computes the prompt
    assert llm.step_stats[0].num_batched_tokens == 30
    assert [alloc.num_tokens(f"0/{k}") for k in range(3)] == [10, 10, 10]
    llm.step()
    # the ranges grow together
    assert [alloc.num_tokens(f"0/{k}") for k in range(3)] == [11, 11, 11]
    while llm.has_unfinished_requests():
        llm.step()
    # the last sequence out returned every range
    assert alloc.free_extents == [(0, 256)]


def test_beam_search_keeps_its_ranges_and_forks_into_dropped_beams_ranges():
    alloc = ContiguousAllocator(512, "oracle", max_model_len=64, placement="first-fit")
    llm = engine(alloc)
    manager = llm.block_manager
    (out,) = llm.beam_search(
        {"prompt_token_ids": [1, 2, 3, 4]}, BeamSearchParams(3, 8, ignore_eos=True)
    )
    assert len(out.sequences) == 3
    assert manager.num_ranges == 0 and alloc.free_extents == [(0, 512)]
    # 3 ranges of 4 + 8, from admission on
    assert all(s.blocks_used == 3 * 12 for s in llm.step_stats)


def test_a_request_that_can_never_fit_is_refused_at_submission():
    llm = engine(ContiguousAllocator(100, "max", max_model_len=64))
    with pytest.raises(ValueError, match="can never fit"):
        llm.add_request({"prompt_token_ids": [1, 2]}, greedy(4, n=2))  # 2 x 64 > 100
    assert not llm.has_unfinished_requests()


def test_the_queue_waits_while_the_ranges_do_not_fit():
    alloc = ContiguousAllocator(150, "max", max_model_len=64, placement="first-fit")
    llm = engine(alloc)
    for _ in range(3):
        llm.add_request({"prompt_token_ids": [1, 2, 3]}, greedy(4))
    llm.step()
    # 22 slots are left
    assert (len(llm.scheduler.running), len(llm.scheduler.waiting)) == (2, 1)
    # too few for 64
    assert llm.block_manager.breakdown(llm.scheduler.waiting[0]).stranded == 22


def test_vattention_runs_short_of_pages_and_preempts_by_recompute():
    alloc = VAttentionAllocator(256, page_tokens=16, max_model_len=128, watermark=0.0)
    llm = engine(alloc, max_model_len=128)
    outs = llm.generate([{"prompt_token_ids": [1] * 8}] * 4, greedy(90), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 90 for o in outs)
    assert (
        llm.stats.num_preemptions["recompute"] > 0
        and llm.stats.num_preemptions["swap"] == 0
    )
    assert alloc.pages.num_free == alloc.pages.num_blocks


def test_a_second_fork_without_a_spare_range_is_refused():
    manager = ReservationManager(ContiguousAllocator(64, "oracle", max_model_len=64))
    from minipaged.sequence import Sequence, SequenceGroup

    parent = Sequence([1, 2, 3])
    group = SequenceGroup("g", [parent], max_seqs=1, max_tokens=4)
    manager.allocate(group)
    with pytest.raises(ValueError, match="every reserved range is in use"):
        manager.fork(parent, parent.fork())
    manager.free(parent)
    with pytest.raises(KeyError):
        manager.free(parent)


def test_static_batching_admits_a_batch_only_when_the_last_one_has_finished():
    """FasterTransformer's baseline: A and B form a batch; C, which arrives while they run and would
    fit at once, waits until both have finished (B, the longest, at step 8)."""
    runner = SimulatedRunner(step_time=1.0, max_model_len=64)
    llm = LLM(
        runner=runner,
        block_manager=ReservationManager(
            ContiguousAllocator(1024, "max", max_model_len=64)
        ),
        max_model_len=64,
        batching="static",
    )
    for max_tokens, arrival in ((3, 0.0), (8, 0.0), (2, 1.5)):
        llm.add_request(
            {"prompt_token_ids": [1, 2]}, greedy(max_tokens), arrival_time=arrival
        )
    outputs = {}
    while llm.has_unfinished_requests():
        outputs.update({o.request_id: o for o in llm.step()})
    # not 2.0, when it had arrived and fit
    assert outputs["2"].metrics.first_scheduled_time == 8.0
    assert [s.num_running for s in llm.step_stats] == [2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    iteration = simulate([Req("a", 0, 2, 3), Req("b", 0, 2, 8), Req("c", 1.5, 2, 2)], "orca-max",
                         kv_slots=1024, max_model_len=64, step_time=1.0)  # fmt: skip
    static = simulate([Req("a", 0, 2, 3), Req("b", 0, 2, 8), Req("c", 1.5, 2, 2)], "fastertransformer",
                      kv_slots=1024, max_model_len=64, step_time=1.0)  # fmt: skip
    assert {f.request_id: f.finished_time for f in iteration.finished}["c"] == 4.0
    assert {f.request_id: f.finished_time for f in static.finished}["c"] == 10.0


def test_range_request_is_what_the_allocators_reserve_by():
    alloc = ContiguousAllocator(1024, "pow2", max_model_len=512)
    assert alloc.reservation(RangeRequest("x/0", 10, 25)) == 10 + 32


@dataclass(frozen=True)
class Req:
    request_id: str
    arrival_time: float
    prompt_len: int
    output_len: int
    n: int = 1
    beam_width: int = 0


requests = st.lists(
    st.tuples(
        st.floats(0, 3),
        st.integers(1, 40),
        st.integers(1, 30),
        st.sampled_from([(1, 0), (2, 0), (0, 2), (0, 3)]),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=25, deadline=None)
@given(requests, st.sampled_from(ALLOCATORS))
def test_any_workload_finishes_and_returns_every_slot(reqs, allocator):
    workload = [
        Req(f"r{i}", t, p, o, n=max(n, 1), beam_width=w)
        for i, (t, p, o, (n, w)) in enumerate(reqs)
    ]
    result = simulate(
        workload,
        allocator,
        kv_slots=1024,
        block_size=8,
        page_tokens=32,
        max_model_len=128,
    )
    assert result.num_finished == len(workload)
    assert sorted(f.request_id for f in result.finished) == sorted(
        r.request_id for r in workload
    )
    for f in result.finished:
        assert f.arrival_time <= f.first_token_time <= f.finished_time
    for record in result.records:
        assert record.breakdown.capacity == result.capacity


def test_reserving_block_manager_admits_by_the_whole_reservation_on_a_real_model():
    """Orca (Max) on the real pool: 64-token reservations of 4-token blocks take 16 blocks each, so a
    40-block pool runs two requests at once although their tokens would fit many more; the tokens
    are the paged engine's, and every block comes back."""
    from minipaged.experiments.reservation import ReservingBlockManager

    prompts = [{"prompt_token_ids": list(range(3, 3 + p))} for p in (5, 9, 3, 7, 6)]
    params = greedy(6)
    paged = LLM("tiny-llama", block_size=4, num_gpu_blocks=40, max_model_len=64)
    manager = ReservingBlockManager(4, 40, "max", max_model_len=64)
    orca = LLM("tiny-llama", block_size=4, max_model_len=64, block_manager=manager)
    expected = paged.generate(prompts, params, use_tqdm=False)
    outs = orca.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [
        o.outputs[0].token_ids for o in expected
    ]
    assert (
        max(s.num_running for s in orca.step_stats)
        == 2
        < max(s.num_running for s in paged.step_stats)
    )
    assert manager.device.num_free == 40 and not manager._promised
    oracle = ReservingBlockManager(4, 40, "oracle", max_model_len=64)
    assert oracle.reserved_blocks(5, 6) == 3  # 11 slots
    with pytest.raises(ValueError, match="can never fit"):
        ReservingBlockManager(4, 8, "max", max_model_len=64).check_fits(5, 6, 1)
