"""Iteration-level scheduling with preemption: which sequences run in the next model step.

OS idea: a CPU scheduler picks, at every tick, which ready processes run; when memory runs short the
kernel picks a victim and evicts its pages, either to swap or by dropping pages it can rebuild
(OSTEP ch. 7-9 on scheduling, ch. 21-22 on swapping and replacement). KV counterpart: vLLM paper
section 4.5, "Scheduling and preemption", with Orca's iteration-level batching: the batch is formed
anew at every step, so a finished sequence leaves and a waiting one joins at once.

The policy, first come first served:

1. Running groups, oldest first, each get the slots for their next token. When the pool is short, the
   most recently arrived running group is preempted, all its sequences at once (a group's samples or
   beams share blocks, so they go together): by "swap" (its blocks go to the host pool) or by
   "recompute" (its blocks are freed and it re-enters the waiting queue at the front, to prefill its
   prompt and its generated tokens again). Swap falls back to recompute when the host pool is full.
2. Swapped groups come back, oldest first, before any new request is admitted.
3. Waiting groups are admitted in arrival order while the block manager says OK (its watermark keeps
   a few blocks free for the running ones to grow) and the step's budget allows. No group is admitted
   in a step that preempted one, and none jumps the queue: a LATER stops admission.

The token budget, max_num_batched_tokens, bounds every step: the three phases spend it in that order,
decodes, swapped-in decodes and prefills alike, and a group runs whole or not at all. The first group
that does not fit ends the step for everyone newer (FCFS): a running group keeps its blocks and runs
at the next step, a swapped or waiting one stays where it is. SchedulerConfig keeps the budget at
least max_num_seqs, so the decodes alone always fit. The one step that may pass the budget is a step
with nothing else in it: a group whose prefill is larger than the whole budget (a prompt longer than
the budget, or a request preempted by recompute after it grew past it) then runs alone, since
without chunked prefill it could never run otherwise.

With `batching="static"` (SchedulerConfig), step 3 runs only when nothing is running: a batch is
admitted, runs until its last request finishes, and only then is the next one formed, as in
FasterTransformer and other systems before Orca. The experiments use it as that baseline.

By default a whole prompt is computed in one step: simpler to read. With `enable_chunked_prefill`
(SchedulerConfig) a prompt gets a quantum instead, as a round-robin CPU scheduler gives a long job
(docs/concepts/chunked-prefill.md): the decodes run first, then the prompts started earlier get
their next chunk, then new prompts are admitted, the first that does not fit whole with a chunk of
what is left of the budget. A chunk's blocks are allocated when it runs (demand paging), and a
prompt computed in part is preempted by recompute. Either way the prefix cache publishes a block
in the step that writes its K/V, since a block enters a table only with the chunk that fills it.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from minipaged.config import SchedulerConfig
from minipaged.reference.block_manager import AllocStatus, BlockManager
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus

BlockMapping = list[tuple[int, int]]


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence in the next step: it computes `num_query_tokens` tokens, those after the
    `num_computed_tokens` whose K/V the cache holds (its whole rest, or a chunk of its prompt)."""

    group: SequenceGroup
    seq: Sequence
    # q_len: the whole uncached prompt for a prefill (or one chunk of it), 1 for a decode
    num_query_tokens: int
    # computes prompt tokens: admitted this step (new, or to recompute), or a prompt's chunk
    is_prefill: bool = False
    # fixed when scheduled: the tokens before the query
    num_computed_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_computed_tokens = self.seq.num_computed_tokens

    @property
    def seq_len(self) -> int:
        """The tokens its attention reads this step: those cached and the query's."""
        return self.num_computed_tokens + self.num_query_tokens

    @property
    def completes_sequence(self) -> bool:
        """Does the step compute its last token (so a next token is sampled)? Not so for a chunk
        that leaves part of a prompt for later steps."""
        return self.seq_len == len(self.seq)


@dataclass
class SchedulerOutput:
    """The decisions of one step, in the order the engine carries them out.

    Sequences join the step through `add`, which keeps `num_batched_tokens`, the step's query
    tokens, as a counter: the scheduler asks it before every group it adds, and a sum taken
    anew each time would cost N * N / 2 additions over N groups.
    """

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    # (device, host), done first
    blocks_to_swap_out: BlockMapping = field(default_factory=list)
    # (host, device), done second
    blocks_to_swap_in: BlockMapping = field(default_factory=list)
    # copy-on-write (src, dst), done third
    blocks_to_copy: BlockMapping = field(default_factory=list)
    # (request_id, "swap" | "recompute")
    preempted: list[tuple[str, str]] = field(default_factory=list)
    # running request_ids left out by the token budget
    deferred: list[str] = field(default_factory=list)
    # query tokens the step computes (prefills and decodes): at most max_num_batched_tokens
    num_batched_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_batched_tokens = sum(s.num_query_tokens for s in self.scheduled)

    def add(self, item: ScheduledSeq) -> None:
        """Put a sequence in the step and count its tokens."""
        self.scheduled.append(item)
        self.num_batched_tokens += item.num_query_tokens


class Scheduler:
    """Three queues (waiting, running, swapped) and the policy above.

    Args:
        config: the budget and the preemption mode.
        block_manager: the memory manager whose decisions the schedule carries: a BlockManager,
            or anything that answers the same calls (can_allocate, allocate, num_shared_tokens,
            try_append_slots, append_slots, free, can_swap_out, swap_out, can_swap_in, swap_in).
            The experiments serve the paper's baselines through this interface
            (experiments/reservation.py), so one scheduler serves every system.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []
        self.swapped: list[SequenceGroup] = []
        self.num_preemptions = {"recompute": 0, "swap": 0}

    def add(self, group: SequenceGroup) -> None:
        """Queue a new request (the engine has checked that it can ever fit)."""
        self.waiting.append(group)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self) -> SchedulerOutput:
        """Decide the next step: who runs, what to swap and copy, whom to preempt."""
        out = SchedulerOutput()
        preempted = self._schedule_running(out)
        if not preempted:
            self._schedule_swapped(out)
        if self.config.enable_chunked_prefill and not preempted:
            # a preemption, or a started prompt waiting for blocks, holds admission back
            preempted = self._continue_prompts(out)
        # the batch runs on
        static_busy = self.config.batching == "static" and bool(self.running)
        if not preempted and not self.swapped and not static_busy:
            self._schedule_waiting(out)
            if self.config.enable_chunked_prefill:
                self._admit_first_chunk(out)
        return out

    def finish(self, group: SequenceGroup) -> None:
        """Drop a finished group from the running queue (its blocks are already freed)."""
        self.running.remove(group)

    def abort(self, group: SequenceGroup) -> None:
        """Cancel a group wherever it is (like kill(2)): free the blocks its sequences hold, on the
        device or the host, and drop it from its queue. Its unfinished sequences end FINISHED_ABORTED."""
        for queue in (self.waiting, self.running, self.swapped):
            if group in queue:
                queue.remove(group)
        for seq in group.get_unfinished_seqs():
            if seq.status in (SequenceStatus.RUNNING, SequenceStatus.SWAPPED):
                self.block_manager.free(seq)  # a waiting sequence holds nothing
            seq.status = SequenceStatus.FINISHED_ABORTED

    # ---- the three phases
    # --------------------------------------------------------------------

    def _schedule_running(self, out: SchedulerOutput) -> bool:
        """Give each running group its next slots, oldest first; preempt the newest when short.

        A group that does not fit the token budget, and every newer one, waits a step with its blocks.

        Returns:
            True if a group was preempted (then no swapped or waiting group may start this step).
        """
        manager = self.block_manager
        # oldest first: the queue is kept in arrival order (_run), never sorted
        queue = deque(self.running)
        kept: list[SequenceGroup] = []
        preempted = False
        while queue:
            group = queue.popleft()
            seqs = group.get_seqs(SequenceStatus.RUNNING)
            if self._computing_prompt(group):
                # chunked prefill: its next chunk comes after the decodes
                kept.append(group)
                continue
            if not self._fits_budget(out, seqs):
                out.deferred += [g.request_id for g in (group, *queue)]
                # no preemption: they keep their blocks and run next step
                kept += [group, *queue]
                break
            # one question to the manager: the slots, or None if the pool is short
            while (copies := manager.try_append_slots(group)) is None:
                # the most recently arrived running group
                victim = self._choose_victim(queue, group)
                self._preempt(victim, out)
                preempted = True
                if victim is group:
                    break
            else:
                out.blocks_to_copy += copies
                for seq in seqs:
                    out.add(ScheduledSeq(group, seq, seq.num_uncomputed_tokens))
                kept.append(group)
        self.running = kept
        return preempted

    def _schedule_swapped(self, out: SchedulerOutput) -> None:
        """Bring swapped groups back, oldest first, while each fits with room to append a token."""
        if not self.swapped:  # the usual step: nobody to bring back
            return
        # BEGIN SOLUTION 3.3
        manager = self.block_manager
        # counted once, then kept up to date: not once per group (N * N over N groups)
        num_running = self._num_running_seqs()
        while self.swapped:
            group = self.swapped[0]
            seqs = group.get_seqs(SequenceStatus.SWAPPED)
            if num_running + len(seqs) > self.config.max_num_seqs:
                break
            # each decodes the token it sampled before the swap
            if not self._fits_budget(out, seqs):
                break
            # its blocks and those its next tokens need
            if not manager.can_swap_in(group):
                break
            self.swapped.pop(0)
            out.blocks_to_swap_in += manager.swap_in(group)
            for seq in seqs:
                seq.status = SequenceStatus.RUNNING
                # the token sampled before the swap
                out.blocks_to_copy += manager.append_slots(seq)
                out.add(ScheduledSeq(group, seq, seq.num_uncomputed_tokens))
            self._run(group)
            num_running += self._seqs_held(group)
        # END SOLUTION

    def _schedule_waiting(self, out: SchedulerOutput) -> None:
        """Admit waiting groups in arrival order while memory and the step's budget allow."""
        # nobody to admit: the running sequences need not even be counted
        if not self.waiting:
            return
        # BEGIN SOLUTION 3.1
        manager = self.block_manager
        # counted once, then kept up to date: not once per group (N * N over N groups)
        num_running = self._num_running_seqs()
        while self.waiting:
            group = self.waiting[0]
            seqs = group.get_unfinished_seqs()
            if num_running + group.max_seqs > self.config.max_num_seqs:
                break
            # its whole prompt (and any output) at most
            if not self._fits_budget(out, seqs):
                break
            status = manager.can_allocate(group)
            # LATER: wait for blocks; NEVER is refused at submission
            if status != AllocStatus.OK:
                break
            self.waiting.popleft()
            num_cached = manager.allocate(group)
            for i, seq in enumerate(seqs):
                seq.num_computed_tokens = (
                    num_cached if i == 0 else manager.num_shared_tokens(seq, seqs[0])
                )
                seq.status = SequenceStatus.RUNNING
                out.add(
                    ScheduledSeq(group, seq, seq.num_uncomputed_tokens, is_prefill=True)
                )
            self._run(group)
            num_running += self._seqs_held(group)
        # END SOLUTION

    # ---- the token budget
    # --------------------------------------------------------------------

    def _fits_budget(self, out: SchedulerOutput, seqs: list[Sequence]) -> bool:
        """May these sequences of one group join the step without passing max_num_batched_tokens?

        They would compute at most their uncomputed tokens: 1 for a decode, the whole sequence for
        a prefill (a prefix-cache hit or a block shared with a sibling only lowers that). Once a
        running group waits for the budget, no newer group takes the tokens it left (FCFS). A step
        with nothing in it takes any group, so one larger than the whole budget still runs, alone.
        """
        if out.deferred:
            return False
        # with chunked prefill, one sequence's prompt is cut to fit instead
        if not out.scheduled and (
            not self.config.enable_chunked_prefill or len(seqs) > 1
        ):
            return True
        # a loop: for the usual group of one, cheaper than sum() over a generator
        num_new_tokens = 0
        for seq in seqs:
            num_new_tokens += seq.num_uncomputed_tokens
        return (
            out.num_batched_tokens + num_new_tokens
            <= self.config.max_num_batched_tokens
        )

    # ---- chunked prefill: time slicing with a quantum
    # ------------------------------------------------

    def _computing_prompt(self, group: SequenceGroup) -> bool:
        """With chunked prefill: has the group more than one token still to compute (a prompt
        started in an earlier step)? One token left is a decode, chunked or not."""
        return self.config.enable_chunked_prefill and any(
            seq.num_uncomputed_tokens > 1
            for seq in group.get_seqs(SequenceStatus.RUNNING)
        )

    def _budget_left(self, out: SchedulerOutput) -> int:
        """Tokens the step may still take; none once a running group waits for the budget."""
        if out.deferred:
            return 0
        return max(0, self.config.max_num_batched_tokens - out.num_batched_tokens)

    def _continue_prompts(self, out: SchedulerOutput) -> bool:
        """Give the prompts started in earlier steps their next chunk, oldest first, from what
        the decodes left of the budget. A chunk's blocks are allocated now (demand paging).

        A prompt short of blocks waits, and no newer prompt may take blocks before it (FCFS):
        the running decodes will free some, or preempt the newest running groups to grow. Only
        in a step where nothing else runs, so nothing would ever free blocks, is the newest
        started prompt preempted (maybe this one).

        Returns:
            True if no new prompt may start this step (a preemption, or a prompt waiting for
            blocks).
        """
        manager = self.block_manager
        # oldest first, as the running queue is
        started = deque(g for g in self.running if self._computing_prompt(g))
        while started and self._budget_left(out) > 0:
            group = started.popleft()
            # one sequence: samples and beams fork once the prompt is computed
            (seq,) = group.get_seqs(SequenceStatus.RUNNING)
            chunk = min(seq.num_uncomputed_tokens, self._budget_left(out))
            copies = manager.try_append_slots(group, chunk)
            if copies is not None:
                out.blocks_to_copy += copies
                out.add(ScheduledSeq(group, seq, chunk, is_prefill=True))
                continue
            if out.scheduled:
                return True  # it waits for blocks, and so does every newer prompt
            victim = started.pop() if started else group
            self._preempt(victim, out)
            self.running.remove(victim)
            if victim is not group:
                started.appendleft(group)  # try again with the victim's blocks
        return bool(out.preempted)

    def _admit_first_chunk(self, out: SchedulerOutput) -> None:
        """Start the first waiting prompt that `_schedule_waiting` could not take whole (too
        long for the budget left, or its whole prompt short of blocks), with a first chunk
        that fills what is left of the budget. A group of several sequences (back from a
        recompute) is never cut: it waits to be taken whole."""
        manager = self.block_manager
        left = self._budget_left(out)
        if not self.waiting or left == 0:
            return
        group = self.waiting[0]
        seqs = group.get_unfinished_seqs()
        if len(seqs) > 1:
            return
        if self._num_running_seqs() + group.max_seqs > self.config.max_num_seqs:
            return
        if manager.can_allocate(group, chunk=left) != AllocStatus.OK:
            return
        self.waiting.popleft()
        (seq,) = seqs
        seq.num_computed_tokens = manager.allocate(group, chunk=left)
        seq.status = SequenceStatus.RUNNING
        # the cached prefix needs no computing: the chunk is what follows it
        num_tokens = manager.get_block_table(seq).num_tokens - seq.num_computed_tokens
        out.add(ScheduledSeq(group, seq, num_tokens, is_prefill=True))
        self._run(group)

    # ---- preemption
    # --------------------------------------------------------------------------

    def _choose_victim(
        self, queue: deque[SequenceGroup], group: SequenceGroup
    ) -> SequenceGroup:
        """The group to preempt so that `group` can grow: the most recently arrived running group.

        Args:
            queue: the running groups not yet given their slots this step, oldest first, all
                newer than `group`; a victim taken from it leaves it.
            group: the group that needs room; the victim itself when `queue` is empty.
        """
        # BEGIN SOLUTION 3.2
        return queue.pop() if queue else group
        # END SOLUTION

    def _preempt(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        """Evict a whole group: swap it out if asked and the host has room, else free it to recompute."""
        # BEGIN SOLUTION 3.2
        manager = self.block_manager
        seqs = group.get_seqs(SequenceStatus.RUNNING)
        swap = self.config.preemption_mode == "swap"
        # a prompt computed in part is recomputed: swapped back, it would need its
        # whole rest in one step
        if swap and not self._computing_prompt(group) and manager.can_swap_out(group):
            out.blocks_to_swap_out += manager.swap_out(group)
            for seq in seqs:
                seq.status = SequenceStatus.SWAPPED
            self.swapped.append(group)
            self.swapped.sort(key=lambda g: g.arrival_time)
            mode = "swap"
        else:
            for seq in seqs:
                manager.free(seq)
                seq.status = SequenceStatus.WAITING
                # its K/V are gone: the next prefill recomputes them
                seq.num_computed_tokens = 0
            # victims are preempted newest first, so the oldest ends up first
            self.waiting.appendleft(group)
            mode = "recompute"
        self.num_preemptions[mode] += 1
        out.preempted.append((group.request_id, mode))
        # END SOLUTION

    def _run(self, group: SequenceGroup) -> None:
        """Put a group in the running queue at its place in arrival order.

        Groups mostly arrive in order, so this is mostly an append; a group back from a
        preemption may be older than some that run. Kept in order as groups join, the queue
        is never sorted: the kernel's run queue works the same way.
        """
        bisect.insort(self.running, group, key=lambda g: g.arrival_time)

    def _num_running_seqs(self) -> int:
        """Sequences the running groups hold, or may still fork into: a beam search admitted with one
        sequence forks into its beam width at its first step, so it counts its width from the start
        (vLLM's get_max_num_running_seqs); a group's finished samples no longer count."""
        return sum(self._seqs_held(g) for g in self.running)

    def _seqs_held(self, group: SequenceGroup) -> int:
        """What one running group counts against max_num_seqs (see `_num_running_seqs`)."""
        running = len(group.get_seqs(SequenceStatus.RUNNING))
        if running >= group.max_seqs:  # all its width runs (the usual group of one)
            return running
        return max(running, group.max_seqs - sum(s.is_finished() for s in group.seqs))
