"""Same decisions as before: the restructured policy against a frozen copy of the old one.

Issue 18 made the scheduler and the block manager cheaper per step: the running queue kept in
arrival order instead of sorted each step, one count of a group's blocks instead of two, the step's
tokens and the memory figures kept as counters. None of that may change a decision. So this state
machine runs two worlds side by side, the package's policy and `policy_before_issue18` (the code
at commit c5c4ed4), feeds them the same random requests, tokens, forks and aborts, and after every
step asserts the same admissions, chunks, preemptions, swaps and copies, the same block tables and
free lists, and the same memory statistics.

A sequence is named by its request and its place in the group (ids differ between the worlds).
"""

from __future__ import annotations

import itertools
import random

from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import tests.policy_before_issue18 as before
from minipaged.config import SchedulerConfig
from minipaged.reference import block_manager as after_bm
from minipaged.reference import scheduler as after_sched
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus

SYSTEM_PROMPT = list(range(50, 62))
EOS = 0


class World:
    """One policy (scheduler and block manager) and the requests it serves, driven as LLM.step."""

    def __init__(self, module_bm, module_sched, config: SchedulerConfig, pools) -> None:
        self.manager = module_bm.BlockManager(*pools)
        self.scheduler = module_sched.Scheduler(config, self.manager)
        self.groups: dict[str, SequenceGroup] = {}

    def add(self, request_id, prompt, n, max_seqs, arrival) -> None:
        first = Sequence(list(prompt))
        group = SequenceGroup(
            request_id,
            [first] + [first.fork() for _ in range(n - 1)],
            arrival,
            max_seqs=max_seqs,
        )
        self.groups[request_id] = group
        self.scheduler.add(group)

    def key(self, seq: Sequence) -> tuple[str, int]:
        for request_id, group in self.groups.items():
            for i, s in enumerate(group.seqs):
                if s is seq:
                    return request_id, i
        raise AssertionError(f"seq {seq.seq_id} belongs to no group")

    def decisions(self, out) -> dict:
        """A step's decisions, named so both worlds can be compared."""
        return {
            "scheduled": [
                (
                    self.key(item.seq),
                    item.num_query_tokens,
                    item.is_prefill,
                    item.num_computed_tokens,
                )
                for item in out.scheduled
            ],
            "num_batched_tokens": out.num_batched_tokens,
            "preempted": list(out.preempted),
            "deferred": list(out.deferred),
            "swap_out": list(out.blocks_to_swap_out),
            "swap_in": list(out.blocks_to_swap_in),
            "copy": list(out.blocks_to_copy),
        }

    def after_model(self, out, tokens: dict) -> None:
        """The engine's part: tokens computed, a token sampled where the step completes a
        sequence, a sequence finished at EOS or its max_tokens, a finished group dropped."""
        for item in out.scheduled:
            seq, group = item.seq, item.group
            seq.num_computed_tokens = item.seq_len
            if not item.completes_sequence:
                continue
            token, max_tokens = tokens[self.key(seq)]
            seq.append_token_id(token)
            if token == EOS or len(seq.output_token_ids) >= max_tokens:
                seq.status = SequenceStatus.FINISHED_STOPPED
                self.manager.free(seq)
            if group.is_finished() and group in self.scheduler.running:
                self.scheduler.finish(group)

    def state(self) -> dict:
        """Queues, sequences, tables and pools, by name."""
        s, m = self.scheduler, self.manager

        def tables(which: dict) -> dict:
            return {
                (rid, i): (
                    list(which[seq.seq_id].block_ids),
                    which[seq.seq_id].num_tokens,
                )
                for rid, g in self.groups.items()
                for i, seq in enumerate(g.seqs)
                if seq.seq_id in which
            }

        stats = m.memory_stats()
        names = {
            seq.seq_id: (rid, i)
            for rid, g in self.groups.items()
            for i, seq in enumerate(g.seqs)
        }
        return {
            # the old scheduler sorted the running queue at the start of a step: compare as a set
            "running": sorted(g.request_id for g in s.running),
            "waiting": [g.request_id for g in s.waiting],
            "swapped": [g.request_id for g in s.swapped],
            "seqs": {
                (rid, i): (seq.status, seq.num_computed_tokens, len(seq))
                for rid, g in self.groups.items()
                for i, seq in enumerate(g.seqs)
            },
            "device_tables": tables(m.device_tables),
            "host_tables": tables(m.host_tables),
            "device_free": m.device.free_list,
            "host_free": m.host.free_list,
            "ref_counts": [m.device.ref_count(b) for b in range(m.device.num_blocks)],
            "preemptions": dict(s.num_preemptions),
            "stats": (stats.device, stats.host),
            "seq_memory": sorted(
                (
                    names[m.seq_id],
                    m.location,
                    m.num_blocks,
                    m.slots_used,
                    m.slots_allocated,
                )
                for m in stats.seqs
            ),
            "counters": (
                stats.prefix_cache_hits,
                stats.prefix_cache_misses,
                stats.cow_copies,
                stats.blocks_swapped_out,
                stats.blocks_swapped_in,
            ),
        }


class SameDecisions(RuleBasedStateMachine):
    """The package's policy and the frozen one, fed the same workload, step by step."""

    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        num_gpu_blocks=st.integers(4, 24),
        num_cpu_blocks=st.integers(0, 16),
        watermark=st.sampled_from([0.0, 0.1]),
        max_num_seqs=st.integers(3, 8),
        extra_tokens=st.integers(0, 20),
        preemption_mode=st.sampled_from(["recompute", "swap"]),
        prefix_caching=st.booleans(),
        mode=st.sampled_from(["iteration", "chunked", "static"]),
    )
    def setup(
        self,
        block_size,
        num_gpu_blocks,
        num_cpu_blocks,
        watermark,
        max_num_seqs,
        extra_tokens,
        preemption_mode,
        prefix_caching,
        mode,
    ):
        config = SchedulerConfig(
            1024,
            max_num_seqs,
            max_num_seqs + extra_tokens,
            preemption_mode,
            batching="static" if mode == "static" else "iteration",
            enable_chunked_prefill=mode == "chunked",
        )
        pools = (block_size, num_gpu_blocks, num_cpu_blocks, watermark, prefix_caching)
        self.worlds = [
            World(before, before, config, pools),
            World(after_bm, after_sched, config, pools),
        ]
        self.clock = itertools.count()
        self.max_tokens: dict[str, int] = {}

    def _both(self, fn) -> list:
        return [fn(world) for world in self.worlds]

    @rule(
        prefix_len=st.sampled_from([0, 3, 8, 12]),
        tail=st.lists(st.integers(1, 9), min_size=0, max_size=10),
        n=st.integers(1, 3),
        forks_later=st.booleans(),
        max_tokens=st.integers(1, 16),
        copies=st.integers(1, 4),
    )
    def add_requests(self, prefix_len, tail, n, forks_later, max_tokens, copies):
        """`copies` requests with one prompt: a burst, so memory runs short."""
        prompt = SYSTEM_PROMPT[:prefix_len] + tail or [7]
        try:
            # the one fit test, asked as the engine asks it at submission
            self.worlds[0].manager.check_fits(len(prompt), max_tokens, n)
        except ValueError:
            return
        if n > self.worlds[0].scheduler.config.max_num_seqs:
            return
        for _ in range(copies):
            request_id = str(next(self.clock))
            self.max_tokens[request_id] = max_tokens
            # a beam search starts with one sequence and forks into its width later
            first = 1 if forks_later else n
            for world in self.worlds:
                world.add(request_id, prompt, first, n, float(request_id))

    @rule(data=st.data(), steps=st.integers(1, 3))
    def step(self, data, steps):
        """A few engine steps, each compared as it is decided and once it is carried out."""
        for _ in range(steps):
            if not self.worlds[0].scheduler.has_unfinished():
                return
            self._one_step(data.draw)
            self.same_state()

    def _one_step(self, draw) -> before.SchedulerOutput:
        outs = self._both(lambda w: w.scheduler.schedule())
        decisions = [w.decisions(out) for w, out in zip(self.worlds, outs, strict=True)]
        assert decisions[0] == decisions[1]
        if decisions[0]["preempted"]:
            event(f"preempted by {decisions[0]['preempted'][0][1]}")
        if decisions[0]["copy"]:
            event("copy-on-write")
        if any(item[2] and item[3] for item in decisions[0]["scheduled"]):
            event("a prefill after cached or computed tokens")
        if decisions[0]["deferred"]:
            event("deferred by the budget")
        tokens = {}
        for item in outs[0].scheduled:
            key = self.worlds[0].key(item.seq)
            tokens[key] = (
                draw(st.integers(EOS, 19)),  # EOS one time in twenty
                self.max_tokens[key[0]],
            )
        for world, out in zip(self.worlds, outs, strict=True):
            world.after_model(out, tokens)
        return outs[0]

    @rule(data=st.data())
    def fork(self, data):
        """A beam search forks a running sequence (LLM does so after its step)."""
        candidates = [
            (rid, i)
            for rid, g in self.worlds[0].groups.items()
            if len(g.seqs) < g.max_seqs and not g.is_finished()
            for i, seq in enumerate(g.seqs)
            if seq.status == SequenceStatus.RUNNING and seq.num_uncomputed_tokens == 1
        ]
        if not candidates:
            return
        rid, i = data.draw(st.sampled_from(candidates))
        event("fork")
        for world in self.worlds:
            group = world.groups[rid]
            parent = group.seqs[i]
            child = parent.fork()
            world.manager.fork(parent, child)
            group.add(child)

    @rule(data=st.data(), now=st.integers(0, 3))
    def abort(self, data, now):
        """Cancel a request wherever it is (one time in four the rule is drawn: steps come first)."""
        unfinished = [
            rid for rid, g in self.worlds[0].groups.items() if not g.is_finished()
        ]
        if now or not unfinished:
            return
        rid = data.draw(st.sampled_from(unfinished))
        event("abort")
        for world in self.worlds:
            world.scheduler.abort(world.groups[rid])

    @invariant()
    def same_state(self):
        if hasattr(self, "worlds"):
            states = self._both(World.state)
            assert states[0] == states[1]


SameDecisions.TestCase.settings = settings(
    max_examples=200, stateful_step_count=60, deadline=None
)
TestSameDecisions = SameDecisions.TestCase


@settings(max_examples=120, deadline=None)
@given(
    block_size=st.sampled_from([1, 2, 4]),
    num_gpu_blocks=st.integers(6, 24),
    num_cpu_blocks=st.integers(0, 24),
    max_num_seqs=st.integers(2, 8),
    extra_tokens=st.integers(0, 24),
    preemption_mode=st.sampled_from(["recompute", "swap"]),
    prefix_caching=st.booleans(),
    mode=st.sampled_from(["iteration", "chunked", "static"]),
    requests=st.lists(
        st.tuples(
            st.integers(0, 12),  # system-prompt tokens
            st.integers(1, 12),  # own tokens
            st.integers(1, 3),  # n
            st.integers(4, 20),  # max_tokens
            st.integers(0, 6),  # arrives before this step
        ),
        min_size=4,
        max_size=16,
    ),
    seed=st.integers(0, 2**16),
)
def test_same_decisions_under_memory_pressure(
    block_size,
    num_gpu_blocks,
    num_cpu_blocks,
    max_num_seqs,
    extra_tokens,
    preemption_mode,
    prefix_caching,
    mode,
    requests,
    seed,
):
    """A burst of long requests on a small pool, run to the end: preemption at most steps."""
    machine = SameDecisions()
    machine.setup(
        block_size,
        num_gpu_blocks,
        num_cpu_blocks,
        0.1,
        max_num_seqs,
        extra_tokens,
        preemption_mode,
        prefix_caching,
        mode,
    )
    rng = random.Random(seed)
    preempted = 0
    for step in range(400):
        for prefix, own, n, max_tokens, arrives in requests:
            if arrives == step:
                tail = [rng.randint(1, 9) for _ in range(own)]
                machine.add_requests(prefix, tail, n, False, max_tokens, 1)
        scheduler = machine.worlds[0].scheduler
        if not scheduler.has_unfinished():
            if step > max(r[4] for r in requests):
                break
            continue
        out = machine._one_step(lambda strategy: rng.randint(EOS, 19))
        preempted += len(out.preempted)
        machine.same_state()
    else:
        raise AssertionError("the workload did not finish in 400 steps")
    if preempted:
        event("preempted")
