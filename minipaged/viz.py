"""Text pictures of paged KV memory: the pool, the block tables, the numbers.

The idea: paging is easiest to believe when you can see it. An OS textbook draws physical memory as a
row of frames, each labelled with the process that owns it, and a page table as arrows from virtual
pages to frames (OSTEP ch. 18-20); the vLLM paper draws the same two pictures for KV blocks (figures
6-8). These functions draw them as monospace text, so the walk-through, the tutorials and a student's
own debugging session can print what the block manager did after every step:

- `render_pool`: every physical block of a pool as a cell saying which sequences hold it (and its
  reference count when shared), whether the prefix cache keeps it though nobody holds it, or '.';
- `render_block_tables`: each sequence's table, logical block -> physical block, with its filled slots;
- `render_stats`: the counts behind the pictures (MemoryStats): utilization, sharing, hits, copies, swaps.

Every function returns a string and prints nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from minipaged.reference.block_allocator import BlockAllocator
from minipaged.reference.block_manager import BlockManager, MemoryStats, PoolStats
from minipaged.reference.block_table import BlockTable
from minipaged.sequence import Sequence

FREE = "."  # a free block: nothing worth keeping
CACHED_FREE = "~"  # nobody holds it, but the prefix cache still names its K/V
MAX_BAR = 8  # block sizes up to this draw their slots as a bar, larger ones as a count

POOL_LEGEND = (
    "legend: A = held by A;  A,B x2 = shared by A and B (ref count 2);  . = free;\n"
    "        ~ = cached-free: nobody holds it, but the prefix cache keeps its K/V"
)
TABLE_LEGEND = (
    "legend: 2->7 = logical block 2 is physical block 7;  * = shared (ref count > 1);\n"
    "        [##..] = the block's slots: # holds a token, . is empty"
)


def seq_label(seq_id: int, names: Mapping[int, str] | None = None) -> str:
    """How pictures name a sequence: `names[seq_id]` if given, else "s<seq_id>"."""
    return names[seq_id] if names and seq_id in names else f"s{seq_id}"


def render_allocator(
    allocator: BlockAllocator,
    holders: Mapping[int, Iterable[str]] | None = None,
    *,
    title: str | None = None,
    per_row: int | None = None,
    legend: bool = True,
) -> str:
    """Draw a pool as a row of cells, one per physical block, wrapped to about 80 columns.

    For a pool of 4 blocks where A and B share block 0 and block 2 is free:

    ```text
    device pool: 4 blocks, 3 used, 1 free
       0      1      2      3
      [A,B x2][A     ][.     ][B     ]
    ```

    Args:
        allocator: the pool (a BlockAllocator or PrefixCachingBlockAllocator).
        holders: block id -> labels of the tables holding it; without it a held block reads "held".
        title: the first line; by default the pool's name and counts.
        per_row: blocks per line; by default as many as fit in 80 columns.
        legend: append the legend.

    Returns:
        The picture.
    """
    holders = holders or {}
    cached_free = getattr(allocator, "is_cached_free", lambda block: False)
    cells = []
    for block in range(allocator.num_blocks):
        ref = allocator.ref_count(block)
        if ref == 0:
            cells.append(CACHED_FREE if cached_free(block) else FREE)
        else:
            who = ",".join(holders.get(block, ())) or "held"
            cells.append(who if ref == 1 else f"{who} x{ref}")
    if title is None:
        title = f"{allocator.name} pool: {allocator.num_blocks} blocks, " + _counts(
            allocator
        )
    lines = [title]
    if not cells:
        lines.append("  (no blocks)")
    width = max([len(cell) for cell in cells] + [len(str(allocator.num_blocks - 1))])
    per_row = per_row or max(1, 78 // (width + 2))
    for start in range(0, len(cells), per_row):
        row = cells[start : start + per_row]
        ids = "".join(" " + str(start + i).ljust(width + 1) for i in range(len(row)))
        lines.append("  " + ids.rstrip())
        lines.append("  " + "".join(f"[{cell.ljust(width)}]" for cell in row))
    if legend:
        lines.append(POOL_LEGEND)
    return "\n".join(lines)


def render_pool(
    manager: BlockManager,
    pool: str = "device",
    names: Mapping[int, str] | None = None,
    *,
    per_row: int | None = None,
    legend: bool = True,
) -> str:
    """Draw the manager's device (GPU) or host (CPU swap) pool: who holds each physical block.

    Args:
        manager: the block manager.
        pool: "device" or "host".
        names: seq_id -> a short label such as "A" (default "s<seq_id>").
        per_row: blocks per line; by default as many as fit in 80 columns.
        legend: append the legend.

    Raises:
        ValueError: if `pool` is neither "device" nor "host".
    """
    if pool not in ("device", "host"):
        raise ValueError(f'pool must be "device" or "host", got {pool!r}')
    allocator = manager.device if pool == "device" else manager.host
    tables = manager.device_tables if pool == "device" else manager.host_tables
    holders: dict[int, list[str]] = {}
    for seq_id in sorted(tables):
        for block in tables[seq_id].block_ids:
            holders.setdefault(block, []).append(seq_label(seq_id, names))
    title = (
        f"{pool} pool: {allocator.num_blocks} blocks of {manager.block_size} slots, "
        + _counts(allocator)
    )
    return render_allocator(
        allocator, holders, title=title, per_row=per_row, legend=legend
    )


def render_block_table(
    table: BlockTable, allocator: BlockAllocator | None = None
) -> str:
    """One table as `0->3[####] 1->5*[##..]`: logical -> physical, its filled slots, * if shared.

    Args:
        table: the block table.
        allocator: the pool its blocks live in, to mark shared blocks; None marks nothing.
    """
    size = table.block_size
    entries = []
    for i, block in enumerate(table.block_ids):
        filled = min(size, table.num_tokens - i * size)
        bar = (
            "#" * filled + "." * (size - filled)
            if size <= MAX_BAR
            else f"{filled}/{size}"
        )
        shared = "*" if allocator is not None and allocator.ref_count(block) > 1 else ""
        entries.append(f"{i}->{block}{shared}[{bar}]")
    return " ".join(entries) or "(empty)"


def render_block_tables(
    manager: BlockManager,
    seqs: Iterable[Sequence],
    names: Mapping[int, str] | None = None,
    *,
    legend: bool = False,
) -> str:
    """Each sequence's block table, one line each, e.g. `A  11 tokens, device: 0->0*[####] ...`.

    Args:
        manager: the block manager.
        seqs: the sequences to show, in order; one holding no blocks says so.
        names: seq_id -> a short label such as "A" (default "s<seq_id>").
        legend: append the legend.
    """
    seqs = list(seqs)
    width = max((len(seq_label(seq.seq_id, names)) for seq in seqs), default=0)
    lines = []
    for seq in seqs:
        label = seq_label(seq.seq_id, names).ljust(width)
        if seq.seq_id in manager.device_tables:
            table, pool = manager.device_tables[seq.seq_id], manager.device
        elif seq.seq_id in manager.host_tables:
            table, pool = manager.host_tables[seq.seq_id], manager.host
        else:
            lines.append(f"{label}  holds no blocks")
            continue
        where = f"{table.num_tokens:>3} tokens, {pool.name + ':':<7}"
        lines.append(f"{label}  {where} {render_block_table(table, pool)}")
    if legend:
        lines.append(TABLE_LEGEND)
    return "\n".join(lines)


def render_stats(stats: MemoryStats) -> str:
    """A short summary of `BlockManager.memory_stats()`: blocks, slots, and the counters.

    Utilization is the paper's KV-cache usage: slots holding a token over slots allocated; the rest is
    internal fragmentation, at most block_size - 1 slots per sequence.
    """
    lines = [_pool_summary(stats.device), _pool_summary(stats.host)]
    lines.append(
        f"prefix cache: {_count(stats.prefix_cache_hits, 'hit')}, "
        f"{_count(stats.prefix_cache_misses, 'miss', 'misses')}; "
        f"copied on write: {_count(stats.cow_copies, 'block')}; "
        f"swapped: {stats.blocks_swapped_out} out, {stats.blocks_swapped_in} in"
    )
    return "\n".join(lines)


def _pool_summary(pool: PoolStats) -> str:
    head = f"{pool.name + ':':<7} {pool.num_used}/{pool.num_blocks} blocks used"
    if pool.num_shared:
        head += f" ({pool.num_shared} shared, saving {pool.blocks_saved_by_sharing})"
    head += f", {pool.num_free} free"
    if pool.num_cached_free:
        head += f" ({pool.num_cached_free} cached-free)"
    if not pool.slots_allocated:
        return head + "\n        slots: none allocated"
    return (
        f"{head}\n        slots: {pool.slots_used} used / {pool.slots_allocated} allocated = "
        f"{pool.utilization:.0%} utilization; {pool.internal_waste} wasted in partial blocks"
    )


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


def _counts(allocator: BlockAllocator) -> str:
    text = f"{allocator.num_used} used, {allocator.num_free} free"
    cached = getattr(allocator, "num_cached_free", 0)
    return text + (f" ({cached} cached-free)" if cached else "")


__all__ = [
    "CACHED_FREE",
    "FREE",
    "POOL_LEGEND",
    "TABLE_LEGEND",
    "render_allocator",
    "render_block_table",
    "render_block_tables",
    "render_pool",
    "render_stats",
    "seq_label",
]
