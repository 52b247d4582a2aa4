"""The engine's clock and arrivals, and its runner: one loop for a real model and a simulated one.

A simulated runner (experiments/simulated_runner.py) computes no tensors: its steps take the time a
cost model or a fixed null step says, and the engine's clock runs on that time. Requests may
arrive in the future; they wait, unseen by the scheduler, until the clock reaches them.
"""

from __future__ import annotations

import pytest

from minipaged import LLM, SamplingParams
from minipaged.experiments.simulated_runner import NULL_VOCAB, SimulatedRunner
from minipaged.reference.scheduler import ScheduledSeq, SchedulerOutput
from minipaged.sampling import BeamSearchParams
from minipaged.sequence import Sequence, SequenceGroup

STEP = 0.25  # seconds per simulated step


def simulated(step_time: float = STEP, **kwargs) -> LLM:
    runner = SimulatedRunner(
        step_time=step_time, block_size=4, max_model_len=256, seed=3
    )
    return LLM(
        runner=runner,
        block_size=4,
        num_gpu_blocks=kwargs.pop("num_gpu_blocks", 64),
        **kwargs,
    )


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs
    )


def drain(llm: LLM) -> dict:
    outputs = {}
    while llm.has_unfinished_requests():
        for output in llm.step():
            outputs[output.request_id] = output
    return outputs


def test_simulated_clock_advances_by_step_times_and_jumps_idle_gaps():
    llm = simulated()
    a = llm.add_request({"prompt_token_ids": [5, 6, 7]}, greedy(3), arrival_time=1.0)
    b = llm.add_request({"prompt_token_ids": [8, 9]}, greedy(2), arrival_time=10.0)
    assert llm.now() == 0.0 and llm.has_unfinished_requests()
    # both are in the future: the scheduler sees neither
    assert not llm.scheduler.has_unfinished()
    outputs = drain(llm)
    ma, mb = outputs[a].metrics, outputs[b].metrics
    # a: the clock jumps to 1.0, then 3 steps (prefill + 2 decodes) of 0.25 s each
    assert (ma.arrival_time, ma.first_scheduled_time, ma.first_token_time) == (
        1.0,
        1.0,
        1.25,
    )
    assert ma.finished_time == pytest.approx(1.75) and ma.latency == pytest.approx(0.75)
    # idle from 1.75 to 10.0: the clock jumps again; no step is run in the gap
    assert (mb.first_scheduled_time, mb.finished_time) == (10.0, pytest.approx(10.5))
    assert [s.time for s in llm.step_stats] == pytest.approx(
        [1.0, 1.25, 1.5, 10.0, 10.25]
    )
    assert all(s.duration == STEP for s in llm.step_stats)
    assert llm.now() == pytest.approx(10.5)


def test_a_request_waits_until_its_arrival_even_when_others_run():
    llm = simulated()
    early = llm.add_request({"prompt_token_ids": [1, 2]}, greedy(8), arrival_time=0.0)
    late = llm.add_request({"prompt_token_ids": [3, 4]}, greedy(2), arrival_time=0.6)
    outputs = drain(llm)
    # steps start at 0, .25, .5, .75: the late request joins the step that starts after 0.6
    assert outputs[late].metrics.first_scheduled_time == pytest.approx(0.75)
    assert outputs[early].metrics.first_scheduled_time == 0.0
    assert [s.num_running for s in llm.step_stats[:5]] == [1, 1, 1, 2, 2]


def test_requests_end_at_max_tokens_under_the_null_policy():
    llm = simulated()
    outs = llm.generate(
        [{"prompt_token_ids": list(range(1, 1 + p))} for p in (3, 9, 17)],
        [greedy(m, n=n) for m, n in ((4, 1), (7, 3), (1, 2))],
        use_tqdm=False,
    )
    assert [[len(c.token_ids) for c in o.outputs] for o in outs] == [
        [4],
        [7, 7, 7],
        [1, 1],
    ]
    assert all(t < NULL_VOCAB for o in outs for c in o.outputs for t in c.token_ids)
    assert llm.block_manager.device.num_free == 64  # every block came back


def test_simulated_beam_search_runs_the_real_beam_step():
    llm = simulated()
    (out,) = llm.beam_search(
        {"prompt_token_ids": [1, 2, 3, 4, 5]},
        BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True),
    )
    assert len(out.sequences) == 3 and all(len(b.token_ids) == 6 for b in out.sequences)
    assert out.metrics.finished_time == pytest.approx(6 * STEP)
    # the beams forked and copied a shared partial block
    assert llm.stats.cow_copies > 0
    assert llm.block_manager.device.num_free == 64


def test_same_seed_same_tokens_other_seed_differs():
    def tokens(seed: int) -> list[list[int]]:
        runner = SimulatedRunner(step_time=STEP, block_size=4, seed=seed)
        llm = LLM(runner=runner, block_size=4, num_gpu_blocks=64)
        outs = llm.generate(
            {"prompt_token_ids": [1, 2, 3]}, greedy(12, n=2), use_tqdm=False
        )
        return [c.token_ids for c in outs[0].outputs]

    assert tokens(1) == tokens(1) != tokens(2)


def test_wall_clock_engine_records_times_and_waits_for_a_future_arrival():
    llm = LLM("tiny-llama", block_size=4, num_gpu_blocks=32)
    start = llm.now()
    request = llm.add_request(
        {"prompt_token_ids": [1, 2, 3]}, greedy(2), arrival_time=start + 0.3
    )
    outputs = drain(llm)
    m = outputs[request].metrics
    assert m.first_scheduled_time >= start + 0.3  # it slept until the request arrived
    assert (
        m.arrival_time <= m.first_scheduled_time < m.first_token_time <= m.finished_time
    )
    assert all(s.duration > 0 for s in llm.step_stats)
    (out,) = llm.generate({"prompt_token_ids": [4, 5]}, greedy(2), use_tqdm=False)
    assert out.metrics.latency > 0


class FakeCost:
    """A cost model that charges by what it is asked, so the runner's arithmetic can be read off."""

    # a two-layer model: a swapped block is 2 x 2 transfers (K and V of each layer)
    class model:
        num_layers = 2

    def step_time(self, query_lens, seq_lens):
        return 1.0 * sum(query_lens) + 0.001 * sum(seq_lens)

    def swap_time(self, num_blocks, block_size, num_transfers):
        return 100.0 * num_blocks + 10.0 * num_transfers

    def copy_time(self, num_blocks, block_size):
        return 1000.0 * num_blocks


def test_simulated_runner_prices_tokens_swaps_and_copies():
    runner = SimulatedRunner(FakeCost(), block_size=4)
    seq = Sequence(list(range(10)))
    seq.num_computed_tokens = 7  # its last 3 tokens are the query: a context of 10
    item = ScheduledSeq(SequenceGroup("r", [seq]), seq, 3)
    out = SchedulerOutput(
        [item], blocks_to_swap_out=[(0, 1)], blocks_to_swap_in=[(2, 3), (4, 5)]
    )
    out.blocks_to_copy = [(6, 7)]
    assert runner.step_time(out) == pytest.approx(
        3.0 + 0.010 + 3 * (100.0 + 4 * 10.0) + 1000.0
    )
    assert runner.execute(out).shape == (1, NULL_VOCAB)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(), "exactly one of cost_model and step_time"),
        (dict(cost_model=FakeCost(), step_time=0.1), "exactly one"),
        (dict(step_time=0), "step_time must be a positive number"),
        (dict(step_time=True), "step_time must be a positive number"),
    ],
)
def test_simulated_runner_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimulatedRunner(**kwargs)


def test_engine_refuses_a_model_with_a_runner_and_a_runner_without_a_pool_size():
    runner = SimulatedRunner(step_time=STEP)
    with pytest.raises(ValueError, match="model must be None when runner is given"):
        LLM("tiny-llama", runner=runner, num_gpu_blocks=8)
    with pytest.raises(ValueError, match="num_gpu_blocks must be given with a runner"):
        LLM(runner=runner)


@pytest.mark.parametrize("bad", [-1.0, "soon", True])
def test_add_request_refuses_a_bad_arrival_time(bad):
    llm = simulated()
    with pytest.raises(
        ValueError, match="arrival_time must be a number of seconds >= 0"
    ):
        llm.add_request({"prompt_token_ids": [1]}, greedy(1), arrival_time=bad)
    assert not llm.has_unfinished_requests()


def test_generate_waits_for_requests_still_to_arrive():
    llm = simulated()
    llm.add_request({"prompt_token_ids": [1]}, greedy(1), arrival_time=5.0)
    with pytest.raises(ValueError, match="unfinished"):
        llm.generate({"prompt_token_ids": [2]}, greedy(1), use_tqdm=False)


def test_beam_searches_count_their_width_against_max_num_seqs_from_admission():
    """A beam search holds one sequence until its first step forks it into its width: admitting
    groups by their live sequences would let four searches of width 3 onto a budget of 6."""
    llm = simulated(max_num_seqs=6)
    params = BeamSearchParams(beam_width=3, max_tokens=4, ignore_eos=True)
    for i in range(4):
        llm.add_request({"prompt_token_ids": [1 + i, 2, 3]}, params)
    while llm.has_unfinished_requests():
        llm.step()
        assert sum(len(g.get_unfinished_seqs()) for g in llm.scheduler.running) <= 6
    # two searches of width 3 at a time
    assert max(s.num_running for s in llm.step_stats) == 2


def test_a_chunked_prompt_is_first_scheduled_at_its_first_chunk():
    """A 10-token prompt under a budget of 4 runs over 3 steps: it was first scheduled when the
    first of them started, and its first token came at the end of the third."""
    llm = simulated(
        enable_chunked_prefill=True, max_num_batched_tokens=4, max_num_seqs=4
    )
    a = llm.add_request({"prompt_token_ids": list(range(10, 20))}, greedy(2))
    metrics = drain(llm)[a].metrics
    assert (metrics.first_scheduled_time, metrics.first_token_time) == (0.0, 3 * STEP)
    assert metrics.finished_time == 4 * STEP
