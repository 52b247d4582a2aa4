"""Writing and moving KV blocks: write_kv, copy_blocks, swap_blocks.

OS idea: once the page table is set up, the hardware translates each store's virtual address to a
physical one, and the kernel moves whole pages when it must: it copies a shared page on the first
write (copy-on-write) and pages out to swap space under pressure (OSTEP ch. 18-21, 23). KV counterpart:
vLLM paper sections 4.2-4.5 and 5.1. Every model step *writes through the table*: the new tokens' keys
and values go to the slots that the slot mapping names (vLLM's reshape_and_cache). The block manager
decides which blocks to copy and swap; these functions do the tensor work for its decisions.

The pool layout (one pool per layer, a block is a page of token rows):

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot = block_table[pos // block_size] * block_size + pos % block_size

so slot s is row `s % block_size` of block `s // block_size`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from minipaged.reference.validation import (
    check_copy_blocks,
    check_swap_blocks,
    check_write_kv,
)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store each token's key and value at its slot of the pool; slot -1 means skip (padding).

    This is the "store" half of address translation: the engine computed each token's slot from its
    block table (BlockTable.slot_mapping); here token i's K/V row lands in block
    `slot_mapping[i] // block_size`, at offset `slot_mapping[i] % block_size`. No other slot changes.
    key and value may be non-contiguous views (e.g. slices of a fused qkv projection).

    Args:
        key: `[num_tokens, num_kv_heads, head_dim]`, the step's new keys.
        value: `[num_tokens, num_kv_heads, head_dim]`, the step's new values.
        k_cache: `[num_blocks, block_size, num_kv_heads, head_dim]`, written in place.
        v_cache: the same shape, written in place.
        slot_mapping: `[num_tokens]` int64, a slot in `[0, num_blocks * block_size)` or -1.

    Raises:
        ValueError: if an argument has the wrong shape, dtype or device, a slot is outside the pool,
            or a slot is named twice.
    """
    check_write_kv(key, value, k_cache, v_cache, slot_mapping)
    # BEGIN SOLUTION 2.1
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0  # [num_tokens] bool: False for padding
    slots = slot_mapping[keep]  # [num_written]
    # physical block, row inside it
    block_ids, offsets = slots // block_size, slots % block_size
    # [num_written, num_kv_heads, head_dim] into their rows
    k_cache[block_ids, offsets] = key[keep]
    v_cache[block_ids, offsets] = value[keep]
    # END SOLUTION


def copy_blocks(
    k_caches: Sequence[torch.Tensor],
    v_caches: Sequence[torch.Tensor],
    block_mapping: torch.Tensor,
) -> None:
    """Copy whole blocks, src -> dst, in every layer at once: the tensor side of copy-on-write.

    BlockManager.append_slots returns the (src, dst) pairs: a shared block was about to be written,
    so the writer got a fresh block that must first receive the old block's contents. A block id names
    the same page in every layer, so one mapping serves all layers (the paper's fused block copy,
    section 5.1, does every pair of every layer in one kernel launch).

    Args:
        k_caches: one `[num_blocks, block_size, num_kv_heads, head_dim]` pool per layer.
        v_caches: the value pools, one per layer, shaped like the key pools.
        block_mapping: `[n, 2]` int64 (src, dst) block ids on the pools' device; each dst appears
            once and is never a src.

    Raises:
        ValueError: if the lists are empty or of different lengths, the layers disagree on the
            number of blocks or the device, or block_mapping is malformed.
    """
    check_copy_blocks(k_caches, v_caches, block_mapping)
    # BEGIN SOLUTION 2.4
    src, dst = block_mapping[:, 0], block_mapping[:, 1]  # [n] each
    for k_cache, v_cache in zip(k_caches, v_caches, strict=True):
        # [n, block_size, num_kv_heads, head_dim]: whole pages
        k_cache[dst] = k_cache[src]
        v_cache[dst] = v_cache[src]
    # END SOLUTION


def swap_blocks(
    src: torch.Tensor, dst: torch.Tensor, block_mapping: torch.Tensor
) -> None:
    """Move whole blocks between two pools that may sit on different devices (swap out or in).

    Swapping out copies a preempted sequence's blocks from the device pool to the host pool; swapping
    in copies them back (BlockManager.swap_out / swap_in return the pairs). The two pools usually
    differ in size. Call it once per layer and per K and V pool.

    Args:
        src: `[num_src_blocks, block_size, num_kv_heads, head_dim]`, read.
        dst: `[num_dst_blocks, block_size, num_kv_heads, head_dim]`, written in place; same dtype and
            block shape as src.
        block_mapping: `[n, 2]` int64 (src block id, dst block id), on the CPU (like vLLM's, it is
            host-side bookkeeping); each dst appears once.

    Raises:
        ValueError: if a pool is malformed, the pools disagree in dtype or block shape, or
            block_mapping is malformed.
    """
    check_swap_blocks(src, dst, block_mapping)
    # BEGIN SOLUTION 2.4
    src_ids = block_mapping[:, 0].to(src.device)  # [n]
    dst_ids = block_mapping[:, 1].to(dst.device)  # [n]
    dst[dst_ids] = src[src_ids].to(dst.device)  # one gather, one transfer, one scatter
    # END SOLUTION
