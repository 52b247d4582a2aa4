"""The exercises (and worked examples) of the engine's concept pages, checked against the real code.

The pages are docs/concepts/scheduling.md, replacement-and-recomputation.md, thrashing-and-admission.md
and process-trees.md. Each test builds exactly the situation its page describes and asserts the answer
that the page gives in its folded "Answer" box, so the docs cannot drift from the code. When a test
here fails, fix the page and the test together.

The scheduling pages need no model: a Scheduler over a real BlockManager, with `engine_step` below
playing the engine's part (every scheduled sequence has its K/V computed and gains one token; a
sequence that reaches its request's max_tokens is finished and freed). The process-tree page drives
the real engine, LLM("tiny-llama"), step by step. No assignment task covers the engine, so no test
here carries a task marker.
"""

from __future__ import annotations

import pytest

from minipaged import LLM, BeamSearchParams, SamplingParams
from minipaged.config import SchedulerConfig
from minipaged.reference.block_manager import AllocStatus, BlockManager
from minipaged.reference.scheduler import Scheduler, SchedulerOutput
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus

# what the fake model "samples": the token does not matter to the scheduler
NEXT_TOKEN = 7


def request(request_id: str, prompt_len: int, arrival: float) -> SequenceGroup:
    """A one-sequence request with a prompt of `prompt_len` distinct tokens, arriving at `arrival`."""
    return SequenceGroup(
        request_id, [Sequence(list(range(100, 100 + prompt_len)))], arrival_time=arrival
    )


def engine_step(
    scheduler: Scheduler, max_tokens: dict[str, int] | None = None
) -> SchedulerOutput:
    """One step of the engine's loop without a model (LLM.step: schedule, compute, sample, finish)."""
    max_tokens = max_tokens or {}
    out = scheduler.schedule()
    for item in out.scheduled:
        item.seq.num_computed_tokens = len(item.seq)  # its K/V are in the cache now
        item.seq.append_token_id(NEXT_TOKEN)  # and the step samples its next token
        if len(item.seq.output_token_ids) >= max_tokens.get(
            item.group.request_id, 10**9
        ):
            item.seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
            scheduler.block_manager.free(item.seq)
    for group in dict.fromkeys(item.group for item in out.scheduled):
        if group.is_finished():
            scheduler.finish(group)
    return out


def batch(out: SchedulerOutput) -> list[tuple[str, int]]:
    """(request id, q_len) of each sequence the step computes."""
    return [(item.group.request_id, item.num_query_tokens) for item in out.scheduled]


def ids(groups) -> list[str]:
    return [group.request_id for group in groups]


# ---- scheduling.md ----------------------------------------------------------------------------


def test_scheduling_worked_example_iteration_level():
    # A stops after 2 tokens, B after 8, C after 3; D (2 tokens) arrives after step 0. At most 3 run.
    config = SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=4096)
    scheduler = Scheduler(config, BlockManager(4, 64, watermark=0.0))
    limits = {"A": 2, "B": 8, "C": 3, "D": 2}
    for i, name in enumerate("ABC"):
        scheduler.add(request(name, 4, i))
    finished_at: dict[str, int] = {}
    started_at: dict[str, int] = {}
    for step in range(10):
        if step == 1:
            scheduler.add(request("D", 4, 3))
        out = engine_step(scheduler, limits)
        for name, _ in batch(out):
            started_at.setdefault(name, step)
        for item in out.scheduled:
            if item.group.is_finished():
                finished_at.setdefault(item.group.request_id, step)
    assert started_at == {"A": 0, "B": 0, "C": 0, "D": 2}
    assert finished_at == {"A": 1, "C": 2, "D": 3, "B": 7}
    # Turnaround in steps, from arrival (A-C at step 0, D at step 1) to the end of the last step.
    turnaround = {
        name: finished_at[name] + 1 - (1 if name == "D" else 0) for name in finished_at
    }
    assert turnaround == {"A": 2, "B": 8, "C": 3, "D": 3}
    # Static batching of A, B, C: all three rows run 8 steps; D runs steps 8-9 (turnaround 9).
    padded_slots = (8 - 2) + (8 - 3)
    assert padded_slots == 11
    assert sum(turnaround.values()) / 4 == 4.0
    assert (8 + 8 + 8 + 9) / 4 == 8.25


def test_scheduling_exercise():
    config = SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=16)
    scheduler = Scheduler(
        config, BlockManager(block_size=4, num_gpu_blocks=16, watermark=0.0)
    )
    for i, (name, prompt_len) in enumerate([("A", 6), ("B", 9), ("C", 5), ("D", 4)]):
        scheduler.add(request(name, prompt_len, i))
    limits = {"A": 2}  # A stops after 2 generated tokens; the others go on
    steps = [engine_step(scheduler, limits) for _ in range(3)]
    assert [batch(out) for out in steps] == [
        [("A", 6), ("B", 9)],  # C would make 20 tokens > 16
        [("A", 1), ("B", 1), ("C", 5)],  # D would be a 4th sequence > max_num_seqs
        [("B", 1), ("C", 1), ("D", 4)],  # A finished at the end of step 1
    ]
    assert [out.num_batched_tokens for out in steps] == [15, 7, 6]
    assert ids(scheduler.running) == ["B", "C", "D"]
    assert not scheduler.waiting


def test_scheduling_budget_does_not_hold_back_the_first_prefill():
    # The page's note: a step with nothing else in it takes a prompt larger than the whole budget
    # (without chunked prefill it could never run otherwise), alone.
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16)
    scheduler = Scheduler(
        config, BlockManager(block_size=4, num_gpu_blocks=16, watermark=0.0)
    )
    scheduler.add(request("long", 20, 0))
    scheduler.add(request("short", 2, 1))
    out = engine_step(scheduler)
    assert batch(out) == [("long", 20)]  # over the budget, alone
    assert batch(engine_step(scheduler)) == [("long", 1), ("short", 2)]


# ---- replacement-and-recomputation.md -------------------------------------------------------


def replacement_scheduler(
    mode: str, num_cpu_blocks: int
) -> tuple[Scheduler, dict[str, SequenceGroup]]:
    config = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=64, preemption_mode=mode
    )
    manager = BlockManager(
        block_size=4, num_gpu_blocks=10, num_cpu_blocks=num_cpu_blocks, watermark=0.0
    )
    scheduler = Scheduler(config, manager)
    groups = {
        name: request(name, n, i)
        for i, (name, n) in enumerate([("A", 8), ("B", 7), ("C", 6)])
    }
    for group in groups.values():
        scheduler.add(group)
    return scheduler, groups


REPLACEMENT_LIMITS = {"A": 8}  # A stops after 8 generated tokens; B and C go on


def blocks_held(
    scheduler: Scheduler, groups: dict[str, SequenceGroup]
) -> dict[str, int]:
    tables = scheduler.block_manager.device_tables
    return {
        name: len(tables[g.seqs[0].seq_id]) if g.seqs[0].seq_id in tables else 0
        for name, g in groups.items()
    }


def test_replacement_worked_example():
    scheduler, groups = replacement_scheduler("recompute", 0)
    rows = []
    for _ in range(6):
        engine_step(scheduler, REPLACEMENT_LIMITS)
        rows.append(
            (
                *blocks_held(scheduler, groups).values(),
                scheduler.block_manager.device.num_free,
            )
        )
    assert rows == [  # A, B, C, free, after steps 0-5
        (2, 2, 2, 4),
        (3, 2, 2, 3),
        (3, 3, 2, 2),
        (3, 3, 3, 1),
        (3, 3, 3, 1),
        (4, 3, 3, 0),
    ]


@pytest.mark.parametrize(
    ("mode", "num_cpu_blocks"), [("recompute", 0), ("swap", 8), ("swap", 2)]
)
def test_replacement_exercise(mode, num_cpu_blocks):
    scheduler, groups = replacement_scheduler(mode, num_cpu_blocks)
    c = groups["C"].seqs[0]
    outs = [engine_step(scheduler, REPLACEMENT_LIMITS) for _ in range(6)]
    assert all(not out.preempted for out in outs)
    assert len(c) == 12  # 6 prompt tokens + 6 generated, one a step
    # Step 6: B needs its 4th block (position 12), the pool is empty: C, the newest, is the victim.
    step6 = engine_step(scheduler, REPLACEMENT_LIMITS)
    assert batch(step6) == [("A", 1), ("B", 1)]
    expected_mode = "swap" if num_cpu_blocks >= 3 else "recompute"  # C holds 3 blocks
    assert step6.preempted == [("C", expected_mode)]
    if expected_mode == "swap":
        assert step6.blocks_to_swap_out == [(4, 0), (5, 1), (8, 2)]
        assert ids(scheduler.swapped) == ["C"] and c.status == SequenceStatus.SWAPPED
    else:
        assert step6.blocks_to_swap_out == []
        assert ids(scheduler.waiting) == ["C"] and c.status == SequenceStatus.WAITING
        assert c.num_computed_tokens == 0
    # Step 7: A's last step (2 free blocks are too few for C); step 8: C comes back.
    step7 = engine_step(scheduler, REPLACEMENT_LIMITS)
    assert batch(step7) == [("A", 1), ("B", 1)] and not step7.preempted
    assert ids(scheduler.running) == ["B"]
    step8 = engine_step(scheduler, REPLACEMENT_LIMITS)
    if expected_mode == "swap":
        # a decode: its K/V came back from the host
        assert batch(step8) == [("B", 1), ("C", 1)]
        assert step8.blocks_to_swap_in == [(0, 0), (1, 1), (2, 6)]
    else:
        # prompt + 6 generated tokens, one prefill
        assert batch(step8) == [("B", 1), ("C", 12)]
    assert scheduler.num_preemptions == {"recompute": 0, "swap": 0, expected_mode: 1}


# ---- thrashing-and-admission.md -------------------------------------------------------------


def thrashing_run(max_num_seqs: int) -> tuple[int, int, int]:
    """16 requests of 16 prompt + 48 output tokens on 32 blocks of 4: (steps, preemptions, tokens)."""
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=4096)
    scheduler = Scheduler(
        config, BlockManager(block_size=4, num_gpu_blocks=32, watermark=0.0)
    )
    names = [f"r{i}" for i in range(16)]
    for i, name in enumerate(names):
        scheduler.add(request(name, 16, i))
    steps = preemptions = tokens = 0
    while scheduler.has_unfinished():
        out = engine_step(scheduler, dict.fromkeys(names, 48))
        steps, preemptions, tokens = (
            steps + 1,
            preemptions + len(out.preempted),
            tokens + out.num_batched_tokens,
        )
        assert steps < 1000, "no livelock"
    assert scheduler.block_manager.device.num_free == 32
    return steps, preemptions, tokens


def test_thrashing_worked_example():
    # every prompt token and every generated token but the last, once
    useful = 16 * (16 + 48 - 1)
    assert useful == 1008
    assert thrashing_run(16) == (288, 29, 1706)
    assert thrashing_run(4) == (290, 23, 1577)
    assert thrashing_run(2) == (384, 0, 1008)
    # of the computed tokens were recomputation
    assert round(1 - useful / 1706, 2) == 0.41


def test_watermark_of_a_small_pool_is_zero():
    # int(0.64)
    assert BlockManager(block_size=4, num_gpu_blocks=64).watermark_blocks == 0
    assert BlockManager(block_size=16, num_gpu_blocks=2000).watermark_blocks == 20


def test_thrashing_exercise():
    config = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=64, preemption_mode="swap"
    )
    manager = BlockManager(
        block_size=4, num_gpu_blocks=10, num_cpu_blocks=10, watermark=0.1
    )
    scheduler = Scheduler(config, manager)
    assert manager.watermark_blocks == 1
    for i, (name, n) in enumerate([("A", 11), ("B", 11), ("C", 7)]):
        scheduler.add(request(name, n, i))
    limits = {"A": 4}
    step0 = engine_step(scheduler, limits)
    assert batch(step0) == [("A", 11), ("B", 11), ("C", 7)]
    assert manager.device.num_free == 2
    # Question 1: a 16-token prompt instead of C? 4 blocks free before C, 4 - 4 < 1: LATER.
    probe = BlockManager(block_size=4, num_gpu_blocks=10, watermark=0.1)
    for name in ("A", "B"):
        probe.allocate(request(name, 11, 0))
    assert probe.device.num_free == 4
    assert probe.can_allocate(request("big", 16, 9)) == AllocStatus.LATER
    assert probe.can_allocate(request("C", 7, 9)) == AllocStatus.OK

    engine_step(scheduler, limits)  # step 1: everyone fits
    scheduler.add(request("D", 3, 3))
    step2 = engine_step(scheduler, limits)
    assert step2.preempted == [("C", "swap")]
    # D is not admitted in a step that preempted
    assert batch(step2) == [("A", 1), ("B", 1)]
    step3 = engine_step(scheduler, limits)
    # A finished at the end of step 3, freeing 4 blocks
    assert manager.device.num_free == 6
    # D would fit (2 free - 1 >= 1) but C is swapped
    assert batch(step3) == [("A", 1), ("B", 1)]
    assert ids(scheduler.swapped) == ["C"] and ids(scheduler.waiting) == ["D"]
    step4 = engine_step(scheduler, limits)
    # C swaps in, then D is admitted
    assert batch(step4) == [("B", 1), ("C", 1), ("D", 3)]
    assert step4.blocks_to_swap_in == [(0, 0), (1, 1)]
    assert manager.device.num_free == 2


@pytest.fixture(scope="module")
def small_llm() -> LLM:
    return LLM("tiny-llama", block_size=4, num_gpu_blocks=12)


def test_thrashing_exercise_refused_at_submission(small_llm):
    assert small_llm.block_manager.watermark_blocks == 0  # int(0.01 * 12)
    # 49 stored tokens: 13 blocks > 12
    with pytest.raises(ValueError, match="needs 13 blocks"):
        small_llm.add_request(
            {"prompt_token_ids": list(range(10, 40))}, SamplingParams(max_tokens=20)
        )
    # Two samples of 10 + 19 = 29 tokens (28 stored, 7 blocks, 2 shared): 2 + 2 x 5 = 12, accepted.
    request_id = small_llm.add_request(
        {"prompt_token_ids": list(range(10, 20))}, SamplingParams(n=2, max_tokens=19)
    )
    # 29 stored tokens: 2 + 2 x 6 blocks
    with pytest.raises(ValueError, match="needs 14 blocks"):
        small_llm.add_request(
            {"prompt_token_ids": list(range(10, 20))},
            SamplingParams(n=2, max_tokens=20),
        )
    finished = []
    while small_llm.has_unfinished_requests():
        finished += small_llm.step()
    assert [output.request_id for output in finished] == [request_id]


# ---- process-trees.md -------------------------------------------------------------------------


def ref_counts(llm: LLM) -> dict[int, int]:
    device = llm.block_manager.device
    return {
        block: device.ref_count(block)
        for block in range(device.num_blocks)
        if device.ref_count(block)
    }


def tables(llm: LLM) -> list[list[int]]:
    (group,) = llm.scheduler.running
    return [llm.block_manager.get_block_table(seq).block_ids for seq in group.seqs]


def test_process_trees_exercise_parallel_sampling():
    llm = LLM("tiny-llama", block_size=4, num_gpu_blocks=64)
    # 10 tokens: blocks 0, 1 full, block 2 holds 2
    prompt = {"prompt_token_ids": list(range(10, 20))}
    llm.add_request(
        prompt,
        SamplingParams(n=3, temperature=1.0, max_tokens=4, seed=0, ignore_eos=True),
    )
    llm.step()  # step 0: the prefill
    step0 = llm.step_stats[-1]
    # 10 for the first sample, the last token for each other
    assert step0.num_batched_tokens == 12
    assert tables(llm) == [[0, 1, 2]] * 3
    assert ref_counts(llm) == {0: 3, 1: 3, 2: 3}
    assert (step0.blocks_used, step0.blocks_shared) == (3, 3)
    # step 1: each sample writes position 10, into the shared, partly filled block 2
    llm.step()
    step1 = llm.step_stats[-1]
    assert step1.blocks_copied == 2
    assert tables(llm) == [[0, 1, 3], [0, 1, 4], [0, 1, 2]]
    assert ref_counts(llm) == {0: 3, 1: 3, 2: 1, 3: 1, 4: 1}
    assert (step1.blocks_used, step1.blocks_shared) == (5, 2)
    # 9 table entries, 5 blocks
    assert llm.block_manager.memory_stats().device.blocks_saved_by_sharing == 4


def test_process_trees_exercise_beam_search():
    llm = LLM("tiny-llama", block_size=4, num_gpu_blocks=64)
    # 6 tokens: block 0 full, block 1 holds 2
    prompt = {"prompt_token_ids": list(range(10, 16))}
    llm.add_request(
        prompt, BeamSearchParams(beam_width=2, max_tokens=4, ignore_eos=True)
    )
    # step 0: the prefill;
    # all 2W = 4 candidates extend the only beam, so it is kept twice
    llm.step()
    (group,) = llm.scheduler.running
    beam_1, beam_2 = group.seqs
    assert tables(llm) == [[0, 1], [0, 1]]
    assert ref_counts(llm) == {0: 2, 1: 2}
    llm.step()  # step 1
    step1 = llm.step_stats[-1]
    # beam 1 wrote position 6 into a copy of block 1 (block 2)
    assert step1.blocks_copied == 1
    # both survivors extend beam 2
    assert beam_1.status == SequenceStatus.FINISHED_ABORTED
    (group,) = llm.scheduler.running
    # beam 2 and its fork
    assert group.seqs[0] is beam_2 and group.seqs[1] not in (beam_1, beam_2)
    assert tables(llm) == [[0, 1], [0, 1]]
    # block 2, beam 1's private copy, is free again
    assert ref_counts(llm) == {0: 2, 1: 2}
    # The step's stats are taken as it ran, before the beam selection freed beam 1 and its copy.
    assert (step1.blocks_used, step1.blocks_shared) == (3, 1)
    device = llm.block_manager.memory_stats().device
    assert (device.num_used, device.num_shared) == (2, 2)
