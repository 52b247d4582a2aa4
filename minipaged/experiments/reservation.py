"""The baselines behind the scheduler's memory interface: one scheduler serves every system.

OS idea: mechanism vs policy. The CPU scheduler does not care how memory is allocated; it asks
the memory manager "can this process have its memory now?" and "can it grow?", and the manager
answers under its own rule (OSTEP ch. 2, 15-17). KV counterpart: vLLM paper section 6.1: Orca
(Max), Orca (Pow2) and Orca (Oracle) serve with the same iteration-level scheduling as vLLM and
differ only in their memory rule: one contiguous range per sequence, reserved at admission. So
the real Scheduler drives a ReservationManager exactly as it drives the BlockManager:

    LLM(runner=SimulatedRunner(...), block_manager=ReservationManager(ContiguousAllocator(...)))

A request of width W (n samples, or W beams) reserves W ranges at admission: nothing can be
shared, so each sample computes and stores the prompt itself, and a beam search keeps its W ranges
for its whole life (a dropped beam's range is reused by a forked child; beam_search.py frees
before it forks). When every sequence of a request is freed, its ranges go back to the allocator.
The ranges grow together, one slot a step, as the request's sequences do. Only vAttention's pages
can run short while a request grows; the scheduler then preempts by recompute, as for vLLM. There
is no swap space, and no prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minipaged.experiments.baselines import (
    POLICIES,
    ContiguousAllocator,
    reservation_size,
)
from minipaged.experiments.memory_breakdown import MemoryBreakdown
from minipaged.experiments.vattention import VAttentionAllocator
from minipaged.reference.block_manager import AllocStatus, BlockManager
from minipaged.reference.block_table import num_blocks_for
from minipaged.reference.memory_stats import MemoryStats, PoolStats
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus


@dataclass(frozen=True)
class RangeRequest:
    """What a baseline allocator is asked for: one range of a request (its k-th sequence)."""

    request_id: str  # "<request id>/<k>"
    prompt_len: int
    # the tokens it will generate (max_tokens): Oracle and Pow2 reserve by it
    output_len: int


@dataclass
class _Reservation:
    request_id: str
    ranges: list[RangeRequest]  # one per sequence the request may hold at once
    num_tokens: int  # tokens each range stores; the ranges grow together
    # live seq_id -> its range
    seq_range: dict[int, RangeRequest] = field(default_factory=dict)


class ReservationManager:
    """The scheduler's memory interface (as BlockManager's) over a baseline allocator.

    Args:
        allocator: a ContiguousAllocator (Orca's rules) or a VAttentionAllocator: anything with
            check, can_admit, try_admit, can_append, append, free and breakdown.
    """

    # what the engine reads each step besides device_stats(): nothing is copied on write,
    # swapped or found in a prefix cache
    cow_copies = blocks_swapped_out = blocks_swapped_in = 0
    prefix_cache_hits = prefix_cache_misses = 0

    def __init__(self, allocator: ContiguousAllocator | VAttentionAllocator) -> None:
        self.allocator = allocator
        # a contiguous range's unit is a slot
        self.block_size = getattr(allocator, "page_tokens", 1)
        self._reservations: dict[str, _Reservation] = {}  # request_id -> its ranges
        # live seq_id -> its request's reservation
        self._owner: dict[int, _Reservation] = {}

    def check_fits(
        self, num_prompt_tokens: int, max_tokens: int, num_seqs: int
    ) -> None:
        """Refuse a request whose num_seqs ranges could never fit, even alone in the pool.

        Raises:
            ValueError: naming the request's sizes (the allocator's check).
        """
        self.allocator.check(
            RangeRequest("request", num_prompt_tokens, max_tokens), copies=num_seqs
        )

    # ---- admission -----------------------------------------------------------------------------

    def can_allocate(self, group: SequenceGroup) -> AllocStatus:
        """OK if the allocator can place every range of the group now, else LATER (NEVER was
        refused at submission by check_fits)."""
        ranges, num_tokens = self._ranges_of(group)
        return (
            AllocStatus.OK
            if self.allocator.can_admit(ranges, num_tokens)
            else AllocStatus.LATER
        )

    def allocate(self, group: SequenceGroup) -> int:
        """Reserve every range of the group, each storing the group's tokens so far.

        Returns:
            0: nothing is cached; every sequence computes its prompt into its own range.

        Raises:
            ValueError: if the allocator cannot place them now (ask can_allocate first).
        """
        ranges, num_tokens = self._ranges_of(group)
        placed = []
        for r in ranges:
            if not self.allocator.try_admit(r, num_tokens):
                for done in placed:
                    self.allocator.free(done.request_id)
                raise ValueError(
                    f"group {group.request_id!r} does not fit now: ask can_allocate first"
                )
            placed.append(r)
        reservation = _Reservation(group.request_id, ranges, num_tokens)
        for seq, r in zip(group.get_unfinished_seqs(), ranges, strict=False):
            reservation.seq_range[seq.seq_id] = r
            self._owner[seq.seq_id] = reservation
        self._reservations[group.request_id] = reservation
        return 0

    def num_shared_tokens(self, seq: Sequence, first: Sequence) -> int:
        """0: ranges are never shared, so every sample computes its whole prompt."""
        return 0

    # ---- growth --------------------------------------------------------------------------------

    def can_append_slots(self, group: SequenceGroup) -> bool:
        """Can every range of the group store the token its sequences gained? A contiguous range
        always can (it was reserved for it); vAttention may need a page and find none."""
        reservation = self._reservations[group.request_id]
        longest = max(len(seq) for seq in group.get_unfinished_seqs())
        if longest <= reservation.num_tokens:
            return True
        return self.allocator.can_append(*(r.request_id for r in reservation.ranges))

    def try_append_slots(self, group: SequenceGroup) -> list[tuple[int, int]] | None:
        """The scheduler's question, as BlockManager.try_append_slots: grow the group's running
        sequences' ranges, or None (nothing changed) when one cannot grow."""
        if not self.can_append_slots(group):
            return None
        for seq in group.get_seqs(SequenceStatus.RUNNING):
            self.append_slots(seq)
        return []

    def append_slots(self, seq: Sequence) -> list[tuple[int, int]]:
        """Grow the sequence's request's ranges to its length; nothing is ever copied."""
        reservation = self._reservation_of(seq)
        while reservation.num_tokens < len(seq):
            for r in reservation.ranges:
                self.allocator.append(r.request_id)
            reservation.num_tokens += 1
        return []

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give the child a range of the request that no live sequence holds (a dropped beam's).

        Raises:
            ValueError: if every range of the request is held already.
        """
        reservation = self._reservation_of(parent)
        held = set(map(id, reservation.seq_range.values()))
        spare = next((r for r in reservation.ranges if id(r) not in held), None)
        if spare is None:
            raise ValueError(
                f"seq {parent.seq_id}: every reserved range is in use, none for a fork"
            )
        reservation.seq_range[child.seq_id] = spare
        self._owner[child.seq_id] = reservation

    def free(self, seq: Sequence) -> None:
        """Release the sequence's range to its request; the last one out returns them all."""
        reservation = self._reservation_of(seq)
        del reservation.seq_range[seq.seq_id], self._owner[seq.seq_id]
        if not reservation.seq_range:
            for r in reservation.ranges:
                self.allocator.free(r.request_id)
            del self._reservations[reservation.request_id]

    # ---- no swap space --------------------------------------------------------------------------

    def can_swap_out(self, group: SequenceGroup) -> bool:
        return False  # the scheduler then preempts by recompute

    def can_swap_in(self, group: SequenceGroup) -> bool:
        return False

    def swap_out(self, group: SequenceGroup):
        raise ValueError("the baselines have no swap space")

    swap_in = swap_out

    # ---- what memory looks like ----------------------------------------------------------------

    def breakdown(self, head: SequenceGroup | None = None) -> MemoryBreakdown:
        """The pool in the Fig. 3 categories; `head`: the group that waits for memory, if any."""
        if head is None:
            return self.allocator.breakdown()
        return self.allocator.breakdown(*self._ranges_of(head))

    @property
    def num_ranges(self) -> int:
        """Ranges reserved now (a request of width W holds W)."""
        return sum(len(r.ranges) for r in self._reservations.values())

    def device_stats(self) -> PoolStats:
        """The pool's figures the engine records each step (memory_stats' device)."""
        return self.memory_stats().device

    def memory_stats(self) -> MemoryStats:
        """The engine's per-step figures, a slot counting as a block: nothing is shared or swapped."""
        b = self.allocator.breakdown()
        used = b.capacity - b.free
        device = PoolStats(
            "device", b.capacity, b.free, used, 0, 0, b.token_states, used, 0
        )
        host = PoolStats("host", 0, 0, 0, 0, 0, 0, 0, 0)
        return MemoryStats(device, host, [], 0, 0, 0, 0, 0)

    def _ranges_of(self, group: SequenceGroup) -> tuple[list[RangeRequest], int]:
        first = group.get_unfinished_seqs()[0]
        if group.max_tokens is None:
            raise ValueError(
                f"group {group.request_id!r}: a reservation needs its max_tokens"
            )
        prompt_len = len(first.prompt_token_ids)
        ranges = [
            RangeRequest(f"{group.request_id}/{k}", prompt_len, group.max_tokens)
            for k in range(group.max_seqs)
        ]
        # after a recompute, the tokens generated before it too
        return ranges, len(first)

    def _reservation_of(self, seq: Sequence) -> _Reservation:
        if seq.seq_id not in self._owner:
            raise KeyError(f"seq {seq.seq_id} holds no range")
        return self._owner[seq.seq_id]


class ReservingBlockManager(BlockManager):
    """Orca's admission rule on a real paged pool: the measured stand-in for Orca (serving --measured).

    A real model needs real block tables, so the measured comparison keeps vLLM's pool and kernels
    and changes only the rule: a request is admitted only if the blocks for its whole reservation
    (experiments/baselines.py's reservation_size: max_model_len for "max", the true length for
    "oracle", ...) are free beyond those already promised to the running requests, and they stay
    promised to it until it finishes. So its appends never wait, nothing is preempted, and the
    memory it has not filled yet serves nobody else, which is what costs Orca its batch size.
    Placement is paged (no external fragmentation): the measured gap is the reservation's alone.
    Parallel samples and beams share blocks as in vLLM; the measured workloads use neither.

    Args:
        block_size: tokens per block, as BlockManager's.
        num_gpu_blocks: blocks in the pool, as BlockManager's.
        policy: "max", "pow2" or "oracle" (reservation_size).
        max_model_len: what "max" reserves.
    """

    def __init__(
        self, block_size: int, num_gpu_blocks: int, policy: str, max_model_len: int
    ) -> None:
        super().__init__(block_size, num_gpu_blocks, 0, 0.0)
        if policy not in POLICIES:
            raise ValueError(
                f"policy must be one of {', '.join(POLICIES)}, got {policy!r}"
            )
        self.policy, self.max_model_len = policy, max_model_len
        # request_id -> blocks of its whole reservation
        self._promised: dict[str, int] = {}
        self._group_of: dict[int, SequenceGroup] = {}  # live seq_id -> its group

    def reserved_blocks(self, num_prompt_tokens: int, max_tokens: int) -> int:
        """Blocks a request's reservation takes."""
        slots = reservation_size(
            self.policy, num_prompt_tokens, max_tokens, self.max_model_len
        )
        return num_blocks_for(slots, self.block_size)

    def check_fits(
        self, num_prompt_tokens: int, max_tokens: int, num_seqs: int
    ) -> None:
        needed = self.reserved_blocks(num_prompt_tokens, max_tokens)
        if needed > self.device.num_blocks:
            raise ValueError(
                f"a reservation of {needed} blocks ({self.policy}) can never fit a pool of "
                f"{self.device.num_blocks} blocks: this request can never fit"
            )

    def can_allocate(self, group: SequenceGroup) -> AllocStatus:
        """OK if the whole reservation fits beside what the running requests were promised."""
        first = group.get_unfinished_seqs()[0]
        needed = self.reserved_blocks(len(first.prompt_token_ids), group.max_tokens)
        return (
            AllocStatus.OK
            if needed <= self.device.num_free - self._outstanding()
            else AllocStatus.LATER
        )

    def allocate(self, group: SequenceGroup) -> int:
        num_cached = super().allocate(group)
        first = group.get_unfinished_seqs()[0]
        self._promised[group.request_id] = self.reserved_blocks(
            len(first.prompt_token_ids), group.max_tokens
        )
        for seq in group.get_unfinished_seqs():
            self._group_of[seq.seq_id] = group
        return num_cached

    def fork(self, parent: Sequence, child: Sequence) -> None:
        super().fork(parent, child)
        self._group_of[child.seq_id] = self._group_of[parent.seq_id]

    def free(self, seq: Sequence) -> None:
        super().free(seq)
        group = self._group_of.pop(seq.seq_id, None)
        if group is not None and not any(
            self._group_of.get(s.seq_id) is group for s in group.seqs
        ):
            # the last sequence out ends the reservation
            del self._promised[group.request_id]

    def _outstanding(self) -> int:
        """Blocks promised to running requests that they have not taken yet."""
        held: dict[str, int] = {}
        for seq_id, group in self._group_of.items():
            table = self.device_tables.get(seq_id)
            if table is not None:
                held[group.request_id] = max(held.get(group.request_id, 0), len(table))
        return sum(
            max(0, blocks - held.get(request_id, 0))
            for request_id, blocks in self._promised.items()
        )


__all__ = ["RangeRequest", "ReservationManager", "ReservingBlockManager"]
