"""The reference attention's own pieces: gather_kv, attend, and the blockwise (online-softmax) version.

The contract tests (test_kernel_contract.py) hold paged_attention to the dense oracle on every
backend; these tests look inside the reference, at the steps a student writes in tasks 2.2 and 2.3.
"""

from __future__ import annotations

import math

import pytest
import torch

from minipaged.reference.attention import (
    attend,
    dense_attention,
    gather_kv,
    paged_attention,
    paged_attention_blockwise,
)
from minipaged.testing import random_paged_case, tolerance

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(2023)


@pytest.mark.task2_2
def test_gather_kv_walks_the_table_and_drops_the_stale_tail(gen):
    k_cache = torch.randn(6, 4, 2, 8, generator=gen)  # 6 blocks of 4 slots
    v_cache = torch.randn(6, 4, 2, 8, generator=gen)
    table = torch.tensor([5, 2, 0, -1], dtype=torch.int32)
    # blocks 5 and 2 full, 2 rows of block 0
    keys, values = gather_kv(k_cache, v_cache, table, seq_len=10)
    assert keys.shape == values.shape == (10, 2, 8)
    expected = torch.cat([k_cache[5], k_cache[2], k_cache[0, :2]])
    assert torch.equal(keys, expected)
    assert torch.equal(values, torch.cat([v_cache[5], v_cache[2], v_cache[0, :2]]))


@pytest.mark.task2_2
def test_attend_is_causal_with_the_position_offset(gen):
    """Query row i of q_len sits at position seq_len - q_len + i: it sees exactly the keys up to there."""
    seq_len, q_len = 7, 3
    query = torch.randn(q_len, 2, 4, generator=gen)
    # MQA: one KV head for both query heads
    keys = torch.randn(seq_len, 1, 4, generator=gen)
    values = torch.randn(seq_len, 1, 4, generator=gen)
    out = attend(query, keys, values, scale=0.5)
    assert out.dtype == torch.float32 and out.shape == (q_len, 2, 4)
    for i in range(q_len):
        visible = seq_len - q_len + i + 1
        for h in range(2):
            scores = (keys[:visible, 0] @ query[i, h]) * 0.5  # [visible]
            expected = scores.softmax(0) @ values[:visible, 0]
            torch.testing.assert_close(out[i, h], expected)


@pytest.mark.task2_2
def test_attend_gqa_pairs_consecutive_query_heads_with_a_kv_head(gen):
    # 4 query heads over 2 KV heads: (0, 1) -> 0, (2, 3) -> 1
    query = torch.randn(1, 4, 8, generator=gen)
    keys = torch.randn(5, 2, 8, generator=gen)
    values = torch.randn(5, 2, 8, generator=gen)
    out = attend(query, keys, values, scale=0.3)
    for h in range(4):
        kv = h // 2
        expected = ((keys[:, kv] @ query[0, h]) * 0.3).softmax(0) @ values[:, kv]
        torch.testing.assert_close(out[0, h], expected)


@pytest.mark.task2_2
def test_attend_accumulates_in_float32_for_half_inputs(gen):
    query = torch.randn(2, 2, 16, generator=gen).half()
    keys = torch.randn(9, 2, 16, generator=gen).half()
    values = torch.randn(9, 2, 16, generator=gen).half()
    out = attend(query, keys, values, scale=0.25)
    assert out.dtype == torch.float32
    q, k, v = query.double(), keys.double(), values.double()
    # [heads, 2, 9]; rows at positions 7 and 8
    scores = torch.einsum("qhd,khd->hqk", q, k) * 0.25
    scores[:, 0, 8] = -math.inf  # the first query row does not see the last key
    exact = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    # fp32 math on fp16 data
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.task2_3
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_blockwise_matches_dense(gen, dtype, block_size, num_kv_heads):
    case = random_paged_case(
        gen,
        [1, 19, 33, 8],
        [1, 19, 5, 0],
        num_heads=4,
        num_kv_heads=num_kv_heads,
        block_size=block_size,
        dtype=dtype,
    )
    out = torch.full_like(case.query, math.nan)
    paged_attention_blockwise(*case.args, out=out)
    torch.testing.assert_close(out, case.expected(), **tolerance(dtype))


@pytest.mark.task2_3
def test_blockwise_survives_scores_that_would_overflow_a_naive_softmax(gen):
    """exp(1000) overflows float32; the running maximum keeps every exponent <= 0."""
    case = random_paged_case(gen, [20, 12], [4, 12], block_size=4)
    case.scale = 300.0
    out = paged_attention_blockwise(*case.args)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, case.expected(), **tolerance(torch.float32))


@pytest.mark.task2_3
def test_blockwise_equals_gather_based(gen):
    case = random_paged_case(gen, [40, 3, 17], [2, 3, 1], block_size=8)
    torch.testing.assert_close(
        paged_attention_blockwise(*case.args), paged_attention(*case.args)
    )


def test_dense_attention_needs_one_kv_per_sequence(gen):
    query = torch.randn(3, 2, 4, generator=gen)
    starts = torch.tensor([0, 1, 3], dtype=torch.int32)
    with pytest.raises(
        ValueError, match=r"keys and values must hold one tensor per sequence \(2 from"
    ):
        dense_attention(
            query, [torch.randn(2, 2, 4)], [torch.randn(2, 2, 4)], starts, 0.5
        )
