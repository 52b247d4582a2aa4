"""The KV-cache manager: paging policy for sequence groups.

OS idea: the virtual-memory system decides when a process gets frames (demand paging), shares them
on fork() and copies a shared page only when someone writes to it (copy-on-write), keeps a reserve of
free frames (a low watermark) so it is not caught empty, and moves whole processes to disk when
memory runs out (swapping) (OSTEP ch. 21-23). KV counterpart: vLLM paper section 4.2-4.5. This module
is the policy; the mechanisms sit in block_allocator.py (frames), block_table.py (page tables) and
prefix_cache.py (page cache). The tensor copies that some decisions imply (copy-on-write, swap) are
returned as block mappings for the engine to hand to the kernels' copy_blocks / swap_blocks.

A *sequence group* is one request's samples or beams; it is admitted, preempted and swapped as a
whole. Every sequence holds exactly ceil(len(seq) / block_size) blocks after append_slots.
"""

from __future__ import annotations

import enum

from minipaged.reference.block_allocator import BlockAllocator, NoFreeBlocksError
from minipaged.reference.block_table import BlockTable, num_blocks_for
from minipaged.reference.memory_stats import (
    MemoryStats,
    PoolStats,
    SeqMemory,
    pool_stats,
)
from minipaged.reference.prefix_cache import (
    PrefixCachingBlockAllocator,
    hash_full_blocks,
)
from minipaged.sequence import Sequence, SequenceGroup

# (src block, dst block) pairs for copy_blocks / swap_blocks
BlockMapping = list[tuple[int, int]]


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
        # BEGIN SOLUTION 1.3
        worst_case = self._blocks_to_allocate(seqs, use_prefix_cache=False)
        if self.device.num_blocks - worst_case < self.watermark_blocks:
            return AllocStatus.NEVER
        needed = self._blocks_to_allocate(seqs, use_prefix_cache=True, chunk=chunk)
        if self._num_free_after_prefix_hits(seqs[0]) - needed >= self.watermark_blocks:
            return AllocStatus.OK
        return AllocStatus.LATER
        # END SOLUTION

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
        # BEGIN SOLUTION 1.3
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
        # END SOLUTION

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The blocks of the prefix cache that hold `seq`'s leading full blocks (task 1.6).

        Like a process mapping a shared library from the page cache: the blocks are shared, their
        count raised, and the prefill skips their tokens. Only the matchable hashes count
        (`_matchable_hashes`): never the block with the prompt's last token, whose logits must be
        computed. Without prefix caching there is no cache to look in: [].
        """
        if not isinstance(self.device, PrefixCachingBlockAllocator):
            return []
        # BEGIN SOLUTION 1.6
        return self.device.match_prefix(self._matchable_hashes(seq))
        # END SOLUTION

    def can_append_slots(
        self, seq_group: SequenceGroup, chunk: int | None = None
    ) -> bool:
        """Are there free blocks for every device-resident sequence of the group to add its new
        tokens (at most `chunk` of them each, with chunked prefill)?"""
        growth = self._growth(seq_group, self.device_tables, chunk)
        return self._blocks_to_grow(growth, self.device) <= self.device.num_free

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
        # checked before anything changes, so a failed append leaks no block
        needed = self._blocks_to_grow(
            [(seq, table, target - table.num_tokens)], self.device
        )
        if needed > self.device.num_free:
            raise NoFreeBlocksError(
                f"seq {seq.seq_id} needs {needed} blocks, {self.device.num_free} free"
            )
        return self._grow(seq, table, target)

    def try_append_slots(
        self, seq_group: SequenceGroup, chunk: int | None = None
    ) -> BlockMapping | None:
        """The scheduler's one question per group and step: give every device-resident
        sequence of the group the slots for its new tokens (at most `chunk` each), or, when
        the pool is short, change nothing and return None.

        It is can_append_slots and append_slots in one: the blocks are counted once, for the
        whole group, and the tables then grow without a second count (vLLM v1's allocate_slots
        answers the same way). The scheduler asks it of every running group at every step.

        Most appends take nothing from the pool: the token lands in the sequence's own, partly
        filled last block. Like a write to a private page that is already mapped, which the
        MMU lets through without a trap, such an append only moves the table's fill mark; the
        rest (a full last block: demand paging; a shared one: copy-on-write) are the faults,
        counted and handled by the kernel's path, `_grow`.

        Returns:
            The copy-on-write (src, dst) pairs of all the group's sequences, or None.
        """
        tables = self.device_tables
        in_place, faults = [], []
        # _growth's walk, with each sequence sorted as it is found: this runs for every
        # sequence at every step, so it builds no list in between
        for seq in seq_group.seqs:
            table = tables.get(seq.seq_id)
            if table is None or seq.status.is_finished:
                continue
            num_new_tokens = (
                self._slots_target(seq, table.num_tokens, chunk) - table.num_tokens
            )
            if num_new_tokens <= 0:
                continue
            if self._writes_in_place(table, num_new_tokens):
                in_place.append((table, num_new_tokens))
            else:
                faults.append((seq, table, num_new_tokens))
        # a write in place takes no block: the faults are all there is to count
        if faults and self._blocks_to_grow(faults, self.device) > self.device.num_free:
            return None
        for table, num_new_tokens in in_place:
            table.num_tokens += num_new_tokens
        copies: BlockMapping = []
        for seq, table, num_new_tokens in faults:
            copies += self._grow(seq, table, table.num_tokens + num_new_tokens)
        return copies

    def _writes_in_place(self, table: BlockTable, num_new_tokens: int) -> bool:
        """Do the new tokens fit in the table's last block, held by this table alone, and leave
        it partly filled? Then they need no block, no copy, and fill no block for the prefix
        cache to publish."""
        filled = table.num_tokens % self.block_size
        return (
            filled > 0
            and filled + num_new_tokens < self.block_size
            and self.device.ref_count(table.block_ids[-1]) == 1
        )

    def _grow(self, seq: Sequence, table: BlockTable, target: int) -> BlockMapping:
        """The body of append_slots once the blocks are known to be free: grow `seq`'s device
        table to `target` tokens, copying a shared last block first (task 1.5)."""
        # BEGIN SOLUTION 1.3
        num_new_tokens = target - table.num_tokens
        # task 1.5: copy a shared last block before writing into it
        cow = self._copy_on_write(table) if num_new_tokens > 0 else []
        table.append_tokens(num_new_tokens, self.device.allocate, self.device.free)
        self._register_full_blocks(seq, table)
        return cow
        # END SOLUTION

    def _copy_on_write(self, table: BlockTable) -> BlockMapping:
        """Before a write into the table's last block: if others share it, give this table a copy.

        The check is the MMU's: a write to a page mapped read-only by several processes traps. The
        body is the kernel's fault handler (task 1.5): take a fresh block, drop this table's
        reference to the shared one, point the table at the copy, and count the copy in
        `cow_copies`. The returned (src, dst) pair tells the engine what data to copy
        (copy_blocks) before the model step writes into dst.
        """
        if not self._last_block_is_shared(table):
            return []  # nothing shared is written: no fault
        # BEGIN SOLUTION 1.5
        last = table.block_ids[-1]
        copy = self.device.allocate()
        self.device.free(last)
        table.block_ids[-1] = copy
        self.cow_copies += 1
        return [(last, copy)]
        # END SOLUTION

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
        # BEGIN SOLUTION 1.4
        for block in table.block_ids:
            self.device.incref(block)
        self.device_tables[child.seq_id] = table.copy()
        # END SOLUTION
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
        needed = len(self._unique_blocks(seq_group, self.host_tables))
        needed += self._blocks_to_grow(
            self._growth(seq_group, self.host_tables), self.host
        )
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
        # BEGIN SOLUTION 1.7
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
        # END SOLUTION

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

    @property
    def prefix_cache_hits(self) -> int:
        """Blocks found in the prefix cache so far (0 without prefix caching)."""
        cached = isinstance(self.device, PrefixCachingBlockAllocator)
        return self.device.hits if cached else 0

    @property
    def prefix_cache_misses(self) -> int:
        """Blocks looked up in the prefix cache and not found, so far."""
        cached = isinstance(self.device, PrefixCachingBlockAllocator)
        return self.device.misses if cached else 0

    def device_stats(self) -> PoolStats:
        """The device pool's state alone: what the engine records at every step (StepStats),
        without memory_stats' line per sequence and the host pool."""
        return pool_stats(self.device, self.device_tables, self.block_size)

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
        return MemoryStats(
            device=self.device_stats(),
            host=pool_stats(self.host, self.host_tables, self.block_size),
            seqs=seqs,
            prefix_cache_hits=self.prefix_cache_hits,
            prefix_cache_misses=self.prefix_cache_misses,
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
        return [
            seq
            for seq in seq_group.seqs
            if seq.seq_id in tables and not seq.status.is_finished
        ]

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

    def _growth(
        self,
        seq_group: SequenceGroup,
        tables: dict[int, BlockTable],
        chunk: int | None = None,
    ) -> list[tuple[Sequence, BlockTable, int]]:
        """(sequence, its table, tokens to add) for each unfinished sequence of the group that
        holds a table in `tables` and has tokens to add (at most `chunk` each)."""
        growth = []
        for seq in seq_group.seqs:
            table = tables.get(seq.seq_id)
            if table is None or seq.status.is_finished:
                continue
            target = self._slots_target(seq, table.num_tokens, chunk)
            if target > table.num_tokens:
                growth.append((seq, table, target - table.num_tokens))
        return growth

    def _blocks_to_grow(
        self, growth: list[tuple[Sequence, BlockTable, int]], pool: BlockAllocator
    ) -> int:
        """Blocks that growing these tables takes (see `_growth`), copy-on-write included.

        A table whose last block is partly filled writes into it: a copy when another table
        holds it too. k tables of the group sharing such a block copy it k - 1 times when nobody
        else holds it: the last writer finds itself alone and writes in place.
        """
        needed, sharers = 0, {}
        for _, table, num_new_tokens in growth:
            needed += table.num_new_blocks_needed(num_new_tokens)
            last_block_partly_filled = table.num_tokens % self.block_size
            if last_block_partly_filled and pool.ref_count(table.block_ids[-1]) > 1:
                sharers[table.block_ids[-1]] = sharers.get(table.block_ids[-1], 0) + 1
        for block, k in sharers.items():
            needed += k if pool.ref_count(block) > k else k - 1
        return needed

    def _last_block_is_shared(self, table: BlockTable) -> bool:
        """Would a write into the table's last device block fault? So it does when the block is
        partly filled (the write lands in it) and another table holds it too."""
        last_block_partly_filled = table.num_tokens % self.block_size
        return bool(
            last_block_partly_filled and self.device.ref_count(table.block_ids[-1]) > 1
        )

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


__all__ = [
    "AllocStatus",
    "BlockManager",
    "BlockMapping",
    "MemoryStats",
    "NoFreeBlocksError",
    "PoolStats",
    "SeqMemory",
]
