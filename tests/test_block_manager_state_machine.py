"""The block manager under random workloads: a hypothesis state machine.

Hypothesis drives BlockManager through random admit / append / fork / finish / swap_out / swap_in /
recompute sequences, with and without prefix caching, and after every step checks the invariants of
a paged memory system:

- each block's ref count equals the number of block tables (device and host) that hold it;
- free + used = total in each pool, and no block is both free and referenced;
- each sequence holds ceil(len / block_size) blocks and its table covers exactly its tokens;
- every hashed (prefix-cached) block is held or cached-free, and every cached-free block is hashed;
- reading each sequence back through its table gives its tokens (a model of the KV pool, written
  through slot mappings and moved by the returned copy-on-write and swap mappings, so a wrong mapping,
  a missed copy or a wrong prefix hit shows up as wrong data);
- once every sequence is freed, every block is free or cached-free (no leak).
"""

from __future__ import annotations

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from minipaged.reference.block_allocator import NoFreeBlocksError
from minipaged.reference.block_manager import AllocStatus, BlockManager
from minipaged.reference.block_table import num_blocks_for
from minipaged.reference.prefix_cache import PrefixCachingBlockAllocator
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus

# shared prefixes
SYSTEM_PROMPT = [101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112]
# a small vocabulary: identical blocks happen often
tokens = st.integers(min_value=1, max_value=9)


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        num_gpu_blocks=st.integers(4, 24),
        num_cpu_blocks=st.integers(0, 16),
        watermark=st.sampled_from([0.0, 0.01, 0.1]),
        prefix_caching=st.booleans(),
    )
    def setup(
        self, block_size, num_gpu_blocks, num_cpu_blocks, watermark, prefix_caching
    ):
        self.bs = block_size
        self.manager = BlockManager(
            block_size, num_gpu_blocks, num_cpu_blocks, watermark, prefix_caching
        )
        self.running: list[SequenceGroup] = []  # on the device
        self.swapped: list[SequenceGroup] = []  # on the host
        self.waiting: list[SequenceGroup] = []  # preempted by recompute: no blocks
        # slot -> token id: a model of the KV pools' contents
        self.pool = {"device": {}, "host": {}}

    # ---- helpers ------------------------------------------------------------------------------

    def _write(self, seq: Sequence, num_tokens: int) -> None:
        """Write the K/V (here: the token id) of the last `num_tokens` tokens of `seq` to its slots."""
        table = self.manager.get_block_table(seq)
        for slot, token in zip(
            table.slot_mapping(num_tokens),
            seq.token_ids[len(seq) - num_tokens :],
            strict=True,
        ):
            self.pool["device"][slot] = token

    def _copy_blocks(self, mapping, src: str, dst: str) -> None:
        for src_block, dst_block in mapping:
            for off in range(self.bs):
                value = self.pool[src].get(src_block * self.bs + off)
                self.pool[dst][dst_block * self.bs + off] = value

    def _snapshot(self):
        m = self.manager
        return (
            {k: (list(t.block_ids), t.num_tokens) for k, t in m.device_tables.items()},
            {k: (list(t.block_ids), t.num_tokens) for k, t in m.host_tables.items()},
            m.device.num_free,
            m.host.num_free,
        )

    def _admit(self, group: SequenceGroup) -> bool:
        status = self.manager.can_allocate(group)
        before = self._snapshot()
        if status == AllocStatus.NEVER:
            # Justify NEVER on an empty pool of the same size: the group's blocks leave less than
            # the watermark free, or do not fit at all.
            m = self.manager
            empty = BlockManager(
                self.bs, m.device.num_blocks, 0, 0.0, enable_prefix_caching=False
            )
            copies = SequenceGroup(
                "copy",
                [Sequence(list(s.token_ids)) for s in group.get_unfinished_seqs()],
            )
            try:
                empty.allocate(copies)
            except NoFreeBlocksError:
                return False
            assert m.device.num_blocks - empty.device.num_used < m.watermark_blocks
            return False
        try:
            num_cached = self.manager.allocate(group)
        except Exception as error:
            assert status == AllocStatus.LATER, (
                f"can_allocate said OK, allocate raised {error!r}"
            )
            assert self._snapshot() == before, "a failed allocate changed the manager"
            return False
        seqs = group.get_unfinished_seqs()
        assert num_cached % self.bs == 0 and num_cached < len(seqs[0]), (
            "the last token is always computed"
        )
        event("admitted with a prefix-cache hit" if num_cached else "admitted")
        for i, seq in enumerate(seqs):
            self._write(seq, len(seq) - (num_cached if i == 0 else 0))
            seq.status = SequenceStatus.RUNNING
        self.running.append(group)
        return True

    # ---- rules --------------------------------------------------------------------------------

    @rule(
        prefix_len=st.sampled_from([0, 3, 4, 8, 12]),
        tail=st.lists(tokens, min_size=0, max_size=9),
        n=st.integers(1, 3),
    )
    def admit(self, prefix_len, tail, n):
        prompt = SYSTEM_PROMPT[:prefix_len] + tail
        if not prompt:
            prompt = [7]
        seq = Sequence(prompt)
        group = SequenceGroup(
            f"req{seq.seq_id}", [seq] + [seq.fork() for _ in range(n - 1)]
        )
        self._admit(group)

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def readmit(self, data):
        group = data.draw(st.sampled_from(self.waiting))
        if self._admit(group):
            self.waiting.remove(group)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), new=st.lists(tokens, min_size=1, max_size=6))
    def append(self, data, new):
        group = data.draw(st.sampled_from(self.running))
        seq = data.draw(st.sampled_from(group.get_unfinished_seqs()))
        for token in new:
            seq.append_token_id(token)
        before = self._snapshot()
        try:
            cow = self.manager.append_slots(seq)
        except Exception:
            assert self._snapshot() == before, (
                "a failed append_slots changed the manager"
            )
            del seq.output_token_ids[-len(new) :]
            return
        for src, dst in cow:
            assert self.manager.device.ref_count(dst) == 1, (
                "a copy-on-write target must be private"
            )
            assert self.manager.device.ref_count(src) >= 1, (
                "the source stays with its other holders"
            )
        event("copy-on-write" if cow else "append in place")
        self._copy_blocks(cow, "device", "device")
        self._write(seq, len(new))

    @precondition(lambda self: self.running)
    @rule(
        data=st.data(),
        new=st.lists(tokens, min_size=1, max_size=3),
        chunk=st.sampled_from([None, 1, 2, 5]),
    )
    def append_group(self, data, new, chunk):
        """The scheduler's question: every sequence of a group gains tokens, and
        try_append_slots grows them all (at most `chunk` each) or, None, changes nothing. It
        agrees with can_append_slots, asked first."""
        group = data.draw(st.sampled_from(self.running))
        seqs = group.get_unfinished_seqs()
        for seq in seqs:
            for token in new:
                seq.append_token_id(token)
        held = {s.seq_id: self.manager.get_block_table(s).num_tokens for s in seqs}
        can = self.manager.can_append_slots(group, chunk)
        before = self._snapshot()
        cow = self.manager.try_append_slots(group, chunk)
        if cow is None:
            assert not can, "can_append_slots said yes, try_append_slots said no"
            assert self._snapshot() == before, (
                "a refused try_append_slots changed things"
            )
            for seq in seqs:
                del seq.output_token_ids[-len(new) :]
            event("try_append_slots: pool short")
            return
        assert can, "can_append_slots said no, try_append_slots grew the tables"
        self._copy_blocks(cow, "device", "device")
        for seq in seqs:
            table = self.manager.get_block_table(seq)
            grown = min(len(seq), held[seq.seq_id] + (chunk or len(seq)))
            assert table.num_tokens == grown
            # the tokens past the chunk are dropped here (this model keeps every table full)
            del seq.output_token_ids[len(seq.output_token_ids) - (len(seq) - grown) :]
            self._write(seq, grown - held[seq.seq_id])
        event("try_append_slots: copy-on-write" if cow else "try_append_slots: no copy")

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def fork(self, data):
        group = data.draw(st.sampled_from(self.running))
        parent = data.draw(st.sampled_from(group.get_unfinished_seqs()))
        used = self.manager.device.num_used
        child = parent.fork()
        self.manager.fork(parent, child)
        group.add(child)
        assert self.manager.device.num_used == used, "a fork must not allocate"

    @precondition(lambda self: self.running or self.swapped)
    @rule(data=st.data())
    def finish(self, data):
        group = data.draw(st.sampled_from(self.running + self.swapped))
        seq = data.draw(st.sampled_from(group.get_unfinished_seqs()))
        self.manager.free(seq)
        seq.status = SequenceStatus.FINISHED_STOPPED
        if group.is_finished():
            (self.running if group in self.running else self.swapped).remove(group)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def swap_out(self, data):
        group = data.draw(st.sampled_from(self.running))
        if not self.manager.can_swap_out(group):
            before = self._snapshot()
            with pytest.raises(Exception, match="host blocks"):
                self.manager.swap_out(group)
            assert self._snapshot() == before
            return
        mapping = self.manager.swap_out(group)
        event("swap_out")
        assert len({src for src, _ in mapping}) == len(mapping), (
            "a shared block must move once"
        )
        self._copy_blocks(mapping, "device", "host")
        self.running.remove(group)
        self.swapped.append(group)

    @precondition(lambda self: self.swapped)
    @rule(data=st.data())
    def swap_in(self, data):
        group = data.draw(st.sampled_from(self.swapped))
        needed = len(
            {
                b
                for s in group.get_unfinished_seqs()
                for b in self.manager.host_tables[s.seq_id].block_ids
            }
        )
        if needed > self.manager.device.num_free:
            before = self._snapshot()
            with pytest.raises(Exception, match="device blocks"):
                self.manager.swap_in(group)
            assert self._snapshot() == before
            return
        mapping = self.manager.swap_in(group)
        event("swap_in")
        self._copy_blocks(mapping, "host", "device")
        self.swapped.remove(group)
        self.running.append(group)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def recompute(self, data):
        """Preempt by recompute: free every block of the group; it waits to be re-admitted."""
        group = data.draw(st.sampled_from(self.running))
        for seq in group.get_unfinished_seqs():
            self.manager.free(seq)
            seq.status = SequenceStatus.WAITING
        self.running.remove(group)
        self.waiting.append(group)

    # ---- invariants ---------------------------------------------------------------------------

    @invariant()
    def ref_counts_equal_holders(self):
        m = self.manager
        for pool, tables in ((m.device, m.device_tables), (m.host, m.host_tables)):
            holders = [0] * pool.num_blocks
            for table in tables.values():
                assert len(set(table.block_ids)) == len(table.block_ids), (
                    "a table holds a block twice"
                )
                for block in table.block_ids:
                    holders[block] += 1
            for block in range(pool.num_blocks):
                assert pool.ref_count(block) == holders[block], (
                    f"{pool.name} block {block}"
                )
            used = sum(h > 0 for h in holders)
            assert (
                pool.num_used == used
                and pool.num_free + pool.num_used == pool.num_blocks
            )
            free_blocks = list(pool._free_list) + list(getattr(pool, "_evictor", []))
            assert len(set(free_blocks)) == len(free_blocks) == pool.num_free
            assert all(holders[b] == 0 for b in free_blocks), (
                "a free block is referenced"
            )

    @invariant()
    def prefix_cache_consistent(self):
        pool = self.manager.device
        if not isinstance(pool, PrefixCachingBlockAllocator):
            return
        for block, block_hash in pool._hash_of_block.items():
            assert pool.lookup(block_hash) == block
            assert pool.ref_count(block) > 0 or pool.is_cached_free(block)
        for block in pool._evictor:
            assert pool.block_hash(block) is not None and pool.ref_count(block) == 0
        assert not set(pool._free_list) & set(pool._hash_of_block), (
            "a free-list block is still named"
        )

    @invariant()
    def tables_cover_exactly_the_tokens(self):
        m = self.manager
        for groups, tables, pool in (
            (self.running, m.device_tables, "device"),
            (self.swapped, m.host_tables, "host"),
        ):
            for group in groups:
                for seq in group.get_unfinished_seqs():
                    table = tables[seq.seq_id]
                    assert len(table) == num_blocks_for(len(seq), self.bs)
                    assert table.num_tokens == len(seq)
                    stored = [
                        self.pool[pool].get(table.slot(pos)) for pos in range(len(seq))
                    ]
                    assert stored == seq.token_ids, (
                        f"seq {seq.seq_id} reads back wrong data"
                    )
        for group in self.waiting:
            assert all(
                s.seq_id not in m.device_tables and s.seq_id not in m.host_tables
                for s in group.seqs
            )

    def teardown(self):
        """Free everything: every block must come back (free or cached-free)."""
        if not hasattr(self, "manager"):
            return
        for group in self.running + self.swapped:
            for seq in group.get_unfinished_seqs():
                self.manager.free(seq)
        m = self.manager
        assert (
            m.device.num_free == m.device.num_blocks
            and m.host.num_free == m.host.num_blocks
        )
        assert all(m.device.ref_count(b) == 0 for b in range(m.device.num_blocks))
        assert not m.device_tables and not m.host_tables


BlockManagerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None
)
test_block_manager_state_machine = BlockManagerMachine.TestCase
