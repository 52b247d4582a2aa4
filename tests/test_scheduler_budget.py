"""The token budget end to end: a small max_num_batched_tokens changes the schedule, never the outputs.

The scheduler's own tests (test_scheduler.py) check the budget on the policy alone. Here the whole
engine runs a tiny model: with a budget as small as max_num_seqs, the steps must stay within it
(the one exception: a prefill larger than the whole budget runs alone in its step), every request
must finish, and greedy outputs must equal those of the same requests under a budget that never
binds, since batching must not change what a sequence computes.
"""

from __future__ import annotations

import random

import pytest

from minipaged import LLM, SamplingParams
from minipaged.reference.scheduler import SchedulerOutput

WEIGHT_SEED = 0
VOCAB_LOW, VOCAB_HIGH = 3, 259  # byte tokens: no pad / bos / eos in the prompts


def run(
    requests, preemption_mode: str, num_gpu_blocks: int, budget: int
) -> tuple[list, list]:
    """Greedy outputs of `requests` (prompt, max_tokens) and every step's SchedulerOutput."""
    llm = LLM(
        "tiny-llama",
        block_size=4,
        num_gpu_blocks=num_gpu_blocks,
        num_cpu_blocks=32,
        preemption_mode=preemption_mode,
        watermark=0.0,
        seed=WEIGHT_SEED,
        max_num_seqs=4,
        max_num_batched_tokens=budget,
    )
    steps: list[SchedulerOutput] = []
    llm.step_observers.append(lambda _, out: steps.append(out))
    params = [
        SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
        for _, m in requests
    ]
    outs = llm.generate(
        [{"prompt_token_ids": p} for p, _ in requests], params, use_tqdm=False
    )
    return [o.outputs[0].token_ids for o in outs], steps


@pytest.mark.parametrize(
    ("preemption_mode", "num_gpu_blocks"), [("recompute", 64), ("swap", 10)]
)
def test_a_budget_of_max_num_seqs_keeps_every_step_within_it_and_the_outputs(
    preemption_mode, num_gpu_blocks
):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    requests = [
        (
            [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(rng.randint(2, 7))],
            rng.randint(1, 8),
        )
        for _ in range(6)
    ]
    expected, free_steps = run(requests, preemption_mode, num_gpu_blocks, budget=2048)
    # = max_num_seqs
    got, steps = run(requests, preemption_mode, num_gpu_blocks, budget=4)
    assert got == expected, f"seed {seed}: a small budget changed the outputs"
    # Prompts of 2 or more tokens: at most two fit a budget of 4, where the big budget admits four.
    assert len(steps[0].scheduled) <= 2 < len(free_steps[0].scheduled) == 4
    for out in steps:
        # only a prefill longer than the whole budget, alone
        if out.num_batched_tokens > 4:
            assert len({item.group.request_id for item in out.scheduled}) == 1, (
                f"seed {seed}"
            )
            assert all(item.is_prefill for item in out.scheduled), f"seed {seed}"
        assert not out.deferred, "with budget == max_num_seqs the decodes always fit"


def test_llm_refuses_a_budget_below_max_num_seqs():
    max_num_seqs = random.randint(2, 64)
    budget = random.randint(1, max_num_seqs - 1)
    expected = rf"max_num_batched_tokens \({budget}\).*max_num_seqs \({max_num_seqs}\)"
    with pytest.raises(ValueError, match=expected):
        LLM(
            "tiny-llama",
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            seed=WEIGHT_SEED,
        )


def test_num_batched_tokens_counts_what_add_puts_in_the_step():
    """SchedulerOutput.num_batched_tokens, kept as a counter by `add`, equals a fresh sum after
    every add; an output built with its list counts that list."""
    from minipaged.reference.scheduler import ScheduledSeq, SchedulerOutput
    from minipaged.sequence import Sequence, SequenceGroup

    def item(n: int) -> ScheduledSeq:
        seq = Sequence(list(range(1, 9)))
        return ScheduledSeq(SequenceGroup(f"r{n}", [seq], 0.0), seq, n)

    out = SchedulerOutput()
    assert out.num_batched_tokens == 0
    for n in (3, 1, 5):
        out.add(item(n))
        assert out.num_batched_tokens == sum(s.num_query_tokens for s in out.scheduled)
    assert [s.num_query_tokens for s in out.scheduled] == [3, 1, 5]
    assert SchedulerOutput([item(2), item(2), item(4)]).num_batched_tokens == 8
