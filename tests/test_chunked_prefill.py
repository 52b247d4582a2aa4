"""Chunked prefill: prompts computed across several steps give exactly the unchunked result.

The oracle is transformers' own greedy `generate` (see test_engine_equivalence.py). The engine
runs with a token budget small enough that the longest prompt spans several steps; every step
is checked against the budget, and each prompt's chunks are recorded from the scheduler's
output, so a test knows its prompts were really cut.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, rule
from test_engine_equivalence import (
    ARCHS,
    BLOCK_SIZES,
    MAX_TOKENS,
    as_requests,
    assert_all_blocks_free,
    beam_tokens,
    engine,
    hf_greedy,
    hf_model,
    random_prompts,
    sample_tokens,
)
from test_scheduler import EOS, SchedulerMachine

from minipaged import BeamSearchParams, SamplingParams
from minipaged.config import SchedulerConfig
from minipaged.reference.block_manager import BlockManager
from minipaged.reference.scheduler import Scheduler, SchedulerOutput
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus

GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def record_chunks(llm) -> dict[str, list[int]]:
    """Wrap the scheduler: each request's prompt chunks (the q_len of each step that computed
    prompt tokens), and a check that no step passes the token budget."""
    chunks: dict[str, list[int]] = defaultdict(list)
    schedule, budget = (
        llm.scheduler.schedule,
        llm.scheduler_config.max_num_batched_tokens,
    )

    def recording():
        out = schedule()
        assert out.num_batched_tokens <= budget, "a step passed the token budget"
        for item in out.scheduled:
            # prompt tokens: a chunk, or the prompt's last token taken as a decode
            if item.num_computed_tokens < len(item.seq.prompt_token_ids):
                chunks[item.group.request_id].append(item.num_query_tokens)
        return out

    llm.scheduler.schedule = recording
    return chunks


@pytest.fixture(scope="module", params=ARCHS)
def reference(request):
    name = request.param
    prompts = random_prompts(seed=ARCHS.index(name) + 300, max_len=48)
    model = hf_model(name)
    return name, prompts, [hf_greedy(model, p, MAX_TOKENS)[0] for p in prompts]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_greedy_with_chunks_matches_transformers(reference, block_size):
    name, prompts, expected = reference
    budget = 12  # the 48-token prompt takes 4 to 10 steps beside the decodes
    llm = engine(
        name,
        block_size,
        enable_chunked_prefill=True,
        max_num_batched_tokens=budget,
        max_num_seqs=5,
    )
    chunks = record_chunks(llm)
    outs = llm.generate(as_requests(prompts), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    steps = chunks[outs[longest].request_id]
    assert 2 <= len(steps) <= 10 and sum(steps) == len(prompts[longest])
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_chunks_with_the_prefix_cache_and_preemption_match_transformers(
    preemption_mode,
):
    """A shared prefix cached while other prompts are still chunked, on a pool small enough to
    preempt: the tokens must not change."""
    name, block_size = "tiny-llama", 4
    gen = torch.Generator().manual_seed(11)
    prefix = torch.randint(3, 259, (16,), generator=gen).tolist()
    prompts = [
        prefix + torch.randint(3, 259, (n,), generator=gen).tolist()
        for n in (20, 3, 14, 27, 9)
    ]
    model = hf_model(name)
    expected = [hf_greedy(model, p, MAX_TOKENS)[0] for p in prompts]
    largest = max(math.ceil((len(p) + MAX_TOKENS) / block_size) for p in prompts)
    llm = engine(
        name,
        block_size,
        num_gpu_blocks=largest + 4,
        num_cpu_blocks=64,
        preemption_mode=preemption_mode,
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        max_num_batched_tokens=10,
        max_num_seqs=5,
    )
    chunks = record_chunks(llm)
    outs = llm.generate(as_requests(prompts), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert sum(llm.stats.num_preemptions.values()) > 0, "the pool was meant to be small"
    assert any(len(c) > 1 for c in chunks.values())
    assert llm.block_manager.memory_stats().prefix_cache_hits > 0
    assert_all_blocks_free(llm)


def test_n_samples_and_beams_with_chunks_equal_the_unchunked_engine():
    """n = 3 samples fork once the prompt is computed; each sample, and each beam, gets the
    tokens it gets without chunking (same seeds)."""
    prompts = as_requests(random_prompts(seed=5, num=4, max_len=40))
    sampled = SamplingParams(temperature=0.8, n=3, max_tokens=8, seed=3)
    beams = BeamSearchParams(beam_width=3, max_tokens=6)
    plain = engine("tiny-qwen2", 4)
    chunked = engine(
        "tiny-qwen2",
        4,
        enable_chunked_prefill=True,
        max_num_batched_tokens=12,
        max_num_seqs=12,
    )
    chunks = record_chunks(chunked)
    assert sample_tokens(chunked, prompts, sampled) == sample_tokens(
        plain, prompts, sampled
    )
    assert beam_tokens(chunked, prompts[:2], beams) == beam_tokens(
        plain, prompts[:2], beams
    )
    assert any(len(c) > 1 for c in chunks.values())
    assert_all_blocks_free(chunked)


# ---- the scheduler with chunks, under random requests ---------------------------------------------


class ChunkedSchedulerMachine(SchedulerMachine):
    """test_scheduler.py's state machine with chunked prefill: the same invariants (reference
    counts, queues, every computed token read back from a model of the pools, so a prefix hit
    on a block whose K/V is not written reads back wrong), plus the chunk's own: a step never
    passes the budget, a table holds exactly the tokens computed, a prompt's chunks come
    oldest first, and every request finishes (teardown). Requests are one sequence each, as
    the engine makes them with chunking (samples and beams fork after the prompt)."""

    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        num_gpu_blocks=st.integers(4, 24),
        num_cpu_blocks=st.integers(0, 16),
        watermark=st.sampled_from([0.0, 0.1]),
        max_num_seqs=st.integers(1, 6),
        extra_tokens=st.integers(0, 10),  # the budget is max_num_seqs + extra_tokens
        preemption_mode=st.sampled_from(["recompute", "swap"]),
        prefix_caching=st.booleans(),
    )
    def setup(self, **kwargs):
        super().setup(**kwargs)
        config = dataclasses.replace(self.scheduler.config, enable_chunked_prefill=True)
        self.scheduler = Scheduler(config, self.manager)

    @rule(
        prefix_len=st.sampled_from([0, 3, 8, 12]),
        tail=st.lists(st.integers(1, 9), min_size=0, max_size=24),
        max_tokens=st.integers(1, 8),
    )
    def add_request(self, prefix_len, tail, max_tokens):
        super().add_request(prefix_len, tail, 1, max_tokens)

    def _engine_step(self, next_token) -> None:
        scheduler, manager = self.scheduler, self.manager
        if not scheduler.has_unfinished():
            return
        running_before = {id(g) for g in scheduler.running}
        out = scheduler.schedule()
        assert out.scheduled or out.preempted, "no progress"
        self._check_chunks(out, running_before)
        self._run_model(out)
        for item in out.scheduled:
            seq, group = item.seq, item.group
            seq.num_computed_tokens = item.seq_len
            if not item.completes_sequence:
                continue  # a chunk: the prompt goes on next step
            token = next_token()
            seq.append_token_id(token)
            if (
                token == EOS
                or len(seq.output_token_ids) >= self.max_tokens[group.request_id]
            ):
                seq.status = SequenceStatus.FINISHED_STOPPED
                manager.free(seq)
                scheduler.finish(group)
                self.unfinished.remove(group)
                event("a request finished")

    def _run_model(self, out: SchedulerOutput) -> None:
        """As the parent's, but a chunk writes the tokens of its chunk, not the last ones."""
        self._move_blocks(out)
        for item in out.scheduled:
            slots = self.manager.get_block_table(item.seq).slot_mapping(
                item.num_query_tokens
            )
            chunk = item.seq.token_ids[item.num_computed_tokens : item.seq_len]
            for slot, token in zip(slots, chunk, strict=True):
                self.pool["device"][slot] = token

    def _check_chunks(self, out: SchedulerOutput, running_before: set[int]) -> None:
        scheduler, manager = self.scheduler, self.manager
        assert out.num_batched_tokens <= scheduler.config.max_num_batched_tokens
        if out.num_batched_tokens == scheduler.config.max_num_batched_tokens:
            event("the budget is spent")
        for _, mode in out.preempted:
            event(f"preempted by {mode}")
        chunks = []
        for item in out.scheduled:
            table = manager.get_block_table(item.seq)
            assert table.num_tokens == item.seq_len, (
                "the table holds the chunk, no more"
            )
            assert item.num_query_tokens >= 1
            if not item.completes_sequence:
                event("a prompt cut into chunks")
            if id(item.group) in running_before and item.num_query_tokens > 1:
                chunks.append(item.group)
        # prompts started earlier get their chunks oldest first
        assert chunks == sorted(chunks, key=lambda g: g.arrival_time)

    @invariant()
    def where_each_sequence_lives(self):
        """A running sequence's table holds its computed tokens, and the one sampled last
        when its prompt is done; a waiting one holds nothing."""
        s, m = self.scheduler, self.manager
        for queue, tables in ((s.running, m.device_tables), (s.swapped, m.host_tables)):
            for group in queue:
                for seq in group.get_unfinished_seqs():
                    held = tables[seq.seq_id].num_tokens
                    assert held == seq.num_computed_tokens
                    assert held in (len(seq) - 1, *range(len(seq.prompt_token_ids)))
        for group in s.waiting:
            for seq in group.get_unfinished_seqs():
                assert seq.num_computed_tokens == 0
                assert seq.seq_id not in m.device_tables


ChunkedSchedulerMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None
)
test_chunked_scheduler_state_machine = ChunkedSchedulerMachine.TestCase


def _run_step(scheduler: Scheduler) -> SchedulerOutput:
    """One engine step on the scheduler: each scheduled sequence computes its tokens, and one that
    completes (its prompt, or a decode) samples token 7. Nothing finishes."""
    out = scheduler.schedule()
    for item in out.scheduled:
        item.seq.num_computed_tokens = item.seq_len
        if item.completes_sequence:
            item.seq.append_token_id(7)
    return out


@given(
    num_decoding=st.integers(0, 5),
    prompt_len=st.integers(2, 300),
    spare=st.integers(1, 24),
    block_size=st.sampled_from([1, 4, 16]),
    prefix_caching=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_a_long_prompt_takes_a_bounded_number_of_steps_and_decodes_never_stop(
    num_decoding, prompt_len, spare, block_size, prefix_caching
):
    """No starvation, in numbers. With S requests decoding and a budget of S + 1 + spare tokens,
    a prompt of L tokens that arrives gets the 1 + spare tokens the decodes leave in every step:
    its first token comes after exactly ceil(L / (1 + spare)) steps, and every decoding request
    gets its token in each of them (memory is ample here, so nothing is preempted)."""
    seqs = num_decoding + 1
    config = SchedulerConfig(
        max_model_len=1024,
        max_num_seqs=seqs,
        max_num_batched_tokens=seqs + spare,
        enable_chunked_prefill=True,
    )
    steps_bound = math.ceil(prompt_len / (1 + spare))
    per_seq = math.ceil((prompt_len + steps_bound + 8) / block_size)
    manager = BlockManager(block_size, seqs * per_seq + 2, 0, 0.0, prefix_caching)
    scheduler = Scheduler(config, manager)
    decoders = []
    for i in range(num_decoding):
        decoders.append(
            SequenceGroup(f"d{i}", [Sequence([100 + 2 * i, 101 + 2 * i])], 0.0)
        )
        scheduler.add(decoders[-1])
    for _ in range(4):  # their 2-token prompts may take two steps when spare is small
        _run_step(scheduler)
    assert all(g.seqs[0].output_token_ids for g in decoders)
    long = SequenceGroup("long", [Sequence(list(range(1000, 1000 + prompt_len)))], 1.0)
    scheduler.add(long)
    for step in range(1, steps_bound + 1):
        out = _run_step(scheduler)
        decoded = {i.group.request_id for i in out.scheduled if i.num_query_tokens == 1}
        assert decoded >= {g.request_id for g in decoders}, (
            f"a decode missed step {step}"
        )
        assert out.num_batched_tokens <= config.max_num_batched_tokens
        (chunk,) = [i for i in out.scheduled if i.group is long]
        if chunk.seq_len == prompt_len:  # the chunk that ends the prompt samples
            break
    assert step == steps_bound and long.seqs[0].output_token_ids == [7]
    assert not out.preempted


def test_the_generate_command_takes_enable_chunked_prefill(capsys):
    from minipaged.cli import main

    prompt = "Paging splits memory into fixed-size blocks reached through a table."
    argv = ["generate", prompt, "--max-tokens", "6", "--num-gpu-blocks", "64"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    chunked = [*argv, "--enable-chunked-prefill", "--max-num-batched-tokens", "16"]
    chunked += ["--max-num-seqs", "4"]
    assert main(chunked) == 0
    assert capsys.readouterr().out == plain


def test_chunking_needs_iteration_batching():
    with pytest.raises(ValueError, match="enable_chunked_prefill needs batching="):
        engine("tiny-llama", 4, enable_chunked_prefill=True, batching="static")
    with pytest.raises(ValueError, match="enable_chunked_prefill must be a bool"):
        engine("tiny-llama", 4, enable_chunked_prefill="yes")
