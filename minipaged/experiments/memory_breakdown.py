"""Where every slot of a KV pool is: the paper's Fig. 3 categories, one rule for every allocator.

OS idea: an operating system accounts for every physical frame (Linux's /proc/meminfo: in use by
processes, cached, free), and a memory allocator's quality is judged by how much of what it holds is
really used: internal and external fragmentation (OSTEP ch. 17). KV counterpart: vLLM paper section 3,
Fig. 2 and 3: the KV memory of a serving system is token states, slots reserved for future tokens,
internal fragmentation, and "external fragmentation & others". The contiguous allocators
(baselines.py), vAttention's large pages and vLLM's blocks (vattention.py) all report a
MemoryBreakdown, so that one simulator can compare them on one pool of slots.
"""

from __future__ import annotations

from dataclasses import dataclass

from minipaged.reference.memory_stats import PoolStats

BREAKDOWN_FIELDS = (
    "token_states",
    "reserved",
    "internal_fragmentation",
    "external_fragmentation",
    "stranded",
    "free",
)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Where every token slot of the pool is, in the words of the paper's Fig. 3. Fields sum to capacity.

    Attributes:
        token_states: slots holding a token's K/V ("KV cache states").
        reserved: slots reserved for tokens the request will still store ("reserved for future
            tokens"): used later, but held now while other requests could use them.
        internal_fragmentation: slots held that will never hold a token: past the most tokens the
            request stores (final_kv_len) in a contiguous range, or the unfilled tail of the last
            page or block.
        external_fragmentation: free slots while the head of the waiting queue waits for memory
            although, taken together, they would hold it: the free memory is cut into holes, none
            big enough (the OS sense). Only contiguous allocators have any: any free page or block
            serves any request.
        stranded: free slots while the head of the waiting queue waits for memory and they would
            not hold it even together (too few, or kept free by the admission watermark). With
            external_fragmentation, the paper's Fig. 2 category "external fragmentation & others":
            free memory that exists while a request waits for memory. The same rule for every
            allocator (see waiting_waste).
        free: the other free slots: free while nothing waits for memory.
    """

    token_states: int
    reserved: int
    internal_fragmentation: int
    external_fragmentation: int
    stranded: int
    free: int

    @property
    def capacity(self) -> int:
        return sum(getattr(self, name) for name in BREAKDOWN_FIELDS)

    @property
    def used(self) -> int:
        """Slots not free: held by requests, or free but lost while a request waits for memory."""
        return self.capacity - self.free

    @property
    def utilization(self) -> float:
        """token_states / used (1.0 when nothing is used): the share of the memory in use holding tokens."""
        return self.token_states / self.used if self.used else 1.0

    def fractions(self) -> dict[str, float]:
        """Each field as a fraction of the capacity."""
        return {name: getattr(self, name) / self.capacity for name in BREAKDOWN_FIELDS}

    @classmethod
    def from_pool_stats(
        cls, stats: PoolStats, block_size: int, waiting: bool = False
    ) -> MemoryBreakdown:
        """The breakdown of a paged pool: blocks are mapped on demand, so nothing is reserved ahead;
        `waiting`: whether the head of the waiting queue waits for memory (its free blocks are stranded)."""
        _, stranded, free = waiting_waste(
            stats.num_free * block_size, waiting, fits_in_total=False
        )
        return cls(stats.slots_used, 0, stats.internal_waste, 0, stranded, free)


def waiting_waste(
    free: int, waiting: bool, fits_in_total: bool
) -> tuple[int, int, int]:
    """Split `free` slots into (external_fragmentation, stranded, free): one rule for every allocator.

    While nothing waits for memory, free slots are free. While the head of the waiting queue waits
    for memory (`waiting`: the allocator refuses to admit it now), every free slot is waste: external
    fragmentation if the free slots together would hold the head (`fits_in_total`: only holes stop it,
    which only a contiguous allocator has), stranded otherwise (too few, or a watermark keeps them).
    """
    if not waiting:
        return 0, 0, free
    return (free, 0, 0) if fits_in_total else (0, free, 0)


def final_kv_len(prompt_len: int, output_len: int) -> int:
    """The most tokens a request's KV cache ever holds: prompt_len + output_len - 1.

    The last generated token ends the request as soon as it is sampled; no later step runs it through
    the model, so its K and V are never stored (the paged side counts the same: experiments/paged_driver.py).
    """
    return prompt_len + output_len - 1


__all__ = ["BREAKDOWN_FIELDS", "MemoryBreakdown", "final_kv_len", "waiting_waste"]
