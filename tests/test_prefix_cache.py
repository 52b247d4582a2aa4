"""Prefix caching (the page cache): chained block hashes, cached-free blocks and LRU eviction."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minipaged.reference.block_allocator import NoFreeBlocksError
from minipaged.reference.block_manager import BlockManager
from minipaged.reference.prefix_cache import (
    ROOT_HASH,
    PrefixCachingBlockAllocator,
    hash_block_tokens,
    hash_full_blocks,
)
from minipaged.sequence import Sequence, SequenceGroup

pytestmark = pytest.mark.task1_6

REPO_ROOT = Path(__file__).resolve().parents[1]


def held_and_named(pool: PrefixCachingBlockAllocator, names: list[str]) -> list[int]:
    """Allocate one block per name and publish it in the cache under that name."""
    blocks = [pool.allocate() for _ in names]
    for block, name in zip(blocks, names, strict=True):
        assert pool.register(block, name)
    return blocks


# ---- hashing ---------------------------------------------------------------------------------


def test_hash_is_deterministic_hex():
    first = hash_block_tokens(ROOT_HASH, [11, 12, 13, 14])
    assert first == hash_block_tokens(ROOT_HASH, (11, 12, 13, 14))
    assert isinstance(first, str)
    int(first, 16)  # a hex digest


@pytest.mark.parametrize("hash_seed", ["0", "12345"])
def test_hash_is_the_same_in_another_process(hash_seed):
    parent = hash_block_tokens(ROOT_HASH, [11, 12, 13, 14])
    code = (
        "from minipaged.reference.prefix_cache import hash_block_tokens;"
        f"print(hash_block_tokens({parent!r}, [15, 16, 17, 18]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert result.stdout.strip() == hash_block_tokens(parent, [15, 16, 17, 18])


def test_hash_depends_on_the_tokens_and_their_order():
    assert hash_block_tokens(ROOT_HASH, [11, 12]) != hash_block_tokens(
        ROOT_HASH, [11, 13]
    )
    assert hash_block_tokens(ROOT_HASH, [11, 12]) != hash_block_tokens(
        ROOT_HASH, [12, 11]
    )


def test_hash_has_no_ambiguity_between_token_boundaries():
    assert hash_block_tokens(ROOT_HASH, [1, 23]) != hash_block_tokens(
        ROOT_HASH, [12, 3]
    )


def test_hash_is_chained_through_the_parent():
    parent_a = hash_block_tokens(ROOT_HASH, [11, 12])
    parent_b = hash_block_tokens(ROOT_HASH, [21, 22])
    assert hash_block_tokens(parent_a, [31, 32]) != hash_block_tokens(
        parent_b, [31, 32]
    )
    assert hash_block_tokens(parent_a, [31, 32]) != hash_block_tokens(
        ROOT_HASH, [31, 32]
    )


def test_hash_full_blocks_chains_every_full_block():
    tokens = [11, 12, 13, 14, 15, 16, 17, 18]
    first = hash_block_tokens(ROOT_HASH, [11, 12, 13, 14])
    assert hash_full_blocks(tokens, 4) == [
        first,
        hash_block_tokens(first, [15, 16, 17, 18]),
    ]


def test_hash_full_blocks_ignores_a_partial_last_block():
    full = hash_full_blocks([11, 12, 13, 14, 15, 16, 17, 18], 4)
    assert hash_full_blocks([11, 12, 13, 14, 15, 16, 17, 18, 19, 20], 4) == full
    assert hash_full_blocks([11, 12, 13], 4) == []


def test_hash_full_blocks_continues_from_a_parent():
    whole = hash_full_blocks([11, 12, 13, 14, 15, 16, 17, 18], 4)
    assert hash_full_blocks([15, 16, 17, 18], 4, parent_hash=whole[0]) == whole[1:]


# ---- the caching allocator -------------------------------------------------------------------


@pytest.fixture
def pool() -> PrefixCachingBlockAllocator:
    return PrefixCachingBlockAllocator(4)


def test_register_then_lookup(pool):
    (block,) = held_and_named(pool, ["h0"])
    assert pool.lookup("h0") == block
    assert pool.block_hash(block) == "h0"
    assert pool.num_cached == 1
    assert pool.lookup("other") is None


def test_register_of_a_free_block_raises(pool):
    with pytest.raises(ValueError, match="block 2 is not held"):
        pool.register(2, "h0")
    assert pool.lookup("h0") is None


def test_register_of_a_name_already_used_keeps_the_first(pool):
    (first,) = held_and_named(pool, ["h0"])
    second = pool.allocate()
    assert pool.register(second, "h0") is False
    assert pool.lookup("h0") == first
    assert pool.block_hash(second) is None
    # registering the same pair again is harmless
    assert pool.register(first, "h0") is True


def test_register_of_a_block_under_a_second_name_raises(pool):
    (block,) = held_and_named(pool, ["h0"])
    with pytest.raises(ValueError, match="already cached"):
        pool.register(block, "h1")


def test_match_prefix_takes_a_reference_on_held_blocks(pool):
    blocks = held_and_named(pool, ["h0", "h1"])
    assert pool.match_prefix(["h0", "h1"]) == blocks
    assert [pool.ref_count(b) for b in blocks] == [2, 2]
    assert pool.num_used == 2


def test_match_prefix_stops_at_the_first_miss(pool):
    b0, _, b2 = held_and_named(pool, ["h0", "h1", "h2"])
    assert pool.match_prefix(["h0", "missing", "h2"]) == [b0]
    assert pool.ref_count(b0) == 2
    assert pool.ref_count(b2) == 1  # cached, but after the break in the chain


def test_match_prefix_counts_hits_and_misses(pool):
    held_and_named(pool, ["h0", "h1"])
    pool.match_prefix(["h0", "h1", "h2", "h3"])
    assert (pool.hits, pool.misses) == (2, 2)
    pool.match_prefix(["x0", "h1"])
    assert (pool.hits, pool.misses) == (2, 4)


def test_match_prefix_of_nothing_cached_is_empty(pool):
    assert pool.match_prefix(["h0", "h1"]) == []
    assert pool.num_used == 0


def test_cached_block_released_stays_cached_free(pool):
    (block,) = held_and_named(pool, ["h0"])
    assert pool.free(block) == 0
    assert pool.is_cached_free(block)
    assert pool.num_cached_free == 1
    assert pool.lookup("h0") == block  # its K/V are still there
    assert pool.num_free == 4  # cached-free blocks can still be handed out
    assert pool.num_free + pool.num_used == pool.num_blocks


def test_match_prefix_revives_a_cached_free_block(pool):
    (block,) = held_and_named(pool, ["h0"])
    pool.free(block)
    assert pool.match_prefix(["h0"]) == [block]
    assert pool.ref_count(block) == 1
    assert not pool.is_cached_free(block)
    assert pool.num_cached_free == 0
    assert pool.num_used == 1


def test_uncached_block_goes_back_to_the_free_list(pool):
    block = pool.allocate()
    pool.free(block)
    assert not pool.is_cached_free(block)
    assert pool.num_cached_free == 0
    assert pool.allocate() == block
    assert pool.evictions == 0


def test_allocate_prefers_the_free_list_over_cached_free_blocks():
    pool = PrefixCachingBlockAllocator(3)
    (cached,) = held_and_named(pool, ["h0"])
    pool.free(cached)
    assert {pool.allocate(), pool.allocate()} == {1, 2}
    assert pool.lookup("h0") == cached
    assert pool.evictions == 0


def test_allocate_evicts_the_least_recently_used_cached_free_block():
    pool = PrefixCachingBlockAllocator(3)
    b0, b1, b2 = held_and_named(pool, ["h0", "h1", "h2"])
    for block in (b1, b0, b2):  # released in this order: b1 is the least recently used
        pool.free(block)
    assert pool.allocate() == b1
    assert pool.lookup("h1") is None
    assert pool.block_hash(b1) is None
    assert pool.evictions == 1
    assert pool.num_cached_free == 2
    assert [pool.allocate(), pool.allocate()] == [b0, b2]
    assert pool.evictions == 3
    assert pool.num_cached == 0


def test_evicted_block_comes_back_uncached_with_ref_count_one():
    pool = PrefixCachingBlockAllocator(1)
    (block,) = held_and_named(pool, ["h0"])
    pool.free(block)
    assert pool.allocate() == block
    assert pool.ref_count(block) == 1
    pool.free(block)
    assert not pool.is_cached_free(block)  # it holds new content, which nobody named
    assert pool.match_prefix(["h0"]) == []


def test_a_revived_block_becomes_most_recently_used():
    pool = PrefixCachingBlockAllocator(3)
    b0, b1, b2 = held_and_named(pool, ["h0", "h1", "h2"])
    for block in (b0, b1, b2):
        pool.free(block)
    pool.match_prefix(["h0"])
    pool.free(b0)  # b0 was used again: it now goes last
    assert [pool.allocate() for _ in range(3)] == [b1, b2, b0]


def test_allocate_raises_when_every_block_is_held(pool):
    held_and_named(pool, ["h0", "h1"])
    pool.allocate()
    pool.allocate()
    with pytest.raises(NoFreeBlocksError, match="device pool"):
        pool.allocate()


def test_count_prefix_has_no_side_effect(pool):
    b0, b1, _ = held_and_named(pool, ["h0", "h1", "h2"])
    pool.free(b1)
    before = (
        [pool.ref_count(b) for b in range(4)],
        pool.num_cached_free,
        pool.hits,
        pool.misses,
    )
    assert pool.count_prefix(["h0", "h1", "missing", "h2"]) == (2, 1)
    assert pool.count_prefix(["h0", "h1", "missing", "h2"]) == (2, 1)
    after = (
        [pool.ref_count(b) for b in range(4)],
        pool.num_cached_free,
        pool.hits,
        pool.misses,
    )
    assert before == after
    assert pool.is_cached_free(b1)
    assert pool.ref_count(b0) == 1


# ---- through the block manager ---------------------------------------------------------------

BS = 4
PROMPT = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]  # two full blocks and a partial one


def group(tokens: list[int], request_id: str) -> tuple[SequenceGroup, Sequence]:
    seq = Sequence(prompt_token_ids=list(tokens))
    return SequenceGroup(request_id, [seq]), seq


def test_manager_second_prompt_reuses_the_shared_full_blocks():
    manager = BlockManager(BS, 16, enable_prefix_caching=True)
    first_group, first = group(PROMPT, "a")
    assert manager.allocate(first_group) == 0
    first_blocks = list(manager.get_block_table(first).block_ids)
    manager.free(first)
    second_group, second = group([*PROMPT[:8], 31, 32, 33], "b")
    assert manager.allocate(second_group) == 2 * BS
    assert manager.get_block_table(second).block_ids[:2] == first_blocks[:2]
    stats = manager.memory_stats()
    # b: 2 hits; a: 2 misses
    assert (stats.prefix_cache_hits, stats.prefix_cache_misses) == (2, 2)


def test_manager_running_prompt_shares_its_full_blocks_with_a_new_request():
    manager = BlockManager(BS, 16, enable_prefix_caching=True)
    first_group, first = group(PROMPT, "a")
    manager.allocate(first_group)
    second_group, second = group(PROMPT[:9], "b")
    assert manager.allocate(second_group) == 2 * BS
    first_ids = manager.get_block_table(first).block_ids
    second_ids = manager.get_block_table(second).block_ids
    assert second_ids[:2] == first_ids[:2]
    assert [manager.device.ref_count(b) for b in first_ids[:2]] == [2, 2]


def test_manager_never_shares_a_partial_last_block_through_the_cache():
    manager = BlockManager(BS, 16, enable_prefix_caching=True)
    first_group, first = group(PROMPT[:6], "a")  # one full block, one half full
    manager.allocate(first_group)
    # the very same prompt, another request
    second_group, second = group(PROMPT[:6], "b")
    assert manager.allocate(second_group) == BS
    first_ids = manager.get_block_table(first).block_ids
    second_ids = manager.get_block_table(second).block_ids
    assert second_ids[0] == first_ids[0]
    assert second_ids[1] != first_ids[1]
    assert manager.device.ref_count(first_ids[1]) == 1


def test_manager_freed_prompt_leaves_its_full_blocks_cached_free():
    manager = BlockManager(BS, 16, enable_prefix_caching=True)
    first_group, first = group(PROMPT, "a")
    manager.allocate(first_group)
    manager.free(first)
    stats = manager.memory_stats().device
    assert (stats.num_cached_free, stats.num_free, stats.num_used) == (2, 16, 0)


@pytest.mark.parametrize("finish_first", [False, True])
def test_manager_without_prefix_caching_never_shares_across_requests(finish_first):
    manager = BlockManager(BS, 16, enable_prefix_caching=False)
    first_group, first = group(PROMPT, "a")
    manager.allocate(first_group)
    first_ids = set(manager.get_block_table(first).block_ids)
    if finish_first:
        manager.free(first)
    second_group, second = group(PROMPT, "b")
    assert manager.allocate(second_group) == 0
    second_ids = manager.get_block_table(second).block_ids
    assert all(manager.device.ref_count(b) == 1 for b in second_ids)
    if not finish_first:
        assert first_ids.isdisjoint(second_ids)
    stats = manager.memory_stats()
    assert (
        stats.prefix_cache_hits,
        stats.prefix_cache_misses,
        stats.device.num_cached_free,
    ) == (0, 0, 0)


@pytest.mark.task1_6
def test_manager_prompt_cached_whole_still_computes_its_last_block():
    manager = BlockManager(BS, 16, enable_prefix_caching=True)
    first_group, first = group(PROMPT[:8], "a")  # exactly two full blocks
    manager.allocate(first_group)
    first_blocks = list(manager.get_block_table(first).block_ids)
    manager.free(first)
    second_group, second = group(PROMPT[:8], "b")
    assert manager.allocate(second_group) == BS, (
        "the block with the last token is computed again"
    )
    blocks = manager.get_block_table(second).block_ids
    assert blocks[0] == first_blocks[0] and blocks[1] != first_blocks[1]
