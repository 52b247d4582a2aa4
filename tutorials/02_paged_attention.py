# %% [markdown]
# # Tutorial 2: paged attention, by hand
#
# [Tutorial 1](../01_memory_manager/) decided *which* block holds *which* tokens without
# touching a tensor. This tutorial moves the data. A model step does two things with the
# KV cache, both through the block table, the way a CPU's loads and stores go through
# the page table:
#
# - **write through the table** (`write_kv`): each new token's key and value go to the
#   slot that address translation gives them ([Writing through the
#   table](../../concepts/writing-through-the-table/));
# - **read through the table** (`paged_attention`): each query row attends to its
#   sequence's keys and values, wherever in the pool the blocks lie ([Reading through
#   the table](../../concepts/reading-through-the-table/)).
#
# We build block tables by hand, write random K/V into a small pool, run attention for a
# mixed batch (a decode, a prefill and a chunk of a chunked prefill, with grouped-query
# attention), and hold the result to a dense oracle that knows nothing about paging.
# Then the OS stories with data in them: stale pages, fork with copy-on-write, and a
# swap round trip.
#
# Each section: read the prose, predict what the next cell prints, then run it. The
# `assert`s state the facts to take away.

# %%
import torch

from minipaged import get_backend
from minipaged.reference import (
    BlockAllocator,
    BlockTable,
    block_tables_tensor,
    dense_attention,
    paged_attention_blockwise,
)
from minipaged.testing import tolerance
from minipaged.viz import render_block_table

# the readable PyTorch backend; "triton" takes the same calls
backend = get_backend("reference")
# every tensor below is random, never zeros: a zero hides bugs
gen = torch.Generator().manual_seed(0)

# %% [markdown]
# ## 1. A pool full of NaN
#
# One layer's KV cache is two pools, keys and values, each
# `[num_blocks, block_size, num_kv_heads, head_dim]`: a block is a page of `block_size`
# token rows, and a **slot** is one token row, numbered `block * block_size + offset`
# ([the page table](../../concepts/page-table/)). We fill both pools with NaN before
# anything is written. NaN is contagious: one NaN read into a softmax turns the whole
# output row into NaN. So if every result below is a finite number, no unwritten slot
# was ever read.

# %%
NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 12, 4, 2, 8
NUM_HEADS = 4  # query heads: grouped-query attention, 2 query heads per KV head
pool_shape = (NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
# [num_blocks, block_size, num_kv_heads, head_dim]
k_cache = torch.full(pool_shape, float("nan"))
v_cache = torch.full(pool_shape, float("nan"))
# the frame allocator that hands out the pool's blocks
allocator = BlockAllocator(NUM_BLOCKS)
print(
    f"k_cache, v_cache: {list(k_cache.shape)}: "
    f"{NUM_BLOCKS} blocks x {BLOCK_SIZE} slots, all NaN"
)
assert k_cache.isnan().all() and v_cache.isnan().all()


# %% [markdown]
# A small helper draws the pool, one line per block, one cell per slot: `A7` means
# "sequence A's token at position 7 is stored here", `NaN` means the slot was never
# written. The labels come from the block tables, but whether a slot counts as written
# comes from the pool itself, so the picture cannot lie: a slot that a table names but
# nobody wrote would show as `A7?`, and a slot written without any table naming it as
# `old`.


# %%
def written_slots(k_cache: torch.Tensor) -> torch.Tensor:
    """`[num_slots]` bool: does the slot hold numbers (True) or NaN (never written)?"""
    # a slot is one row of the pool
    return ~k_cache.flatten(0, 1).isnan().flatten(1).all(dim=1)


def pool_picture(k_cache: torch.Tensor, tables: dict[str, BlockTable]) -> str:
    """The pool, one line per block: which sequence's token each slot holds.

    `NaN`: never written.
    """
    num_blocks, block_size = k_cache.shape[:2]
    owners: dict[int, list[str]] = {}  # slot -> the tokens that tables place there
    for name, table in tables.items():
        for pos in range(table.num_tokens):
            owners.setdefault(table.slot(pos), []).append(f"{name}{pos}")
    written = written_slots(k_cache)
    labels = []
    for slot in range(num_blocks * block_size):
        label = "=".join(owners.get(slot, []))  # two names: a slot shared after a fork
        if not label:
            label = "old" if written[slot] else "NaN"
        elif not written[slot]:
            label += "?"
        labels.append(label)
    width = max(len(label) for label in labels)
    lines = []
    for block in range(num_blocks):
        cells = labels[block * block_size : (block + 1) * block_size]
        lines.append(
            f"block {block:2} | "
            + " ".join(cell.ljust(width) for cell in cells).rstrip()
        )
    return "\n".join(lines)


# %% [markdown]
# ## 2. Block tables by hand: an earlier step
#
# The cache already holds an earlier step's work: sequence **A** was prefilled with its
# 9 prompt tokens, and sequence **C**, a long prompt processed in chunks (chunked
# prefill), got its first chunk of 4 tokens. `BlockTable.append_tokens` asks the
# allocator for a block only when a token falls past the end of the last block (demand
# paging); `slot_mapping(n)` translates the last `n` positions into slots,
# `slot = block_ids[pos // block_size] * block_size + pos % block_size`.

# %%
table_a = BlockTable(BLOCK_SIZE)
table_c = BlockTable(BLOCK_SIZE)
table_a.append_tokens(9, allocator.allocate)
table_c.append_tokens(4, allocator.allocate)
for name, table in (("A", table_a), ("C", table_c)):
    print(f"{name}: {table}  slots {table.slot_mapping(table.num_tokens)}")
    print(f"   {render_block_table(table)}")
assert table_a.block_ids == [0, 1, 2] and table_c.block_ids == [3]
# position 8: logical block 2 (physical 2), offset 0
assert table_a.slot(8) == 2 * 4 + 0

# %% [markdown]
# ## 3. Writing through the table
#
# The model computes a key and a value for every token (here: random tensors, one row
# per position). We keep each sequence's K/V in a plain contiguous tensor too, indexed
# by position: that is what attention would read without paging, and what the oracle
# reads at the end.
#
# `write_kv(key, value, k_cache, v_cache, slot_mapping)` stores row `i` at slot
# `slot_mapping[i]`: the step's tokens are packed one after another, whatever sequence
# they belong to, and the slot mapping alone says where each goes (vLLM's
# `reshape_and_cache`).

# %%
# lengths after this tutorial's main step (section 4)
SEQ_LENS = {"A": 10, "B": 5, "C": 10}
keys = {
    name: torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    for name, n in SEQ_LENS.items()
}
values = {
    name: torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    for name, n in SEQ_LENS.items()
}

# [13, num_kv_heads, head_dim]: 9 of A, 4 of C
step1_key = torch.cat([keys["A"][:9], keys["C"][:4]])
step1_value = torch.cat([values["A"][:9], values["C"][:4]])
# [13] int64
step1_slots = torch.tensor(table_a.slot_mapping(9) + table_c.slot_mapping(4))
print("slot_mapping:", step1_slots.tolist())
backend.write_kv(step1_key, step1_value, k_cache, v_cache, step1_slots)
tables = {"A": table_a, "C": table_c}
print(pool_picture(k_cache, tables))
assert torch.equal(k_cache[2, 0], keys["A"][8])  # A's position 8 sits in block 2, row 0
assert written_slots(k_cache).sum() == 9 + 4  # exactly 13 slots written, no more

# %% [markdown]
# ## 4. This step: a decode, a prefill and a chunk, in one batch
#
# Iteration-level batching puts very different work in one step:
#
# - **A decodes**: one new token, at position 9. Its last block has room, so no new
#   block.
# - **B prefills**: a new request with a 5-token prompt, all of it computed now: 2
#   blocks.
# - **C continues its chunked prefill**: 6 more prompt tokens, positions 4 to 9: 2 more
#   blocks.
#
# The step's 12 tokens are packed in that order. We add one **padding** row with slot
# -1, as an engine does when it pads a batch to a fixed size (CUDA graphs need fixed
# shapes): `write_kv` skips it. Its values are huge and finite on purpose: if they
# landed anywhere, the oracle check would catch it.

# %%
new_tokens = {"A": 1, "B": 5, "C": 6}
table_b = BlockTable(BLOCK_SIZE)
tables = {"A": table_a, "B": table_b, "C": table_c}
for name, n in new_tokens.items():
    got = tables[name].append_tokens(n, allocator.allocate)
    print(f"{name}: +{n} tokens -> new blocks {got}; table {tables[name].block_ids}")
assert (
    table_a.block_ids == [0, 1, 2]
    and table_b.block_ids == [4, 5]
    and table_c.block_ids == [3, 6, 7]
)

# garbage that must not land
padding_key = 1e4 * torch.randn(1, NUM_KV_HEADS, HEAD_DIM, generator=gen)
# [13, kv_heads, head_dim]
step_key = torch.cat([keys["A"][9:], keys["B"], keys["C"][4:], padding_key])
step_value = torch.cat([values["A"][9:], values["B"], values["C"][4:], padding_key])
step_slots = torch.tensor(
    table_a.slot_mapping(1) + table_b.slot_mapping(5) + table_c.slot_mapping(6) + [-1]
)  # [13] int64; -1: the padding row
print("slot_mapping:", step_slots.tolist())
backend.write_kv(step_key, step_value, k_cache, v_cache, step_slots)
print(pool_picture(k_cache, tables))
# 25 tokens, 25 slots written: the padding row went nowhere,
# and left no trace of its huge values
assert written_slots(k_cache).sum() == sum(SEQ_LENS.values())
assert (k_cache.abs().nan_to_num() < 1e3).all()

# %% [markdown]
# Address translation works both ways. Reading a sequence back slot by slot, position by
# position, with nothing but the table, gives back exactly the contiguous K/V that the
# model computed: C's tokens lie in blocks 3, 6 and 7, not side by side, and it does not
# matter.

# %%
# [num_slots, num_kv_heads, head_dim]: the pool as a row of slots
k_slots = k_cache.flatten(0, 1)
v_slots = v_cache.flatten(0, 1)
for name, table in tables.items():
    # every position's slot, in position order
    slots = table.slot_mapping(table.num_tokens)
    assert torch.equal(k_slots[slots], keys[name]) and torch.equal(
        v_slots[slots], values[name]
    )
    print(f"{name}: positions 0..{table.num_tokens - 1} read back from slots {slots}")

# %% [markdown]
# ## 5. Reading through the table: paged attention
#
# `paged_attention` receives the whole batch as a few small tensors, the same ones vLLM
# and FlashAttention's varlen kernels take:
#
# - `query` `[num_q_tokens, num_heads, head_dim]`: the step's query rows, packed like
#   the writes;
# - `query_start_loc` `[num_seqs + 1]`: sequence `b` owns rows
#   `query_start_loc[b]:query_start_loc[b+1]`;
# - `seq_lens` `[num_seqs]`: tokens in each sequence, this step's included;
# - `block_tables` `[num_seqs, max_blocks]` int32, padded with -1 (here one extra
#   column, to show it).
#
# A sequence's `q_len` rows are its *last* `q_len` tokens, at positions
# `seq_len - q_len ...`, each attending causally to positions up to its own. So decode
# (`q_len = 1`), prefill (`q_len = seq_len`) and a prefill chunk (`1 < q_len < seq_len`)
# are the same call. With GQA, query heads 0-1 read KV head 0 and query heads 2-3 read
# KV head 1.

# %%
names = ["A", "B", "C"]
q_lens = [new_tokens[name] for name in names]  # [1, 5, 6]
# [12, num_heads, head_dim]
query = torch.randn(sum(q_lens), NUM_HEADS, HEAD_DIM, generator=gen)
query_start_loc = torch.tensor(
    [0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32
)
seq_lens = torch.tensor([tables[name].num_tokens for name in names], dtype=torch.int32)
block_tables = block_tables_tensor([tables[name] for name in names], max_blocks=4)
scale = HEAD_DIM**-0.5
print("query          ", list(query.shape))
print("query_start_loc", query_start_loc.tolist())
print("seq_lens       ", seq_lens.tolist())
print("block_tables\n", block_tables)
out = backend.paged_attention(
    query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale
)
print("out            ", list(out.shape), "all finite:", bool(out.isfinite().all()))
# not one of the 23 NaN slots was read
assert out.shape == query.shape and out.isfinite().all()
assert query_start_loc.tolist() == [0, 1, 6, 12] and seq_lens.tolist() == [10, 5, 10]

# %% [markdown]
# One row by hand, to see there is no magic: A's decode row (row 0) is position 9, which
# sees all of A's 10 keys. Query head `h` uses KV head `h // 2`; its output is the
# softmax-weighted sum of values.

# %%
group = NUM_HEADS // NUM_KV_HEADS
for h in range(NUM_HEADS):
    # [10, head_dim] each, contiguous
    k, v = keys["A"][:, h // group], values["A"][:, h // group]
    # [10]: how much each position counts
    probs = torch.softmax(k @ query[0, h] * scale, dim=0)
    by_hand = probs @ v  # [head_dim]
    print(
        f"head {h} (KV head {h // group}): "
        f"max |paged - by hand| = {(out[0, h] - by_hand).abs().max():.1e}"
    )
    torch.testing.assert_close(out[0, h], by_hand, **tolerance(torch.float32))

# %% [markdown]
# ## 6. The oracle chain
#
# `dense_attention` is torch's `scaled_dot_product_attention` on the contiguous K/V of
# section 3: no pool, no table, no paging. `paged_attention_blockwise` computes the same
# thing the way a GPU kernel does: it walks the table one block at a time with an online
# softmax, never building a contiguous copy (the paper's Eq. 4). All three must agree to
# float32 rounding.

# %%
expected = dense_attention(
    query, [keys[n] for n in names], [values[n] for n in names], query_start_loc, scale
)
blockwise = paged_attention_blockwise(
    query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale
)
print(f"max |paged - dense|     = {(out - expected).abs().max():.2e}")
print(f"max |blockwise - dense| = {(blockwise - expected).abs().max():.2e}")
torch.testing.assert_close(out, expected, **tolerance(torch.float32))
torch.testing.assert_close(blockwise, expected, **tolerance(torch.float32))

# %% [markdown]
# ## 7. Stale slots never matter
#
# A's last block, block 2, holds positions 8 and 9; its rows 2 and 3 are NaN. In a real
# engine they would hold *stale* data: whatever the previous owner of the block left
# there, as a freshly mapped page frame holds a previous process's bytes until it is
# overwritten (an OS zeroes it; a KV cache does not bother). A kernel that read whole
# blocks would pick them up:

# %%
# [12, kv_heads, head_dim]: 10 tokens + 2 stale
whole_blocks = k_cache[table_a.block_ids].flatten(0, 1)
# [12] scores of A's decode row, head 0
careless = whole_blocks[:, 0] @ query[0, 0] * scale
print("scores over whole blocks:", [f"{s:.2f}" for s in careless.tolist()])
print("softmax over them       :", torch.softmax(careless, dim=0)[:3].tolist(), "...")
assert careless[10:].isnan().all() and torch.softmax(careless, dim=0).isnan().all()

# %% [markdown]
# `paged_attention` reads only positions below `seq_lens[b]`, so the stale rows never
# enter. NaN makes a bad read loud; stale *finite* garbage would make it silent, which
# is worse. So replace every slot that no table covers with huge random numbers (on a
# copy of the pools) and run again: the output does not change by a single bit.

# %%
k_stale, v_stale = k_cache.clone(), v_cache.clone()
# [num_blocks, block_size, kv_heads, head_dim]: the 23 slots nobody wrote
unwritten = k_stale.isnan()
k_stale[unwritten] = 1e4 * torch.randn(int(unwritten.sum()), generator=gen)
v_stale[unwritten] = 1e4 * torch.randn(int(unwritten.sum()), generator=gen)
out_stale = backend.paged_attention(
    query, k_stale, v_stale, block_tables, seq_lens, query_start_loc, scale
)
print("NaN left in the pool:", bool(k_stale.isnan().any()))
print("output identical to section 5's:", torch.equal(out_stale, out))
assert torch.equal(out_stale, out)

# %% [markdown]
# ## 8. Fork and copy-on-write, with data
#
# Sampling two continuations of A forks it: the child **A'** gets a copy of A's table
# and shares all of its blocks, so their K/V are not copied (reference counts go up; see
# [fork](../../concepts/fork/)). Both now decode a *different* token at position 10, and
# both want to write it into block 2, which is shared and only half full. Writing there
# in place would clobber the other's row, so the first writer gets a private copy first
# ([copy-on-write](../../concepts/copy-on-write/)): allocate a fresh block, point the
# writer's table at it, and have `copy_blocks` copy the old block's rows into it before
# the step writes. `BlockManager.append_slots` does exactly this and returns the
# `(src, dst)` pairs; here it is by hand.

# %%
table_a2 = table_a.copy()  # fork: the child's table names the same blocks
for block in table_a2.block_ids:
    allocator.incref(block)
tables["A'"] = table_a2
print("A  :", render_block_table(table_a, allocator))
print("A' :", render_block_table(table_a2, allocator))
assert all(allocator.ref_count(block) == 2 for block in table_a.block_ids)


def append_with_cow(table: BlockTable, num_new_tokens: int) -> list[tuple[int, int]]:
    """Make room for new tokens, copying a shared, partly filled last block first.

    That copy is the copy-on-write: the other holders keep the original.
    """
    pairs = []
    last = table.block_ids[-1]
    if table.num_filled_in_last_block < BLOCK_SIZE and allocator.ref_count(last) > 1:
        fresh = allocator.allocate()
        allocator.free(last)  # this table lets go of the shared block...
        table.block_ids[-1] = fresh  # ...and writes into its own copy from now on
        pairs.append((last, fresh))
    table.append_tokens(num_new_tokens, allocator.allocate)
    return pairs


# A' writes first, then A
pairs = append_with_cow(table_a2, 1) + append_with_cow(table_a, 1)
print("copy-on-write pairs (src, dst):", pairs)
print("A  :", render_block_table(table_a, allocator))
print("A' :", render_block_table(table_a2, allocator))
# A' copies block 2 into block 8; A then owns block 2 alone and writes in place
assert pairs == [(2, 8)]
assert allocator.ref_count(2) == 1 and allocator.ref_count(8) == 1
# one list entry a layer
backend.copy_blocks([k_cache], [v_cache], torch.tensor(pairs, dtype=torch.int64))
print(
    "after copy_blocks, block 8 rows 0-1 == block 2 rows 0-1:",
    torch.equal(k_cache[8, :2], k_cache[2, :2]),
)

# %% [markdown]
# Now the decode step writes each sequence's new token through its own table, and
# attends.

# %%
# position 10: A' then A
fork_keys = torch.randn(2, NUM_KV_HEADS, HEAD_DIM, generator=gen)
fork_values = torch.randn(2, NUM_KV_HEADS, HEAD_DIM, generator=gen)
fork_slots = torch.tensor(table_a2.slot_mapping(1) + table_a.slot_mapping(1))
print("slot_mapping:", fork_slots.tolist())
backend.write_kv(fork_keys, fork_values, k_cache, v_cache, fork_slots)
print(pool_picture(k_cache, tables))

# one decode row each: A', A
fork_query = torch.randn(2, NUM_HEADS, HEAD_DIM, generator=gen)
fork_tables = block_tables_tensor([table_a2, table_a])
fork_lens = torch.tensor([11, 11], dtype=torch.int32)
fork_starts = torch.tensor([0, 1, 2], dtype=torch.int32)
fork_out = backend.paged_attention(
    fork_query, k_cache, v_cache, fork_tables, fork_lens, fork_starts, scale
)
fork_expected = dense_attention(
    fork_query,
    # shared past + its own token
    [torch.cat([keys["A"], fork_keys[i : i + 1]]) for i in range(2)],
    [torch.cat([values["A"], fork_values[i : i + 1]]) for i in range(2)],
    fork_starts,
    scale,
)
print(f"max |paged - dense| for A' and A: {(fork_out - fork_expected).abs().max():.2e}")
torch.testing.assert_close(fork_out, fork_expected, **tolerance(torch.float32))
assert torch.equal(k_cache[8, 2], fork_keys[0]) and torch.equal(
    k_cache[2, 2], fork_keys[1]
)

# %% [markdown]
# Why `copy_blocks` was needed: block 8 came from the free list holding nothing useful
# (here NaN). Without the copy, A' would read positions 8 and 9 from it:

# %%
k_no_copy, v_no_copy = k_cache.clone(), v_cache.clone()
# block 8 as it was before the copy
k_no_copy[8, :2], v_no_copy[8, :2] = float("nan"), float("nan")
no_copy = backend.paged_attention(
    fork_query, k_no_copy, v_no_copy, fork_tables, fork_lens, fork_starts, scale
)
print("A' without the copy:", no_copy[0, 0].tolist())
print("A  without the copy, unchanged:", torch.equal(no_copy[1], fork_out[1]))
assert no_copy[0].isnan().all() and torch.equal(no_copy[1], fork_out[1])

# %% [markdown]
# ## 9. Swapping B out to the host pool and back
#
# Under memory pressure the scheduler may preempt B and [swap](../../concepts/swapping/)
# its blocks to a host pool, as an OS pages a process out to disk.
# `swap_blocks(src, dst, block_mapping)` moves whole blocks between two pools that may
# sit on different devices: on a GPU machine the device pool is CUDA memory and the host
# pool (pinned) CPU memory. **In this tutorial both are CPU tensors**, so the "transfer"
# is a CPU copy, but the calls and the bookkeeping are the same. While B is out, a new
# sequence D takes its freed blocks and overwrites them; B comes back into other blocks,
# its table is rewritten, and its attention is unchanged: the table, not the block ids,
# is what B's data hangs on.

# %%
# a 4-block host pool
k_host = torch.full((4, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM), float("nan"))
v_host = torch.full_like(k_host, float("nan"))
host_allocator = BlockAllocator(4, "host")
out_b = out[1:6]  # B's prefill rows from section 5

# [2, 2] int64
swap_out = torch.tensor(
    [[block, host_allocator.allocate()] for block in table_b.block_ids]
)
backend.swap_blocks(k_cache, k_host, swap_out)  # once per pool (K and V) and per layer
backend.swap_blocks(v_cache, v_host, swap_out)
for block in reversed(table_b.block_ids):
    allocator.free(block)
del tables["B"]
# B's table, in host blocks
table_b_host = BlockTable(BLOCK_SIZE, swap_out[:, 1].tolist(), num_tokens=5)
print("swap out (device, host):", swap_out.tolist())
print("host pool:")
print(pool_picture(k_host, {"B": table_b_host}))
host_slots = table_b_host.slot_mapping(5)
# B's K/V now live on the host
assert torch.equal(k_host.flatten(0, 1)[host_slots], keys["B"])

table_d = BlockTable(BLOCK_SIZE)  # the newcomer takes the blocks B left
table_d.append_tokens(8, allocator.allocate)
tables["D"] = table_d
d_keys = torch.randn(8, NUM_KV_HEADS, HEAD_DIM, generator=gen)
d_values = torch.randn(8, NUM_KV_HEADS, HEAD_DIM, generator=gen)
backend.write_kv(
    d_keys, d_values, k_cache, v_cache, torch.tensor(table_d.slot_mapping(8))
)
print("D took blocks", table_d.block_ids)
assert table_d.block_ids == [4, 5]  # the free list is LIFO: B's blocks come back first

# (host, device)
swap_in = torch.tensor(
    [[host, allocator.allocate()] for host in table_b_host.block_ids]
)
backend.swap_blocks(k_host, k_cache, swap_in)
backend.swap_blocks(v_host, v_cache, swap_in)
for host in table_b_host.block_ids:
    host_allocator.free(host)
# same tokens, new blocks
table_b = BlockTable(BLOCK_SIZE, swap_in[:, 1].tolist(), num_tokens=5)
tables["B"] = table_b
print("swap in (host, device): ", swap_in.tolist(), "-> B's table", table_b.block_ids)
print(pool_picture(k_cache, tables))

b_starts = torch.tensor([0, 5], dtype=torch.int32)
b_lens = torch.tensor([5], dtype=torch.int32)
out_b_again = backend.paged_attention(
    query[1:6],
    k_cache,
    v_cache,
    block_tables_tensor([table_b]),
    b_lens,
    b_starts,
    scale,
)
print(
    "B before vs after the round trip: "
    f"max |diff| = {(out_b_again - out_b).abs().max():.1e}"
)
assert table_b.block_ids == [9, 10]
torch.testing.assert_close(out_b_again, out_b, **tolerance(torch.float32))

# %% [markdown]
# ## What next
#
# - [Writing through the table](../../concepts/writing-through-the-table/) and [Reading
#   through the table](../../concepts/reading-through-the-table/) explain `write_kv` and
#   `paged_attention` with their OS analogies, and what paging costs.
# - `minipaged/reference/attention.py` holds the three attention functions of the oracle
#   chain; `tests/test_kernel_contract.py` holds every backend to them with random cases
#   (`minipaged.testing.random_paged_case`).
# - The Triton backend, `get_backend("triton")`, takes exactly these calls; the [kernel
#   pages](../../kernels/) show how it computes them, and the contract tests hold it to
#   the same oracle.
