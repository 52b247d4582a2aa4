# %% [markdown]
# # Tutorial 1: the paged memory manager, by hand
#
# PagedAttention stores a model's key/value (KV) cache the way an operating system
# stores a process's memory: in fixed-size **blocks** (page frames) reached through a
# **block table** (a page table), allocated on demand, shared by reference counting,
# copied on write, cached by content and swapped out under pressure (vLLM paper, section
# 4). This tutorial drives each of those pieces by hand and prints what happens. Nothing
# here touches a tensor: the memory manager only decides *which* block holds *which*
# tokens; the kernels move the data later.
#
# Each section: read the prose, predict what the next cell prints, then run it. The
# `assert`s state the facts to take away. `minipaged memory` on the command line shows
# the same story in one go.

# %%
from minipaged.reference import (
    AllocStatus,
    BlockAllocator,
    BlockManager,
    BlockTable,
    NoFreeBlocksError,
)
from minipaged.sequence import Sequence, SequenceGroup
from minipaged.viz import (
    render_allocator,
    render_block_tables,
    render_pool,
    render_stats,
)

# %% [markdown]
# ## 1. The block allocator: a free list and reference counts
#
# A `BlockAllocator` is a pool of `num_blocks` physical blocks. `allocate` takes one off
# the free list with reference count 1; `incref` shares it (as `fork()` shares a page
# frame); `free` drops one reference and puts the block back on the free list when the
# count reaches 0.

# %%
allocator = BlockAllocator(num_blocks=4)
x = allocator.allocate()
y = allocator.allocate()
allocator.incref(x)  # a second holder: x is shared now
print(render_allocator(allocator, {x: ["P", "Q"], y: ["P"]}))
assert (x, y) == (0, 1)  # block 0 is handed out first, so pictures read left to right
assert allocator.ref_count(x) == 2 and allocator.num_free == 2

# %%
print("free(x) leaves ref count", allocator.free(x))  # Q lets go; P still holds x
print("free(x) leaves ref count", allocator.free(x))  # P lets go: x is free again
print(render_allocator(allocator, {y: ["P"]}, legend=False))
assert allocator.ref_count(x) == 0 and allocator.num_free == 3

# %% [markdown]
# When every block is held, `allocate` raises `NoFreeBlocksError`: the KV cache's
# out-of-memory. The block manager checks before it allocates, so this is a bug signal,
# not a normal event.

# %%
tiny = BlockAllocator(num_blocks=1)
tiny.allocate()
try:
    tiny.allocate()
except NoFreeBlocksError as error:
    print("NoFreeBlocksError:", error)
else:
    raise AssertionError("a full pool must refuse to allocate")

# %% [markdown]
# ## 2. The block table: address translation and demand paging
#
# A `BlockTable` maps a sequence's logical blocks to physical ones. Token `pos` lives in
# logical block `pos // block_size` at offset `pos % block_size`, so its **slot** (its
# row in the KV pool) is
#
#     slot = block_ids[pos // block_size] * block_size + pos % block_size
#
# `append_tokens` asks the allocator for a block only when a token falls past the end of
# the last block: demand paging. Here the pool already has blocks 0 and 1 taken, so the
# table gets 2 and 3.

# %%
pool = BlockAllocator(num_blocks=8)
pool.allocate(), pool.allocate()  # someone else holds blocks 0 and 1
table = BlockTable(block_size=4)
print("6 tokens -> new blocks", table.append_tokens(6, pool.allocate))
print(table)
print("slot of position 5:", table.slot(5), "= 3 * 4 + 1")
print("slots of all 6 tokens (the slot_mapping of a prefill):", table.slot_mapping(6))
assert table.block_ids == [2, 3] and table.slot(5) == 3 * 4 + 1
assert table.slot_mapping(6) == [8, 9, 10, 11, 12, 13]

# %%
# fills block 3 exactly
print("+2 tokens -> new blocks", table.append_tokens(2, pool.allocate))
# block 3 is full: a new one
print("+1 token  -> new blocks", table.append_tokens(1, pool.allocate))
print("as the kernels see it:", table.as_tensor(max_blocks=5))  # padded with -1
assert table.block_ids == [2, 3, 4] and table.num_filled_in_last_block == 1

# %% [markdown]
# ## 3. The block manager: admitting a prompt
#
# `BlockManager` is the policy on top: it keeps a device (GPU) pool, a host (CPU) pool
# for swapping, and a block table per sequence. A request is a `SequenceGroup` of one or
# more `Sequence`s. `can_allocate` answers OK / LATER / NEVER; `allocate` gives the
# prompt its blocks.

# %%
manager = BlockManager(
    block_size=4, num_gpu_blocks=10, num_cpu_blocks=6, enable_prefix_caching=True
)
system = [101, 102, 103, 104, 105, 106, 107, 108]  # a system prompt: two full blocks
a = Sequence([*system, 201, 202])  # 10 tokens: 3 blocks, the last one half full
group_a = SequenceGroup("A", [a])
names = {a.seq_id: "A"}
assert manager.can_allocate(group_a) == AllocStatus.OK
cached = manager.allocate(group_a)
print(render_block_tables(manager, [a], names, legend=True))
print(render_pool(manager, names=names))
assert cached == 0 and manager.get_block_table(a).block_ids == [0, 1, 2]

# %% [markdown]
# ## 4. Appending tokens: one decode step at a time
#
# The model produces one token per step. Record it on the sequence, then `append_slots`
# finds its slot. Predict: which of the three tokens below makes the manager allocate a
# new block?

# %%
for token in (301, 302, 303):
    a.append_token_id(token)
    copies = manager.append_slots(a)
    table_a = manager.get_block_table(a)
    print(
        f"+{token}: {len(a)} tokens, table {table_a.block_ids}, "
        f"its slot {table_a.slot_mapping(1)}"
    )
    assert copies == []  # nothing shared yet, so nothing to copy
# the 13th token opened block 3
assert manager.get_block_table(a).block_ids == [0, 1, 2, 3]

# %% [markdown]
# ## 5. Fork: parallel samples share every block
#
# Sampling two continuations of one prompt forks the sequence. The child gets a copy of
# the block table and shares every block: no block is allocated, reference counts go up
# by one.

# %%
b = a.fork()
group_a.add(b)
names[b.seq_id] = "A'"
used_before = manager.device.num_used
manager.fork(a, b)
print(render_block_tables(manager, [a, b], names))
print(render_pool(manager, names=names, legend=False))
assert manager.device.num_used == used_before  # a fork allocates nothing
assert all(
    manager.device.ref_count(block) == 2
    for block in manager.get_block_table(a).block_ids
)

# %% [markdown]
# ## 6. Copy-on-write: the first write into a shared block copies it
#
# Both samples now write their next token into the same partly filled block 3. Writing
# there would clobber the other's data, so the first writer gets a private copy:
# `append_slots` returns the `(src, dst)` pair that the engine hands to the
# `copy_blocks` kernel before the model step. The second writer then owns block 3 alone
# and writes in place. Full shared blocks are never copied: nobody writes into them
# again.

# %%
a.append_token_id(401)
copies_a = manager.append_slots(a)
b.append_token_id(402)
copies_b = manager.append_slots(b)
print("A  wrote 401, copy-on-write pairs:", copies_a)
print("A' wrote 402, copy-on-write pairs:", copies_b)
print(render_block_tables(manager, [a, b], names))
assert copies_a == [(3, 4)] and copies_b == []
assert (
    manager.get_block_table(a).block_ids[-1] == 4
    and manager.get_block_table(b).block_ids[-1] == 3
)

# %% [markdown]
# ## 7. Prefix caching: a new request finds blocks it never computed
#
# With prefix caching on, every full block is named by a hash of its tokens and of
# everything before it. A new request with the same system prompt looks its blocks up by
# those names: each block found is a **hit**, memory shared and computation skipped.
# `allocate` returns how many prompt tokens were found.

# %%
c = Sequence([*system, 501, 502, 503])
names[c.seq_id] = "C"
hits_before = manager.device.hits
cached = manager.allocate(SequenceGroup("C", [c]))
print(
    f"C: {cached} of its {len(c)} prompt tokens were cached; "
    f"hits +{manager.device.hits - hits_before}"
)
print(render_pool(manager, names=names, legend=False))
assert cached == 8 and manager.get_block_table(c).block_ids[:2] == [0, 1]

# %% [markdown]
# ## 8. Swapping: out to the host pool and back
#
# When the device pool runs short, the scheduler can preempt a whole group by swapping
# its blocks to the host pool. `swap_out` returns `(device block, host block)` pairs for
# the `swap_blocks` kernel; a block shared inside the group moves once. `swap_in` is the
# inverse.

# %%
out_pairs = manager.swap_out(group_a)
print("swap_out pairs (device, host):", out_pairs)
print(render_block_tables(manager, [a, b, c], names))
print(render_pool(manager, "host", names, legend=False))
# blocks 0-2, shared by A and A', move once each; then 4 (A's), 3 (A''s)
assert len(out_pairs) == 5
assert manager.host.num_used == 5

# %%
in_pairs = manager.swap_in(group_a)
print("swap_in pairs (host, device):", in_pairs)
print(render_block_tables(manager, [a, b, c], names))
assert manager.host.num_used == 0 and manager.get_block_table(a).num_tokens == len(a)

# %% [markdown]
# ## 9. Freeing, and what the prefix cache keeps
#
# A finished sequence frees its blocks. A block is released when its last holder lets
# go; a full, named block stays in the prefix cache as *cached-free* (`~`): free to be
# evicted for new content, but found by the next prompt that names it.

# %%
for seq in (a, b, c):
    manager.free(seq)
print(render_pool(manager, names=names, legend=False))
print(render_stats(manager.memory_stats()))
assert manager.device.num_used == 0 and manager.device.num_cached_free > 0

# %%
d = Sequence([*system, 601])  # after everyone left, the system prompt is still cached
cached = manager.allocate(SequenceGroup("D", [d]))
print(f"D: {cached} tokens found in the cache, though nobody held those blocks")
assert cached == 8
manager.free(d)

# %% [markdown]
# ## What next
#
# - `minipaged memory` replays this story as one annotated walk-through.
# - The concept pages explain each OS idea; the assignments ask you to write these
#   functions yourself (`pytest -m task1_1` ... `task1_7`).
