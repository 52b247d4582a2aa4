"""Copy-on-write with a real tensor pool: forked sequences that diverge keep each other's K/V intact.

The block manager only returns (src, dst) pairs; this test plays the engine's part with plain torch
indexing (the kernel contract's write_kv / copy_blocks do the same work): write each token's K/V at
its slot, copy the blocks append_slots names before writing, and read every sequence back through
its own block table.
"""

from __future__ import annotations

import pytest
import torch

from minipaged.reference.block_manager import BlockManager
from minipaged.sequence import Sequence, SequenceGroup

BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 4, 2, 8


def kv_of(token_ids: list[int], salt: int) -> torch.Tensor:
    """Deterministic random K (or V) for tokens; `salt` makes each sequence's rows its own."""
    gen = torch.Generator().manual_seed(salt)
    # [num_tokens, heads, dim]
    rows = torch.randn(len(token_ids), NUM_KV_HEADS, HEAD_DIM, generator=gen)
    return rows + torch.tensor(token_ids, dtype=torch.float32)[:, None, None]


class Pool:
    """One layer's K cache `[num_blocks, block_size, num_kv_heads, head_dim]`, poisoned with NaN."""

    def __init__(self, num_blocks: int) -> None:
        self.k_cache = torch.full(
            (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM), float("nan")
        )

    def write(self, slots: list[int], rows: torch.Tensor) -> None:
        # slot = token row
        self.k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[torch.tensor(slots)] = rows

    def copy_blocks(self, mapping: list[tuple[int, int]]) -> None:
        for src, dst in mapping:
            self.k_cache[dst] = self.k_cache[src]

    def read(self, block_ids: list[int], num_tokens: int) -> torch.Tensor:
        # [num_blocks_of_seq, block_size, heads, dim]
        rows = self.k_cache[torch.tensor(block_ids)]
        # [num_tokens, heads, dim]: drop the unused tail
        return rows.flatten(0, 1)[:num_tokens]


@pytest.mark.task1_5
# last block partly filled, full, partly filled
@pytest.mark.parametrize("prompt_len", [5, 8, 10])
def test_forked_sequences_diverge_without_touching_each_other(prompt_len):
    manager = BlockManager(BLOCK_SIZE, num_gpu_blocks=16, watermark=0.0)
    pool = Pool(16)
    parent = Sequence(list(range(11, 11 + prompt_len)))
    group = SequenceGroup("r0", [parent])
    manager.allocate(group)
    table = manager.get_block_table(parent)
    prompt_kv = kv_of(parent.token_ids, salt=0)
    pool.write(table.slot_mapping(prompt_len), prompt_kv)

    child = parent.fork()
    manager.fork(parent, child)
    group.add(child)
    expected = {parent.seq_id: [prompt_kv], child.seq_id: [prompt_kv]}

    copies = 0
    # each writes a different token, alternately, across a block boundary
    for step in range(6):
        for seq, token in ((parent, 50 + step), (child, 70 + step)):
            seq.append_token_id(token)
            cow = manager.append_slots(seq)
            copies += len(cow)
            pool.copy_blocks(cow)  # the engine copies before the model step writes
            new_kv = kv_of([token], salt=seq.seq_id * 100 + step)
            pool.write(manager.get_block_table(seq).slot_mapping(1), new_kv)
            expected[seq.seq_id].append(new_kv)

    for seq in (parent, child):
        table = manager.get_block_table(seq)
        got = pool.read(table.block_ids, len(seq))
        torch.testing.assert_close(got, torch.cat(expected[seq.seq_id]), rtol=0, atol=0)

    parent_blocks = manager.get_block_table(parent).block_ids
    child_blocks = manager.get_block_table(child).block_ids
    shared = set(parent_blocks) & set(child_blocks)
    assert shared == set(parent_blocks[: prompt_len // BLOCK_SIZE]), (
        "only the full prompt blocks stay shared"
    )
    assert copies == (1 if prompt_len % BLOCK_SIZE else 0), (
        "one copy-on-write for a partly filled last block"
    )
