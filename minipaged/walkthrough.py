"""A guided tour of the paged KV-cache manager, printed step by step (`minipaged memory`).

The idea: watch the virtual-memory mechanisms of the vLLM paper (section 4) happen to a handful of
requests, one step at a time, with the block tables and the pool drawn after each step (viz.py):
admission with a shared system prompt (the prefix cache, section 4.4), growth one token at a time
(demand paging, 4.2-4.3), fork for parallel sampling and copy-on-write (4.4), swapping to the host
pool (4.5), and freeing. The script checks every claim it prints against the manager, so if the
library changes under it, the tour fails loudly instead of telling a student something false.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from minipaged.reference.block_manager import BlockManager, MemoryStats
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus
from minipaged.viz import render_block_tables, render_pool, render_stats


def _claim(condition: bool, claim: str) -> None:
    """Raise if a claim the tour makes is false (not `assert`: it must survive `python -O`)."""
    if not condition:
        raise AssertionError(f"the walk-through claims something false: {claim}")


class _Tour:
    """Prints numbered steps and pictures of one manager."""

    def __init__(
        self,
        out: Callable[[str], object],
        manager: BlockManager,
        names: Mapping[int, str],
        on_step: Callable[[str, tuple[str, ...]], object] | None = None,
        on_show: Callable[[BlockManager, Mapping[int, str]], object] | None = None,
    ):
        self.out, self.manager, self.names, self.number = out, manager, names, 0
        self.on_step, self.on_show = on_step, on_show

    def step(self, title: str, *explanation: str) -> None:
        if self.on_step is not None:
            self.on_step(title, explanation)
        heading = f"Step {self.number}. {title}"
        self.out(f"\n{heading}\n{'=' * len(heading)}")
        for line in explanation:
            self.out(line)
        self.number += 1

    def say(self, line: str) -> None:
        self.out(f"  {line}")

    def show(
        self,
        seqs: list[Sequence],
        pools: tuple[str, ...] = ("device",),
        legend: bool = False,
    ) -> None:
        """Print the tables of `seqs`, then each pool; `legend` adds the legend of each picture."""
        if seqs:
            self.out("")
            self.out(render_block_tables(self.manager, seqs, self.names, legend=legend))
        for pool in pools:
            self.out("")
            self.out(
                render_pool(self.manager, pool, self.names, legend=legend and not seqs)
            )
        if self.on_show is not None:
            self.on_show(self.manager, self.names)


def check_sizes(block_size: int, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
    """Raise ValueError unless the pools are big enough for the tour (see `run`)."""
    if block_size < 2 or num_gpu_blocks < 12 or num_cpu_blocks < 6:
        raise ValueError(
            "the tour needs block_size >= 2, num_gpu_blocks >= 12 and num_cpu_blocks >= 6"
        )


def run(
    out: Callable[[str], object] = print,
    block_size: int = 4,
    num_gpu_blocks: int = 16,
    num_cpu_blocks: int = 8,
    *,
    on_step: Callable[[str, tuple[str, ...]], object] | None = None,
    on_show: Callable[[BlockManager, Mapping[int, str]], object] | None = None,
) -> MemoryStats:
    """Walk the block manager through admit, grow, fork, copy-on-write, prefix hit, swap and free.

    Args:
        out: where each line of text goes (print by default; a list's append collects them).
        block_size: tokens per block (at least 2, so a block can be partly filled).
        num_gpu_blocks: blocks in the device pool (at least 12: the tour's peak).
        num_cpu_blocks: blocks in the host pool (at least 6: the swapped group's blocks).
        on_step: called with each step's title and explanation lines as the step begins.
        on_show: called with the manager and the sequences' names each time the tour draws
            the pools (the HTML step-through records its states this way).

    Returns:
        The manager's MemoryStats after everything is freed.

    Raises:
        ValueError: if a size is too small for the tour.
        AssertionError: if the manager does not do what the tour says it does.
    """
    check_sizes(block_size, num_gpu_blocks, num_cpu_blocks)
    bs = block_size
    manager = BlockManager(
        bs, num_gpu_blocks, num_cpu_blocks, watermark=0.0, enable_prefix_caching=True
    )
    device = manager.device
    # a system prompt of exactly two full blocks
    system = list(range(101, 101 + 2 * bs))
    a = Sequence(system + list(range(201, 200 + bs)), status=SequenceStatus.RUNNING)
    b = Sequence(system + list(range(301, 300 + bs)), status=SequenceStatus.RUNNING)
    group_a, group_b = SequenceGroup("A", [a]), SequenceGroup("B", [b])
    names = {a.seq_id: "A", b.seq_id: "B"}
    tour = _Tour(out, manager, names, on_step, on_show)

    tour.step(
        "An empty device pool",
        f"The KV cache is a pool of {num_gpu_blocks} blocks of {bs} token slots (the page frames).",
        f"A host (CPU) pool of {num_cpu_blocks} blocks is the swap space. Prefix caching is on.",
    )
    tour.show([], legend=True)

    tour.step(
        "Admit request A",
        f"A: a system prompt of {2 * bs} tokens and a question of {bs - 1}, so {len(a)} tokens "
        f"in {len(a) // bs + 1} blocks.",
        "Only the last block is partly filled: at most block_size - 1 slots wasted.",
        "The full blocks go into the prefix cache, named by a hash of their tokens.",
    )
    cached = manager.allocate(group_a)
    _claim(
        cached == 0 and len(manager.get_block_table(a)) == len(a) // bs + 1,
        "A gets fresh blocks",
    )
    tour.say(f"allocate(A): {cached} tokens found in the prefix cache (it was empty)")
    tour.show([a], legend=True)

    tour.step(
        "Admit request B: its system prompt is already cached",
        "B starts with the same system prompt: its first two blocks have A's names.",
        "B maps A's two blocks (2 prefix-cache hits, ref count 2) plus one new block.",
    )
    hits = device.hits
    cached = manager.allocate(group_b)
    table_a, table_b = manager.get_block_table(a), manager.get_block_table(b)
    _claim(
        device.hits - hits == 2 and cached == 2 * bs,
        "B hits the two system-prompt blocks",
    )
    _claim(
        table_a.block_ids[:2] == table_b.block_ids[:2],
        "A and B share their first two blocks",
    )
    tour.say(
        f"allocate(B): {cached} of B's {len(b)} tokens are already in the pool: not computed"
    )
    tour.show([a, b])

    tour.step(
        "A grows token by token (demand paging)",
        "Each decode step appends one token, and append_slots finds it a slot.",
        "A new block is allocated only when the last one is full, never earlier.",
    )
    for token in (211, 212):
        was_full = table_a.num_filled_in_last_block == bs
        before = len(table_a)
        a.append_token_id(token)
        copies = manager.append_slots(a)
        _claim(
            copies == [] and len(table_a) - before == int(was_full),
            "a block only when the last is full",
        )
        if was_full:
            tour.say(
                f"A += {token}: the last block was full: new block {table_a.block_ids[-1]}"
            )
        else:
            tour.say(
                f"A += {token}: written into block {table_a.block_ids[-1]}, no new block"
            )
    tour.show([a])

    b2 = b.fork()
    group_b.add(b2)
    names[b2.seq_id] = "B'"
    tour.step(
        "Fork B into two samples (parallel sampling)",
        "B' is a child of B, as in fork(): a copy of B's table, sharing every block.",
        "No block is allocated; each of B's blocks gains one reference.",
    )
    used, refs = (
        device.num_used,
        [device.ref_count(block) for block in table_b.block_ids],
    )
    manager.fork(b, b2)
    table_b2 = manager.get_block_table(b2)
    _claim(device.num_used == used, "a fork allocates no block")
    _claim(
        [device.ref_count(block) for block in table_b.block_ids]
        == [r + 1 for r in refs],
        "refs go up",
    )
    tour.say(f"fork(B, B'): blocks used before {used}, after {device.num_used}")
    tour.show([a, b, b2])

    tour.step(
        "B and B' diverge: copy-on-write",
        "Each sample writes a different token into the shared, partly filled last block.",
        "The first writer gets a private copy: append_slots returns (src, dst) pairs,",
        "which the engine hands to copy_blocks before the model step writes into dst.",
    )
    shared_last = table_b.block_ids[-1]
    b.append_token_id(311)
    copies = manager.append_slots(b)
    _claim(
        copies == [(shared_last, table_b.block_ids[-1])],
        "B's write copies the shared block",
    )
    tour.say(
        f"B  += 311: append_slots returned {copies}: copy {copies[0][0]} to {copies[0][1]}"
    )
    b2.append_token_id(312)
    copies = manager.append_slots(b2)
    _claim(
        copies == [] and table_b2.block_ids[-1] == shared_last,
        "B' then writes in place",
    )
    tour.say(
        f"B' += 312: append_slots returned []: B' alone holds {shared_last} now, no copy"
    )
    tour.show([a, b, b2])

    c = Sequence(system + list(range(401, 402 + bs)), status=SequenceStatus.RUNNING)
    names[c.seq_id] = "C"
    tour.step(
        "Request C hits the prefix cache",
        "C arrives with the same system prompt: the cache finds its first two blocks",
        "by their hashes. C maps them (ref counts go up) and computes only the rest.",
    )
    hits, misses = device.hits, device.misses
    cached = manager.allocate(SequenceGroup("C", [c]))
    new_hits, new_misses = device.hits - hits, device.misses - misses
    _claim(
        new_hits == 2 and new_misses == 1 and cached == 2 * bs,
        "C hits the system prompt's 2 blocks",
    )
    tour.say(
        f"allocate(C): {new_hits} hits, {new_misses} miss; {cached} of {len(c)} tokens not computed"
    )
    tour.show([a, b, b2, c])

    tour.step(
        "Swap out request B (both samples) to the host pool",
        "B and B' each generate one more token; then memory is short: the scheduler",
        "preempts B's group and copies its blocks out.",
        "A block shared in the group moves once; blocks that A or C hold stay put too.",
        "B's own blocks were full and named, so the prefix cache keeps them (~).",
    )
    # one more token each first, in private blocks
    for seq, token in ((b, 313), (b2, 314)):
        seq.append_token_id(token)
        _claim(
            manager.append_slots(seq) == [],
            "the samples' last blocks are private: no copy",
        )
    unique = {*table_b.block_ids, *table_b2.block_ids}
    others = {
        *manager.get_block_table(a).block_ids,
        *manager.get_block_table(c).block_ids,
    }
    # full, named
    own = [block for block in unique - others if device.block_hash(block) is not None]
    mapping = manager.swap_out(group_b)
    for seq in group_b.seqs:
        seq.status = SequenceStatus.SWAPPED
    _claim(
        sorted(src for src, _ in mapping) == sorted(unique),
        "each of the group's blocks moves once",
    )
    _claim(
        b.seq_id in manager.host_tables and b2.seq_id in manager.host_tables,
        "B and B' are on the host",
    )
    _claim(
        all(device.is_cached_free(block) for block in own),
        "B's own full blocks stay cached-free",
    )
    tour.say(
        f"swap_out(B) returned (device, host) pairs for swap_blocks:\n    {mapping}"
    )
    tour.show([a, b, b2, c], pools=("device", "host"))

    tour.step(
        "Swap B back in",
        "Later there is room again: B's blocks come back, and token counts stay.",
        "A block whose content the prefix cache still holds on the device (the shared",
        "system prompt, B's cached-free blocks) is mapped again, not transferred,",
        "like a page found in Linux's swap cache; only the rest is copied in.",
    )
    lengths = {seq.seq_id: manager.seq_memory(seq).slots_used for seq in group_b.seqs}
    host_blocks = {
        block
        for seq in group_b.seqs
        for block in manager.host_tables[seq.seq_id].block_ids
    }
    swapped_in = manager.blocks_swapped_in
    mapping = manager.swap_in(group_b)
    for seq in group_b.seqs:
        seq.status = SequenceStatus.RUNNING
    _claim(
        {src for src, _ in mapping} <= host_blocks,
        "only B's host blocks are transferred",
    )
    _claim(
        len(mapping) > 0,
        "the blocks the cache does not hold (partly filled ones) are transferred",
    )
    _claim(
        manager.blocks_swapped_in - swapped_in == len(mapping),
        "the counter counts transfers",
    )
    _claim(
        all(
            manager.get_block_table(s).num_tokens == lengths[s.seq_id]
            for s in group_b.seqs
        ),
        "same tokens",
    )
    _claim(manager.host.num_used == 0, "the host pool is empty again")
    system_blocks = manager.get_block_table(b).block_ids[:2]
    _claim(
        system_blocks == table_a.block_ids[:2],
        "the system prompt is shared with A again",
    )
    tour.say(
        f"swap_in(B) returned (host, device) pairs for swap_blocks: {mapping}\n"
        f"    {len(host_blocks) - len(mapping)} of B's {len(host_blocks)} blocks found in the prefix cache"
    )
    tour.show([a, b, b2, c], pools=("device", "host"))

    tour.step(
        "Everything finishes",
        "Each sequence frees its blocks; a block is freed when its last holder lets go.",
        "Named full blocks stay cached-free (~): a later prompt can still hit them.",
    )
    for seq in (a, b, b2, c):
        seq.status = SequenceStatus.FINISHED_STOPPED
        manager.free(seq)
    _claim(
        device.num_used == 0 and manager.host.num_used == 0, "every block is released"
    )
    _claim(device.num_cached_free > 0, "cached blocks remain in the prefix cache")
    tour.show([], pools=("device",))
    stats = manager.memory_stats()
    out("")
    out(render_stats(stats))
    return stats


__all__ = ["check_sizes", "run"]
