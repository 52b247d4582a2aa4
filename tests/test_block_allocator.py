"""The block allocator (frame allocator): a free list plus a reference count per block."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipaged.reference.block_allocator import BlockAllocator, NoFreeBlocksError

pytestmark = pytest.mark.task1_2


@pytest.fixture
def allocator() -> BlockAllocator:
    return BlockAllocator(4, name="device")


def test_new_pool_is_all_free(allocator):
    assert (allocator.num_blocks, allocator.num_free, allocator.num_used) == (4, 4, 0)
    assert [allocator.ref_count(b) for b in range(4)] == [0, 0, 0, 0]


def test_allocate_hands_out_block_zero_first_then_in_order(allocator):
    assert [allocator.allocate() for _ in range(4)] == [0, 1, 2, 3]


def test_allocate_gives_ref_count_one(allocator):
    block = allocator.allocate()
    assert allocator.ref_count(block) == 1
    assert (allocator.num_free, allocator.num_used) == (3, 1)


def test_allocate_until_empty_then_raise(allocator):
    for _ in range(4):
        allocator.allocate()
    with pytest.raises(NoFreeBlocksError, match="device pool"):
        allocator.allocate()
    assert (allocator.num_free, allocator.num_used) == (0, 4)


def test_no_free_blocks_error_names_the_pool():
    host = BlockAllocator(1, name="host")
    host.allocate()
    with pytest.raises(NoFreeBlocksError, match="host pool"):
        host.allocate()


def test_no_free_blocks_error_is_not_a_value_error():
    # out of memory is a state of the pool, not a bad argument: callers catch the two apart
    assert not issubclass(NoFreeBlocksError, ValueError)


def test_empty_pool_is_allowed_and_cannot_allocate():
    empty = BlockAllocator(0, name="host")
    assert (empty.num_free, empty.num_used) == (0, 0)
    with pytest.raises(NoFreeBlocksError):
        empty.allocate()


def test_free_of_sole_holder_releases_the_block(allocator):
    block = allocator.allocate()
    assert allocator.free(block) == 0
    assert allocator.ref_count(block) == 0
    assert (allocator.num_free, allocator.num_used) == (4, 0)


def test_incref_shares_a_block_and_returns_the_new_count(allocator):
    block = allocator.allocate()
    assert allocator.incref(block) == 2
    assert allocator.incref(block) == 3
    assert allocator.ref_count(block) == 3
    assert allocator.num_used == 1  # sharing takes no extra block


def test_free_returns_refs_left_and_releases_only_at_zero(allocator):
    block = allocator.allocate()
    allocator.incref(block)
    allocator.incref(block)
    assert allocator.free(block) == 2
    assert allocator.free(block) == 1
    assert allocator.num_used == 1
    assert allocator.free(block) == 0
    assert allocator.num_used == 0


def test_released_block_is_reused():
    pool = BlockAllocator(2)
    first, second = pool.allocate(), pool.allocate()
    pool.free(second)
    assert pool.allocate() == second
    pool.free(first)
    assert pool.allocate() == first


def test_incref_of_a_free_block_raises(allocator):
    with pytest.raises(ValueError, match="block 2 of the device pool is free"):
        allocator.incref(2)
    assert allocator.ref_count(2) == 0


def test_double_free_raises(allocator):
    block = allocator.allocate()
    allocator.free(block)
    with pytest.raises(ValueError, match="double free"):
        allocator.free(block)
    assert allocator.num_free == 4


def test_free_of_never_allocated_block_raises(allocator):
    with pytest.raises(ValueError, match="double free"):
        allocator.free(3)


@pytest.mark.parametrize("method", ["free", "incref", "ref_count"])
@pytest.mark.parametrize("block", [-1, 4, 100, 1.0, "1", True, None])
def test_unknown_block_id_raises(allocator, method, block):
    allocator.allocate()
    # blocks 0 and 1 are held, so only the id's type or range can be wrong
    allocator.allocate()
    with pytest.raises(
        ValueError, match=r"block must be a block id in \[0, 4\) of the device pool"
    ):
        getattr(allocator, method)(block)
    assert [allocator.ref_count(b) for b in range(4)] == [1, 1, 0, 0]


@pytest.mark.parametrize("num_blocks", [-1, 2.5, "4", None])
def test_bad_num_blocks_rejected(num_blocks):
    with pytest.raises(ValueError, match="num_blocks must be a non-negative int"):
        BlockAllocator(num_blocks)


def test_free_plus_used_is_total_throughout(allocator):
    def check():
        assert allocator.num_free + allocator.num_used == allocator.num_blocks

    a, b = allocator.allocate(), allocator.allocate()
    check()
    allocator.incref(a)
    check()
    allocator.free(a)
    check()
    allocator.free(b)
    check()
    allocator.free(a)
    check()
    assert allocator.num_free == 4


def test_device_and_host_pools_are_independent():
    device, host = BlockAllocator(3, "device"), BlockAllocator(2, "host")
    assert device.allocate() == 0
    assert host.allocate() == 0  # the same id names a different block in another pool
    device.incref(0)
    assert (device.ref_count(0), host.ref_count(0)) == (2, 1)
    host.free(0)
    assert (device.num_used, host.num_used) == (1, 0)
    with pytest.raises(ValueError, match="host pool"):
        host.ref_count(2)  # a valid device id, but not a host id
    assert device.ref_count(2) == 0


def test_repr_names_the_pool_and_its_use():
    pool = BlockAllocator(4, "host")
    pool.allocate()
    assert "host" in repr(pool)
    assert "1 used / 4" in repr(pool)


# ---- property: the allocator behaves like a dict of reference counts --------------------------

NUM_BLOCKS = 5
ops = st.lists(
    st.tuples(
        st.sampled_from(["allocate", "incref", "free"]), st.integers(0, NUM_BLOCKS - 1)
    ),
    max_size=60,
)


@given(ops)
def test_allocator_matches_a_dict_of_ref_counts(operations):
    pool = BlockAllocator(NUM_BLOCKS)
    model = dict.fromkeys(range(NUM_BLOCKS), 0)  # block -> reference count
    for op, block in operations:
        if op == "allocate":
            if all(model.values()):
                with pytest.raises(NoFreeBlocksError):
                    pool.allocate()
            else:
                block = pool.allocate()
                assert model[block] == 0, "allocate handed out a block that is in use"
                model[block] = 1
        elif op == "incref":
            if model[block] == 0:
                with pytest.raises(ValueError):
                    pool.incref(block)
            else:
                model[block] += 1
                assert pool.incref(block) == model[block]
        else:
            if model[block] == 0:
                with pytest.raises(ValueError, match="double free"):
                    pool.free(block)
            else:
                model[block] -= 1
                assert pool.free(block) == model[block]
        assert {b: pool.ref_count(b) for b in model} == model
        assert pool.num_free == sum(count == 0 for count in model.values())
        assert pool.num_free + pool.num_used == NUM_BLOCKS


def test_free_hands_a_block_to_release_exactly_when_its_last_holder_lets_go():
    """Task 1.6 overrides `_release` to keep cached blocks: `free` must go through it, once per
    block whose count reaches 0, and never for a block someone still holds."""

    class Recording(BlockAllocator):
        def __init__(self, num_blocks: int) -> None:
            super().__init__(num_blocks)
            self.released: list[int] = []

        def _release(self, block: int) -> None:
            self.released.append(block)
            super()._release(block)

    allocator = Recording(6)
    shared, alone = allocator.allocate(), allocator.allocate()
    allocator.incref(shared)
    allocator.free(shared)
    assert allocator.released == []  # still held once
    allocator.free(alone)
    allocator.free(shared)
    assert allocator.released == [alone, shared]
    assert allocator.num_free == 6
