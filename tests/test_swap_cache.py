"""Swapping meets the prefix cache (task 1.7): Linux's swap cache, and publishing on swap-in.

A page swapped out may still sit in the page cache; swapping it in then maps it again instead of
reading it from disk. The same holds for a KV block that the prefix cache still holds on the
device. And a block brought back from the host is a full block like any other: it is published,
so later prompts can hit it. These tests need task 1.6 (the prefix cache) done, as task 1.7 does.
"""

from __future__ import annotations

import random

import pytest

from minipaged.reference.block_manager import BlockManager
from minipaged.sequence import Sequence, SequenceGroup

BS = 4
PROMPT = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]  # two full blocks and a partial one


def group(tokens: list[int], request_id: str) -> tuple[SequenceGroup, Sequence]:
    seq = Sequence(prompt_token_ids=list(tokens))
    return SequenceGroup(request_id, [seq]), seq


@pytest.mark.task1_7
def test_swap_in_maps_blocks_still_in_the_prefix_cache_instead_of_transferring_them():
    manager = BlockManager(BS, 16, num_cpu_blocks=8, enable_prefix_caching=True)
    keep_group, keep = group(PROMPT, "keeps the prefix on the device")
    manager.allocate(keep_group)
    swap_group, swapped = group([*PROMPT[:8], 41, 42], "swapped")
    manager.allocate(swap_group)
    # [shared, shared, own partial]
    device_blocks = list(manager.get_block_table(swapped).block_ids)
    out = manager.swap_out(swap_group)
    host_of = dict(out)
    mapping = manager.swap_in(swap_group)
    assert mapping == [(host_of[device_blocks[2]], mapping[0][1])], (
        "only the partial block is transferred"
    )
    table = manager.get_block_table(swapped)
    assert table.block_ids[:2] == manager.get_block_table(keep).block_ids[:2], (
        "the prefix is shared again"
    )
    assert manager.device.ref_count(table.block_ids[0]) == 2
    assert manager.memory_stats().blocks_swapped_in == 1 and manager.host.num_used == 0


@pytest.mark.task1_7
def test_swap_out_frees_the_tail_first_so_the_cache_keeps_the_prompt_head():
    """Found by running vLLM's tests against minipaged: swap_out must give the device blocks back as
    free() does, last first. A 32-token prompt (8 blocks of 4) fills the pool and is swapped out; a
    16-token prompt then takes 4 blocks, evicting the 4 least recently freed: the tail's. So the first
    4 blocks of the swapped prompt are still found in the cache (head first, none would be)."""
    manager = BlockManager(4, 8, num_cpu_blocks=8, enable_prefix_caching=True)
    swapped_group, swapped = group(list(range(100, 132)), "swapped")
    manager.allocate(swapped_group)
    manager.swap_out(swapped_group)
    other_group, _ = group(list(range(200, 216)), "other")
    manager.allocate(other_group)
    hashes = manager._hashes_of(swapped)
    # 4 leading blocks found, all cached-free
    assert manager.device.count_prefix(hashes) == (4, 4)


@pytest.mark.task1_7
def test_swap_in_publishes_the_returning_blocks_to_the_prefix_cache():
    """Issue 15, defect 5: the blocks a group brings back from the host are new device blocks; they
    must be published, so that a later request with the same prompt finds them. Another request
    evicts the swapped prompt's cached copies first, so nothing of it is left on the device."""
    manager = BlockManager(4, 8, num_cpu_blocks=8, enable_prefix_caching=True)
    prompt = random.sample(range(1000, 2000), 17)  # 4 full blocks and one token
    swapped_group, swapped = group(prompt, "swapped")
    manager.allocate(swapped_group)
    manager.swap_out(swapped_group)
    filler_group, filler = group(random.sample(range(3000, 4000), 32), "filler")
    manager.allocate(filler_group)  # every device block, the cached-free ones included
    hashes = manager._hashes_of(swapped)
    assert manager.device.count_prefix(hashes) == (0, 0), "evicted from the cache"
    manager.free(filler)
    mapping = manager.swap_in(swapped_group)
    assert len(mapping) == 5  # every block transferred
    table = manager.get_block_table(swapped).block_ids
    late_group, late = group([*prompt[:16], 7], "late")
    assert manager.allocate(late_group) == 16, (
        "the late prompt hits the swapped-in blocks"
    )
    assert manager.get_block_table(late).block_ids[:4] == table[:4]
