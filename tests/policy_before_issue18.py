"""The CPU-side policy as it was before issue 18 (commit c5c4ed4): the oracle of test_same_decisions.py.

A frozen copy of minipaged/reference/block_manager.py, scheduler.py and memory_stats.py's
pool_stats at that commit, with the solution fences and the modules' docstrings dropped, so that
the restructured policy can be held to the decisions the old one made: same admissions,
preemptions, block tables, copies and memory statistics, step by step. Do not edit it to follow
the package: it is the "before". It holds every task's solution, so the student copy leaves it
out (assignments.INSTRUCTOR_ONLY).
"""

from __future__ import annotations

import enum
import itertools
from collections import Counter, deque
from dataclasses import dataclass, field

from minipaged.config import SchedulerConfig
from minipaged.reference.block_allocator import BlockAllocator, NoFreeBlocksError
from minipaged.reference.block_table import BlockTable, num_blocks_for
from minipaged.reference.memory_stats import MemoryStats, PoolStats, SeqMemory
from minipaged.reference.prefix_cache import (
    PrefixCachingBlockAllocator,
    hash_full_blocks,
)
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus

# (src block, dst block) pairs for copy_blocks / swap_blocks
BlockMapping = list[tuple[int, int]]


def pool_stats(
    pool: BlockAllocator, tables: dict[int, BlockTable], block_size: int
) -> PoolStats:
    """The state of `pool`, whose blocks the block tables `tables` hold.

    Every block of a table but its last is full (a table fills its blocks in order), so only the
    last blocks are looked at one by one; the rest is counted in bulk. A block's reference count is
    the number of tables that hold it, so a shared block is one that two or more tables name.
    """
    holders = Counter(
        itertools.chain.from_iterable(t.block_ids for t in tables.values())
    )
    full = set(itertools.chain.from_iterable(t.block_ids[:-1] for t in tables.values()))
    # a table's last block -> the most slots any holder filled in it
    last_fill: dict[int, int] = {}
    for table in tables.values():
        if table.block_ids:
            block = table.block_ids[-1]
            fill = table.num_tokens - (len(table.block_ids) - 1) * block_size
            last_fill[block] = max(last_fill.get(block, 0), fill)
    partial = sum(
        block_size - fill for block, fill in last_fill.items() if block not in full
    )
    return PoolStats(
        name=pool.name,
        num_blocks=pool.num_blocks,
        num_free=pool.num_free,
        num_used=pool.num_used,
        num_shared=sum(count > 1 for count in holders.values()),
        num_cached_free=getattr(pool, "num_cached_free", 0),
        slots_used=len(holders) * block_size - partial,
        slots_allocated=pool.num_used * block_size,
        blocks_saved_by_sharing=holders.total() - len(holders),
    )


class AllocStatus(enum.Enum):
    """can_allocate's answer: admit now, wait for memory, or never (the request cannot fit at all)."""

    OK = "ok"
    LATER = "later"
    NEVER = "never"


class BlockManager:
    """Allocates, shares, copies, swaps and frees the KV blocks of sequence groups.

    Args:
        block_size: tokens per block.
        num_gpu_blocks: blocks in the device pool.
        num_cpu_blocks: blocks in the host pool (the swap space); 0 disables swapping.
        watermark: fraction of device blocks kept free at admission, so running sequences can
            still grow without being preempted at once (vLLM's default, 1%).
        enable_prefix_caching: reuse full blocks across requests by their hash (prefix_cache.py).

    Raises:
        ValueError: for a non-positive block_size, pool sizes that are not non-negative ints, or a
            watermark outside [0, 1).
    """

    def __init__(
        self,
        block_size: int,
        num_gpu_blocks: int,
        num_cpu_blocks: int = 0,
        watermark: float = 0.01,
        enable_prefix_caching: bool = False,
    ) -> None:
        for name, value, least in (
            ("block_size", block_size, 1),
            ("num_gpu_blocks", num_gpu_blocks, 0),
            ("num_cpu_blocks", num_cpu_blocks, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if not isinstance(watermark, (int, float)) or not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {watermark!r}")
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_gpu_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        device_cls = (
            PrefixCachingBlockAllocator if enable_prefix_caching else BlockAllocator
        )
        self.device: BlockAllocator = device_cls(num_gpu_blocks, "device")
        self.host = BlockAllocator(num_cpu_blocks, "host")
        # seq_id -> table of device blocks
        self.device_tables: dict[int, BlockTable] = {}
        # seq_id -> table of host blocks (swapped out)
        self.host_tables: dict[int, BlockTable] = {}
        # seq_id -> hashes of its full blocks
        self._block_hashes: dict[int, list[str]] = {}
        self.cow_copies = 0
        self.blocks_swapped_out = 0
        self.blocks_swapped_in = 0

    # ---- admission and allocation (demand paging)
    # -------------------------------------------

    def can_allocate(
        self, seq_group: SequenceGroup, chunk: int | None = None
    ) -> AllocStatus:
        """Could the group's prompt blocks be allocated now, while keeping the watermark free?

        NEVER means the prompt needs more blocks than the pool has above the watermark, however
        long one waits: the caller must refuse the request. LATER means wait for blocks to free.
        With `chunk` (chunked prefill), OK and LATER are about the blocks of its cached prefix
        and `chunk` more tokens; NEVER is still about the whole sequence.
        """
        seqs = self._seqs_to_allocate(seq_group)
        worst_case = self._blocks_to_allocate(seqs, use_prefix_cache=False)
        if self.device.num_blocks - worst_case < self.watermark_blocks:
            return AllocStatus.NEVER
        needed = self._blocks_to_allocate(seqs, use_prefix_cache=True, chunk=chunk)
        if self._num_free_after_prefix_hits(seqs[0]) - needed >= self.watermark_blocks:
            return AllocStatus.OK
        return AllocStatus.LATER

    def check_fits(
        self, num_prompt_tokens: int, max_tokens: int, num_seqs: int
    ) -> None:
        """Refuse a request that could never fit, however long it waited: the one fit test.

        Its sequences share the prompt's full blocks (fork) and each needs its own blocks for the
        rest. The last token's K/V is never stored (the request ends when it is sampled), so a
        sequence holds at most num_prompt_tokens + max_tokens - 1 tokens. The engine asks this at
        submission, so a request that can never run is refused then, never returned empty.

        Raises:
            ValueError: if the blocks needed exceed the device pool above the watermark.
        """
        total = num_prompt_tokens + max_tokens
        # the prompt's full blocks, shared by all
        shared = num_prompt_tokens // self.block_size
        per_seq = num_blocks_for(total - 1, self.block_size) - shared
        needed = shared + num_seqs * per_seq
        usable = self.device.num_blocks - self.watermark_blocks
        if needed > usable:
            raise ValueError(
                f"prompt plus max_tokens needs {needed} blocks of {self.block_size} for its {num_seqs} "
                f"sequence(s), beyond the device pool's {usable} usable blocks: this request can never fit"
            )

    def allocate(self, seq_group: SequenceGroup, chunk: int | None = None) -> int:
        """Give every unfinished sequence of the group the blocks for all of its tokens.

        Sequences with the same tokens (a new request's n samples) share every block; sequences that
        differ (a diverged group re-admitted after recompute) share their common full blocks. With
        prefix caching, full blocks already cached are reused instead of allocated.

        With `chunk` (chunked prefill, one sequence), its table holds only the cached prefix
        and the first `chunk` tokens after it: demand paging, one chunk at a time; append_slots
        with `chunk` grows it later.

        Returns:
            How many of the first sequence's tokens were found in the prefix cache: their K/V are
            already in the pool and need no computing (a multiple of block_size, always less than
            the sequence's length so the last token is computed; 0 without caching).

        Raises:
            ValueError: if a sequence of the group already holds blocks, or `chunk` is given
                for a group of several sequences.
            NoFreeBlocksError: if the device pool is too small right now (nothing is allocated).
        """
        seqs = self._seqs_to_allocate(seq_group)
        if chunk is not None and len(seqs) > 1:
            raise ValueError(
                f"chunk is for a group of one sequence; {seq_group.request_id!r} has {len(seqs)}"
            )
        needed = self._blocks_to_allocate(seqs, use_prefix_cache=True, chunk=chunk)
        available = self._num_free_after_prefix_hits(seqs[0])
        if needed > available:
            raise NoFreeBlocksError(
                f"group {seq_group.request_id!r} needs {needed} blocks, {available} free"
            )
        first, *others = seqs
        # task 1.6: [] without prefix caching
        shared = self._cached_prefix(first)
        table = BlockTable(self.block_size, shared, len(shared) * self.block_size)
        target = self._slots_target(first, table.num_tokens, chunk)
        table.append_tokens(target - table.num_tokens, self.device.allocate)
        self._install(first, table)
        for seq in others:
            self._allocate_sharing(seq, first)
        return len(shared) * self.block_size

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The blocks of the prefix cache that hold `seq`'s leading full blocks (task 1.6).

        Like a process mapping a shared library from the page cache: the blocks are shared, their
        count raised, and the prefill skips their tokens. Only the matchable hashes count
        (`_matchable_hashes`): never the block with the prompt's last token, whose logits must be
        computed. Without prefix caching there is no cache to look in: [].
        """
        if not isinstance(self.device, PrefixCachingBlockAllocator):
            return []
        return self.device.match_prefix(self._matchable_hashes(seq))

    def can_append_slots(
        self, seq_group: SequenceGroup, chunk: int | None = None
    ) -> bool:
        """Are there free blocks for every device-resident sequence of the group to add its new
        tokens (at most `chunk` of them each, with chunked prefill)?"""
        seqs = self._seqs_on(seq_group, self.device_tables)
        return (
            self._group_blocks_to_append(seqs, self.device_tables, self.device, chunk)
            <= self.device.num_free
        )

    def append_slots(self, seq: Sequence, chunk: int | None = None) -> BlockMapping:
        """Give the table slots for the tokens `seq` gained since the last call.

        Allocates a block only when the last one is full (demand paging). If the token would be
        written into a partly filled block that another sequence shares, that block is first copied
        to a fresh one (copy-on-write): the returned (src, dst) pairs tell the engine what to copy
        (copy_blocks) before the model step writes into dst. With `chunk` (chunked prefill), the
        table grows by at most `chunk` tokens: the next chunk of a prompt.

        Raises:
            KeyError: if `seq` holds no device blocks.
            NoFreeBlocksError: if the pool has too few free blocks (nothing is changed).
        """
        table = self._device_table(seq)
        target = self._slots_target(seq, table.num_tokens, chunk)
        needed = self._blocks_to_append(seq, chunk)
        if needed > self.device.num_free:
            raise NoFreeBlocksError(
                f"seq {seq.seq_id} needs {needed} blocks, {self.device.num_free} free"
            )
        num_new_tokens = target - table.num_tokens
        # task 1.5: copy a shared last block before writing into it
        cow = self._copy_on_write(table) if num_new_tokens > 0 else []
        table.append_tokens(num_new_tokens, self.device.allocate)
        self._register_full_blocks(seq, table)
        return cow

    def _copy_on_write(self, table: BlockTable) -> BlockMapping:
        """Before a write into the table's last block: if others share it, give this table a copy.

        The check is the MMU's: a write to a page mapped read-only by several processes traps. The
        body is the kernel's fault handler (task 1.5): take a fresh block, drop this table's
        reference to the shared one, point the table at the copy, and count the copy in
        `cow_copies`. The returned (src, dst) pair tells the engine what data to copy
        (copy_blocks) before the model step writes into dst.
        """
        partly_filled = table.num_filled_in_last_block not in (0, self.block_size)
        if not partly_filled or self.device.ref_count(table.block_ids[-1]) == 1:
            return []  # nothing shared is written: no fault
        last = table.block_ids[-1]
        copy = self.device.allocate()
        self.device.free(last)
        table.block_ids[-1] = copy
        self.cow_copies += 1
        return [(last, copy)]

    # ---- sharing
    # -----------------------------------------------------------------------------

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share every block of `parent` with `child` (like fork(): copy-on-write pages).

        No block is allocated: reference counts go up, so a fork can never run out of memory. The
        first write into a shared, partly filled block copies it (see append_slots).

        Raises:
            KeyError: if `parent` holds no device blocks.
            ValueError: if `child` already holds blocks.
        """
        table = self._device_table(parent)
        if child.seq_id in self.device_tables or child.seq_id in self.host_tables:
            raise ValueError(f"child seq {child.seq_id} already holds blocks")
        for block in table.block_ids:
            self.device.incref(block)
        self.device_tables[child.seq_id] = table.copy()
        # the prefix cache's names of the blocks: the child need not hash them again
        if parent.seq_id in self._block_hashes:
            self._block_hashes[child.seq_id] = list(self._block_hashes[parent.seq_id])

    def num_shared_tokens(self, seq: Sequence, first: Sequence) -> int:
        """Tokens of `seq` that `first` computes in blocks they share: `seq` skips them.

        A new request's n samples share every prompt block with the first, which computes them once.
        At least the last token is always computed, since its logits are what the step is for.

        Raises:
            KeyError: if either sequence holds no device blocks.
        """
        seq_blocks = self._device_table(seq).block_ids
        first_blocks = self._device_table(first).block_ids
        shared = 0
        while (
            shared < min(len(seq_blocks), len(first_blocks))
            and seq_blocks[shared] == first_blocks[shared]
        ):
            shared += 1
        return min(shared * self.block_size, len(seq) - 1)

    def free(self, seq: Sequence) -> None:
        """Release every block `seq` holds, on the device or on the host (finished or preempted).

        Blocks are released last first, so with prefix caching a sequence's tail is evicted before
        its head, which more prompts are likely to share.

        Raises:
            KeyError: if `seq` holds no blocks.
        """
        if seq.seq_id in self.device_tables:
            table, pool = self.device_tables.pop(seq.seq_id), self.device
        elif seq.seq_id in self.host_tables:
            table, pool = self.host_tables.pop(seq.seq_id), self.host
        else:
            raise KeyError(f"seq {seq.seq_id} holds no blocks")
        for block in reversed(table.block_ids):
            pool.free(block)
        self._block_hashes.pop(seq.seq_id, None)

    # ---- swapping
    # ----------------------------------------------------------------------------

    def can_swap_out(self, seq_group: SequenceGroup) -> bool:
        """Does the host pool have room for the group's device blocks (each shared block once)?"""
        return (
            len(self._unique_blocks(seq_group, self.device_tables))
            <= self.host.num_free
        )

    def swap_out(self, seq_group: SequenceGroup) -> BlockMapping:
        """Move the group's device blocks to the host pool; a block shared in the group moves once.

        Returns:
            (device block, host block) pairs for swap_blocks, each device block once.

        Raises:
            ValueError: if no sequence of the group holds device blocks.
            NoFreeBlocksError: if the host pool is too small (nothing is moved): fail this group,
                not the engine; the caller may fall back to recompute.
        """
        transfers = self._move(
            seq_group, self.device_tables, self.device, self.host_tables, self.host
        )
        self.blocks_swapped_out += len(transfers)
        return transfers

    def can_swap_in(self, seq_group: SequenceGroup) -> bool:
        """Would the group's host blocks fit in the device pool while keeping the watermark free?

        The blocks its sequences need to append the tokens they gained before the swap must fit
        too, so that the group can run as soon as it is back.
        """
        seqs = self._seqs_on(seq_group, self.host_tables)
        needed = len(self._unique_blocks(seq_group, self.host_tables))
        needed += self._group_blocks_to_append(seqs, self.host_tables, self.host)
        return self.device.num_free - needed >= self.watermark_blocks

    def swap_in(self, seq_group: SequenceGroup) -> BlockMapping:
        """Move the group's host blocks back to the device pool (the inverse of swap_out).

        With prefix caching, a full block whose content is still cached on the device (it was
        shared with a running request, or is cached-free) is mapped again instead of transferred,
        as Linux finds a page in its swap cache; the other full blocks are published in the cache.

        Returns:
            (host block, device block) pairs for swap_blocks, each host block once; blocks found
            in the prefix cache need no transfer and are not listed.

        Raises:
            ValueError: if no sequence of the group is swapped out.
            NoFreeBlocksError: if the device pool is too small (nothing is moved).
        """
        transfers = self._move(
            seq_group, self.host_tables, self.host, self.device_tables, self.device
        )
        self.blocks_swapped_in += len(transfers)
        return transfers

    def _move(
        self,
        seq_group: SequenceGroup,
        src_tables: dict[int, BlockTable],
        src: BlockAllocator,
        dst_tables: dict[int, BlockTable],
        dst: BlockAllocator,
    ) -> BlockMapping:
        """Move the group's blocks from one pool to the other: the body of swap_out and swap_in.

        Each sequence's table leaves `src_tables` for `dst_tables`; each of its blocks gets a
        block in `dst` (allocated the first time, incref'd after, so a block shared in the group
        moves once), and its `src` blocks are freed last first, as `free` does. A block whose
        K/V the device's prefix cache still holds is taken from there and not copied (Linux's
        swap cache). On the way in, the table's full blocks are published to the prefix cache.

        Returns:
            The (src, dst) block pairs whose data must be copied, in the order first seen.

        Raises:
            ValueError: if no sequence of the group holds blocks in `src`.
            NoFreeBlocksError: if `dst` has too few free blocks (checked before anything moves).
        """
        seqs = self._seqs_on(seq_group, src_tables)
        if not seqs:
            raise ValueError(
                f"no sequence of group {seq_group.request_id!r} holds {src.name} blocks"
            )
        needed = len(self._unique_blocks(seq_group, src_tables))
        if needed > dst.num_free:
            raise NoFreeBlocksError(
                f"group {seq_group.request_id!r} needs {needed} {dst.name} blocks, {dst.num_free} free"
            )
        # src block -> dst block: a shared block is moved once
        mapping: dict[int, int] = {}
        # src blocks whose K/V the device's prefix cache still holds
        found: set[int] = set()
        for seq in seqs:
            table = src_tables.pop(seq.seq_id)
            new_ids = []
            for i, block in enumerate(table.block_ids):
                if block in mapping:
                    dst.incref(mapping[block])
                elif (cached := self._find_in_prefix_cache(dst, seq, i)) is not None:
                    # like Linux's swap cache: nothing to transfer
                    mapping[block] = cached
                    found.add(block)
                else:
                    mapping[block] = dst.allocate()
                new_ids.append(mapping[block])
            # tail first, as free(): the cache keeps the head
            for block in reversed(table.block_ids):
                src.free(block)
            dst_tables[seq.seq_id] = BlockTable(
                self.block_size, new_ids, table.num_tokens
            )
            if dst is self.device:
                self._register_full_blocks(seq, dst_tables[seq.seq_id], start=0)
        transfers = [
            (src_block, dst_block)
            for src_block, dst_block in mapping.items()
            if src_block not in found
        ]
        return transfers

    # ---- what memory looks like
    # --------------------------------------------------------------

    def get_block_table(self, seq: Sequence) -> BlockTable:
        """The device block table of `seq` (the engine builds slot_mapping and block_tables from it).

        Raises:
            KeyError: if `seq` holds no device blocks.
        """
        return self._device_table(seq)

    def seq_memory(self, seq: Sequence) -> SeqMemory:
        """Slots used vs allocated for one sequence, wherever its blocks are.

        Raises:
            KeyError: if `seq` holds no blocks.
        """
        location = "device" if seq.seq_id in self.device_tables else "host"
        table = (self.device_tables if location == "device" else self.host_tables).get(
            seq.seq_id
        )
        if table is None:
            raise KeyError(f"seq {seq.seq_id} holds no blocks")
        return SeqMemory(
            seq.seq_id, location, len(table), table.num_tokens, table.capacity
        )

    def memory_stats(self) -> MemoryStats:
        """A snapshot of both pools, every sequence and the counters, as plain data."""
        seqs = [
            SeqMemory(seq_id, location, len(t), t.num_tokens, t.capacity)
            for location, tables in (
                ("device", self.device_tables),
                ("host", self.host_tables),
            )
            for seq_id, t in tables.items()
        ]
        cache = (
            self.device
            if isinstance(self.device, PrefixCachingBlockAllocator)
            else None
        )
        return MemoryStats(
            device=pool_stats(self.device, self.device_tables, self.block_size),
            host=pool_stats(self.host, self.host_tables, self.block_size),
            seqs=seqs,
            prefix_cache_hits=cache.hits if cache else 0,
            prefix_cache_misses=cache.misses if cache else 0,
            cow_copies=self.cow_copies,
            blocks_swapped_out=self.blocks_swapped_out,
            blocks_swapped_in=self.blocks_swapped_in,
        )

    # ---- helpers
    # -----------------------------------------------------------------------------

    def _device_table(self, seq: Sequence) -> BlockTable:
        if seq.seq_id not in self.device_tables:
            raise KeyError(f"seq {seq.seq_id} holds no device blocks")
        return self.device_tables[seq.seq_id]

    def _seqs_on(
        self, seq_group: SequenceGroup, tables: dict[int, BlockTable]
    ) -> list[Sequence]:
        return [seq for seq in seq_group.get_unfinished_seqs() if seq.seq_id in tables]

    def _unique_blocks(
        self, seq_group: SequenceGroup, tables: dict[int, BlockTable]
    ) -> set[int]:
        return {
            b
            for seq in self._seqs_on(seq_group, tables)
            for b in tables[seq.seq_id].block_ids
        }

    def _seqs_to_allocate(self, seq_group: SequenceGroup) -> list[Sequence]:
        seqs = seq_group.get_unfinished_seqs()
        if not seqs:
            raise ValueError(
                f"group {seq_group.request_id!r} has no unfinished sequence to allocate"
            )
        for seq in seqs:
            if seq.seq_id in self.device_tables or seq.seq_id in self.host_tables:
                raise ValueError(
                    f"seq {seq.seq_id} of group {seq_group.request_id!r} already holds blocks"
                )
        return seqs

    def _common_full_blocks(self, seq: Sequence, first: Sequence) -> int:
        """Leading blocks `seq` can share with `first`: all if the tokens are equal, else the full ones."""
        tokens, first_tokens = seq.token_ids, first.token_ids
        if tokens == first_tokens:
            return num_blocks_for(len(tokens), self.block_size)
        common = 0
        while (
            common < min(len(tokens), len(first_tokens))
            and tokens[common] == first_tokens[common]
        ):
            common += 1
        return common // self.block_size

    def _slots_target(self, seq: Sequence, num_held: int, chunk: int | None) -> int:
        """How many of `seq`'s tokens its table should hold: all of them, or with chunked
        prefill `chunk` more than the `num_held` it holds (never more than it has)."""
        return len(seq) if chunk is None else min(len(seq), num_held + chunk)

    def _blocks_to_allocate(
        self, seqs: list[Sequence], use_prefix_cache: bool, chunk: int | None = None
    ) -> int:
        first, cached = seqs[0], 0
        if use_prefix_cache and isinstance(self.device, PrefixCachingBlockAllocator):
            cached = self.device.count_prefix(self._matchable_hashes(first))[0]
        target = self._slots_target(first, cached * self.block_size, chunk)
        needed = num_blocks_for(target, self.block_size) - cached
        for seq in seqs[1:]:
            needed += num_blocks_for(
                len(seq), self.block_size
            ) - self._common_full_blocks(seq, first)
        return needed

    def _num_free_after_prefix_hits(self, seq: Sequence) -> int:
        """Free blocks left once the cached-free blocks a prompt would reuse are taken back."""
        if isinstance(self.device, PrefixCachingBlockAllocator):
            return (
                self.device.num_free
                - self.device.count_prefix(self._matchable_hashes(seq))[1]
            )
        return self.device.num_free

    def _group_blocks_to_append(
        self,
        seqs: list[Sequence],
        tables: dict[int, BlockTable],
        pool: BlockAllocator,
        chunk: int | None = None,
    ) -> int:
        """Blocks that appending every sequence's new tokens takes, copy-on-write included.

        k sequences of the group sharing a partly filled last block copy it k - 1 times when
        nobody else holds it: the last writer finds itself alone and writes in place.
        """
        needed, sharers = 0, {}
        for seq in seqs:
            table = tables[seq.seq_id]
            num_new_tokens = (
                self._slots_target(seq, table.num_tokens, chunk) - table.num_tokens
            )
            if num_new_tokens <= 0:
                continue
            needed += table.num_new_blocks_needed(num_new_tokens)
            if table.num_filled_in_last_block not in (0, self.block_size):
                sharers[table.block_ids[-1]] = sharers.get(table.block_ids[-1], 0) + 1
        for block, k in sharers.items():
            needed += k if pool.ref_count(block) > k else k - 1
        return needed

    def _blocks_to_append(self, seq: Sequence, chunk: int | None = None) -> int:
        table = self._device_table(seq)
        num_new_tokens = (
            self._slots_target(seq, table.num_tokens, chunk) - table.num_tokens
        )
        if num_new_tokens <= 0:
            return 0
        partial = table.num_filled_in_last_block not in (0, self.block_size)
        cow = partial and self.device.ref_count(table.block_ids[-1]) > 1
        return table.num_new_blocks_needed(num_new_tokens) + int(cow)

    def _allocate_sharing(self, seq: Sequence, first: Sequence) -> None:
        """Allocate `seq`, sharing the leading blocks it has in common with `first`."""
        first_table = self.device_tables[first.seq_id]
        num_shared = self._common_full_blocks(seq, first)
        for block in first_table.block_ids[:num_shared]:
            self.device.incref(block)
        num_tokens = min(len(seq), num_shared * self.block_size)
        table = BlockTable(
            self.block_size, first_table.block_ids[:num_shared], num_tokens
        )
        table.append_tokens(len(seq) - num_tokens, self.device.allocate)
        self._install(seq, table)

    def _install(self, seq: Sequence, table: BlockTable) -> None:
        self.device_tables[seq.seq_id] = table
        self._register_full_blocks(seq, table)

    def _hashes_of(self, seq: Sequence) -> list[str]:
        """Chained hashes of the full blocks of `seq`, extended incrementally as it grows."""
        if not self.enable_prefix_caching:
            return []
        hashes = self._block_hashes.get(seq.seq_id, [])
        num_full = len(seq) // self.block_size
        if len(hashes) < num_full:
            done = len(hashes) * self.block_size
            parent = hashes[-1] if hashes else ""
            hashes = hashes + hash_full_blocks(
                seq.token_ids[done : num_full * self.block_size],
                self.block_size,
                parent,
            )
        return hashes

    def _matchable_hashes(self, seq: Sequence) -> list[str]:
        """Hashes of the full blocks a prefix hit may cover: never the last token.

        The model must still compute at least one token of the prompt to get the logits of the next
        one, so a prompt that is cached whole reuses all its blocks but the one with its last token.
        """
        return self._hashes_of(seq)[: (len(seq) - 1) // self.block_size]

    def _find_in_prefix_cache(
        self, pool: BlockAllocator, seq: Sequence, index: int
    ) -> int | None:
        """The cached device block holding logical block `index` of `seq`, with a reference taken."""
        if not isinstance(pool, PrefixCachingBlockAllocator):
            return None
        hashes = self._block_hashes.get(seq.seq_id, [])
        block = pool.lookup(hashes[index]) if index < len(hashes) else None
        if block is not None:
            pool.acquire(block)
        return block

    def _register_full_blocks(
        self, seq: Sequence, table: BlockTable, start: int | None = None
    ) -> None:
        """Publish the sequence's full blocks from logical block `start` (default: the new ones)."""
        if not isinstance(self.device, PrefixCachingBlockAllocator):
            return
        known = len(self._block_hashes.get(seq.seq_id, [])) if start is None else start
        # Only blocks the table holds full: a token sampled but not yet appended (a
        # sequence swapped out right after its step) has no K/V in the pool yet, so its
        # block is not published.
        hashes = self._hashes_of(seq)[: table.num_tokens // self.block_size]
        for i in range(known, len(hashes)):
            self.device.register(table.block_ids[i], hashes[i])
        self._block_hashes[seq.seq_id] = hashes


@dataclass
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
    """The decisions of one step, in the order the engine carries them out."""

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
    # the running sum behind num_batched_tokens: (which list, entries counted, their tokens)
    _counted: tuple[int, int, int] = field(default=(0, 0, 0), repr=False, compare=False)

    @property
    def num_batched_tokens(self) -> int:
        """Query tokens the step computes (prefills and decodes): at most max_num_batched_tokens.

        The scheduler asks before each group it adds, so the sum is kept as it grows (the list
        only grows within a step) rather than taken again each time: over N groups, N additions
        instead of N * N / 2. A list that was replaced or cut is summed again.
        """
        which, counted, tokens = self._counted
        if which != id(self.scheduled) or counted > len(self.scheduled):
            counted, tokens = 0, 0
        tokens += sum(s.num_query_tokens for s in self.scheduled[counted:])
        self._counted = (id(self.scheduled), len(self.scheduled), tokens)
        return tokens


class Scheduler:
    """Three queues (waiting, running, swapped) and the policy above.

    Args:
        config: the budget and the preemption mode.
        block_manager: the memory manager whose decisions the schedule carries: a BlockManager,
            or anything that answers the same calls (can_allocate, allocate, num_shared_tokens,
            can_append_slots, append_slots, free, can_swap_out, swap_out, can_swap_in, swap_in).
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
        queue = deque(sorted(self.running, key=lambda g: g.arrival_time))
        kept: list[SequenceGroup] = []
        preempted = False
        while queue:
            group = queue.popleft()
            if self._computing_prompt(group):
                # chunked prefill: its next chunk comes after the decodes
                kept.append(group)
                continue
            if not self._fits_budget(out, group.get_seqs(SequenceStatus.RUNNING)):
                out.deferred += [g.request_id for g in (group, *queue)]
                # no preemption: they keep their blocks and run next step
                kept += [group, *queue]
                break
            while not manager.can_append_slots(group):
                # the most recently arrived running group
                victim = self._choose_victim(queue, group)
                self._preempt(victim, out)
                preempted = True
                if victim is group:
                    break
            else:
                for seq in group.get_seqs(SequenceStatus.RUNNING):
                    out.blocks_to_copy += manager.append_slots(seq)
                    out.scheduled.append(
                        ScheduledSeq(group, seq, seq.num_uncomputed_tokens)
                    )
                kept.append(group)
        self.running = kept
        return preempted

    def _schedule_swapped(self, out: SchedulerOutput) -> None:
        """Bring swapped groups back, oldest first, while each fits with room to append a token."""
        if not self.swapped:  # the usual step: nobody to bring back
            return
        manager = self.block_manager
        while self.swapped:
            group = self.swapped[0]
            seqs = group.get_seqs(SequenceStatus.SWAPPED)
            if self._num_running_seqs() + len(seqs) > self.config.max_num_seqs:
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
                out.scheduled.append(
                    ScheduledSeq(group, seq, seq.num_uncomputed_tokens)
                )
            self.running.append(group)

    def _schedule_waiting(self, out: SchedulerOutput) -> None:
        """Admit waiting groups in arrival order while memory and the step's budget allow."""
        manager = self.block_manager
        while self.waiting:
            group = self.waiting[0]
            seqs = group.get_unfinished_seqs()
            if self._num_running_seqs() + group.max_seqs > self.config.max_num_seqs:
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
                out.scheduled.append(
                    ScheduledSeq(group, seq, seq.num_uncomputed_tokens, is_prefill=True)
                )
            self.running.append(group)

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
        num_new_tokens = sum(seq.num_uncomputed_tokens for seq in seqs)
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
        started = deque(
            sorted(
                (g for g in self.running if self._computing_prompt(g)),
                key=lambda g: g.arrival_time,
            )
        )
        while started and self._budget_left(out) > 0:
            group = started.popleft()
            # one sequence: samples and beams fork once the prompt is computed
            (seq,) = group.get_seqs(SequenceStatus.RUNNING)
            chunk = min(seq.num_uncomputed_tokens, self._budget_left(out))
            if manager.can_append_slots(group, chunk):
                out.blocks_to_copy += manager.append_slots(seq, chunk)
                out.scheduled.append(ScheduledSeq(group, seq, chunk, is_prefill=True))
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
        out.scheduled.append(ScheduledSeq(group, seq, num_tokens, is_prefill=True))
        self.running.append(group)

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
        return queue.pop() if queue else group

    def _preempt(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        """Evict a whole group: swap it out if asked and the host has room, else free it to recompute."""
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

    def _num_running_seqs(self) -> int:
        """Sequences the running groups hold, or may still fork into: a beam search admitted with one
        sequence forks into its beam width at its first step, so it counts its width from the start
        (vLLM's get_max_num_running_seqs); a group's finished samples no longer count."""
        return sum(
            max(
                len(g.get_seqs(SequenceStatus.RUNNING)),
                g.max_seqs - sum(s.is_finished() for s in g.seqs),
            )
            for g in self.running
        )
