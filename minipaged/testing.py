"""Random paged-attention cases for testing any backend against the dense oracle.

A `PagedCase` holds the same keys and values twice: scattered through random block tables into
paged pools (what a backend reads), and laid out contiguously per sequence (what the oracle,
`dense_attention`, reads). Every slot that no sequence covers is poisoned with NaN, +inf and -inf,
so a backend that reads past a sequence's seq_len, or into a block its table does not name, returns
non-finite numbers and fails. The contract tests in tests/test_kernel_contract.py use this module,
and so can course assignments or a new backend's tests:

    >>> case = random_paged_case(torch.Generator().manual_seed(0), seq_lens=[5, 9], q_lens=[1, 9])
    >>> out = get_backend("reference").paged_attention(*case.args)
    >>> torch.testing.assert_close(out, case.expected(), **tolerance(case.dtype))

Where a backend's tensors go is `device_for(name)`: the Triton backend needs CUDA tensors on a
machine with a GPU (compiled) and CPU tensors only through Triton's interpreter.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minipaged.backend import available_backends, get_backend
from minipaged.reference.attention import dense_attention
from minipaged.reference.block_table import BlockTable

__all__ = [
    "PagedCase",
    "available_backends",
    "device_for",
    "get_backend",
    "interpreted",
    "poison_pattern",
    "random_paged_case",
    "tolerance",
]


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """assert_close tolerances for an output of `dtype`: 1e-5 for fp32, about 1e-2 relative for fp16/bf16."""
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-5}
    if dtype == torch.float16:
        return {"rtol": 1e-2, "atol": 2e-3}
    if dtype == torch.bfloat16:
        return {"rtol": 2e-2, "atol": 1e-2}
    raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")


def device_for(backend: str) -> torch.device:
    """The device a test puts `backend`'s tensors on.

    The reference runs anywhere: the CPU. The Triton backend runs compiled on CUDA tensors, and on
    CPU tensors only through Triton's interpreter (TRITON_INTERPRET=1, which `import minipaged` sets
    where there is no GPU). So: "cuda" where a GPU is present and the interpreter is off, else the CPU.
    """
    if (
        backend == "triton"
        and torch.cuda.is_available()
        and os.environ.get("TRITON_INTERPRET") != "1"
    ):
        return torch.device("cuda")
    return torch.device("cpu")


def interpreted(backend: str) -> bool:
    """Does `backend` run through Triton's interpreter here (thousands of times slower than compiled)?

    Tests shorten their sequences when it does, and run the full lengths otherwise.
    """
    return backend == "triton" and device_for(backend).type == "cpu"


def poison_pattern(num: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """`[num]` float32 cycling NaN, +inf, -inf: the values written into every slot nobody should read."""
    values = torch.tensor([math.nan, math.inf, -math.inf], device=device)
    return values[torch.arange(num, device=device) % 3]


@dataclass
class PagedCase:
    """One paged-attention call's inputs, plus the contiguous K/V that the oracle reads."""

    query: torch.Tensor  # [num_q_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padding -1
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    scale: float
    # per sequence: [seq_len, num_kv_heads, head_dim], position order
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def args(self) -> tuple:
        """The positional arguments of paged_attention, in the contract's order."""
        return (
            self.query,
            self.k_cache,
            self.v_cache,
            self.block_tables,
            self.seq_lens,
            self.query_start_loc,
            self.scale,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.query.dtype

    def expected(self) -> torch.Tensor:
        """The oracle's answer: dense SDPA over the contiguous K/V."""
        return dense_attention(
            self.query, self.keys, self.values, self.query_start_loc, self.scale
        )


def random_paged_case(
    gen: torch.Generator,
    seq_lens: Sequence[int],
    q_lens: Sequence[int],
    *,
    num_heads: int = 8,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    block_size: int = 8,
    dtype: torch.dtype = torch.float32,
    repeat_blocks: bool = True,
    device: str | torch.device = "cpu",
) -> PagedCase:
    """A random case: random tables (blocks may repeat), random K/V and queries, stale slots poisoned.

    Args:
        gen: the random generator (CPU); seed it for a reproducible case.
        seq_lens: tokens per sequence (>= 1).
        q_lens: query rows per sequence, each in [0, seq_len]: 1 for decode, seq_len for prefill.
        num_heads: query heads.
        num_kv_heads: KV heads; num_heads must be a multiple of it.
        head_dim: elements per head.
        block_size: tokens per block.
        dtype: the dtype of the caches and the query.
        repeat_blocks: draw table entries with replacement, so a block may appear in several tables
            or twice in one (shared data); otherwise every table entry is a distinct block.
        device: where the tensors are put.

    Raises:
        ValueError: if seq_lens is empty, seq_lens and q_lens differ in length, or a q_len is outside
            [0, seq_len].
    """
    if (
        not seq_lens
        or len(seq_lens) != len(q_lens)
        or any(not 0 <= q <= s or s < 1 for s, q in zip(seq_lens, q_lens, strict=False))
    ):
        raise ValueError(
            f"need sequences with 0 <= q_len <= seq_len and seq_len >= 1, got {seq_lens}, {q_lens}"
        )
    needed = [math.ceil(n / block_size) for n in seq_lens]
    max_blocks = max(needed) + 1  # one column of -1 padding at least
    num_blocks = sum(needed) + 3  # some blocks that no table names
    if repeat_blocks:
        ids = [torch.randint(num_blocks, (n,), generator=gen).tolist() for n in needed]
    else:
        perm = torch.randperm(num_blocks, generator=gen).tolist()
        ids = [perm[sum(needed[:b]) : sum(needed[: b + 1])] for b in range(len(needed))]
    tables = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    for b, row in enumerate(ids):
        tables[b, : len(row)] = torch.tensor(row, dtype=torch.int32)

    # Poison every slot, then give random values to the slots some sequence covers.
    num_slots = num_blocks * block_size
    pools = []
    for _ in range(2):  # K, then V
        pool = (
            poison_pattern(num_slots)[:, None, None]
            .expand(num_slots, num_kv_heads, head_dim)
            .clone()
        )
        pools.append(pool)  # [num_slots, num_kv_heads, head_dim], float32 for now
    slots_of = [
        torch.tensor(
            [row[pos // block_size] * block_size + pos % block_size for pos in range(n)]
        )
        for row, n in zip(ids, seq_lens, strict=True)
    ]
    covered = torch.cat(slots_of).unique()
    for pool in pools:
        pool[covered] = torch.randn(len(covered), num_kv_heads, head_dim, generator=gen)
    # [num_slots, num_kv_heads, head_dim]
    k_flat, v_flat = (pool.to(dtype) for pool in pools)
    # read back by position: the oracle's K
    keys = [k_flat[slots].to(device) for slots in slots_of]
    values = [v_flat[slots].to(device) for slots in slots_of]

    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    starts = torch.tensor(
        [0, *torch.tensor(list(q_lens)).cumsum(0).tolist()], dtype=torch.int32
    )
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return PagedCase(
        query=query.to(device),
        k_cache=k_flat.view(shape).to(device),
        v_cache=v_flat.view(shape).to(device),
        block_tables=tables.to(device),
        seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32, device=device),
        query_start_loc=starts.to(device),
        scale=head_dim**-0.5,
        keys=keys,
        values=values,
    )


def slot_of(table: BlockTable, pos: int) -> int:
    """The slot of token `pos` of `table`, by the page-table formula, not by `table.slot`.

    Assignment 2's tests use this instead of BlockTable's methods, which are task 1.1: a student
    can do Assignment 2 before Assignment 1 is finished.
    """
    block_size = table.block_size
    return table.block_ids[pos // block_size] * block_size + pos % block_size


def last_slots(table: BlockTable, num: int) -> list[int]:
    """The slots of the table's last `num` tokens (what `table.slot_mapping(num)` returns)."""
    return [
        slot_of(table, pos) for pos in range(table.num_tokens - num, table.num_tokens)
    ]
