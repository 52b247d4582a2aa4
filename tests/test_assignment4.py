"""Assignment 4: the paged decode kernel (task 4.1) and prefill kernel (task 4.2), against the oracle.

The kernels run where `device_for` puts the Triton backend's tensors: compiled on a GPU, else on
the CPU through Triton's interpreter, so the shapes stay small. Every case comes from
random_paged_case: random tables (blocks repeated, -1 padding past each sequence's blocks), random
K/V and queries, and NaN or inf in every slot no sequence owns; the output is poisoned with NaN
before the kernels run. So a kernel that reads a slot at or past seq_len, follows a padding entry
or leaves a row unwritten fails. The lengths cross the kernels' edges: a 64-position decode tile
(32 in prefill) partly past seq_len, a block partly past it, a chunk of one position, a chunk past
a short sequence's end. The launcher (minipaged/fast/attention.py) and the merge kernel are given
code; these tests drive them with a forced number of chunks.

No test name here contains the word of the backend's name: the course's own check
(tests/test_assignments.py) deselects with `-k "not triton"` and must still find these tests.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import pytest
import torch

from minipaged.backend import available_backends, get_backend
from minipaged.testing import device_for, random_paged_case, tolerance

pytestmark = pytest.mark.skipif(
    "triton" not in available_backends(), reason="triton is not installed"
)

DEVICE = device_for("triton")
# (block_size, num_heads, num_kv_heads, head_dim): every GQA group size, blocks of
# one token up to half a decode tile, a head_dim that is no power of two
SHAPES = [
    pytest.param(1, 4, 4, 16, id="block1-mha"),
    pytest.param(8, 8, 2, 32, id="block8-group4"),
    pytest.param(16, 6, 2, 40, id="block16-group3-dim40"),
    pytest.param(32, 8, 1, 32, id="block32-mqa"),
]
LOW_PRECISION = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture
def gen(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="module")
def attention():
    get_backend("triton")  # the import error, if any, says what to set
    from minipaged.fast import attention

    return attention


def random_scale(gen: torch.Generator) -> float:
    """A softmax scale that is not head_dim ** -0.5, so a kernel must use the one given."""
    return float(torch.empty(1).uniform_(0.05, 0.5, generator=gen))


def attend(attention, case, num_splits, plan=None):
    """The plan (num_splits forced), then its kernels, into a NaN-poisoned output."""
    if plan is None:
        plan = attention.plan_attention(
            case.seq_lens, case.query_start_loc, case.k_cache.shape[2], num_splits
        )
    out = torch.full_like(case.query, math.nan)  # an unwritten element stays NaN
    attention.run_planned(plan, *case.args, out=out)
    return plan, out


# ---- task 4.1: the decode kernel -----------------------------------------------------------------


@pytest.mark.task4_1
@pytest.mark.parametrize("num_splits", [1, 3], ids=["one-chunk", "three-chunks"])
@pytest.mark.parametrize(
    ("block_size", "num_heads", "num_kv_heads", "head_dim"), SHAPES
)
def test_decode_matches_dense(
    attention, gen, num_splits, block_size, num_heads, num_kv_heads, head_dim
):
    # 257 positions: four full tiles and one of a single position, and with three
    # chunks (128 positions each) a last chunk of one position; 70 and 1 leave chunks
    # wholly past their end; sequence 1 is idle (q_len 0), so decode d is not sequence d
    seq_lens = [257, 33, 70, 1, int(torch.randint(2, 200, (1,), generator=gen))]
    case = random_paged_case(
        gen,
        seq_lens,
        [1, 0, 1, 1, 1],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        device=DEVICE,
    )
    case = dataclasses.replace(case, scale=random_scale(gen))
    plan, out = attend(attention, case, num_splits)
    assert plan.num_splits == num_splits  # SPLIT=False for one chunk, True for three
    torch.testing.assert_close(out, case.expected(), **tolerance(case.dtype))


@pytest.mark.task4_1
@pytest.mark.parametrize("num_splits", [1, 3], ids=["one-chunk", "three-chunks"])
@pytest.mark.parametrize("dtype", list(LOW_PRECISION))
def test_decode_in_half_precision(attention, gen, num_splits, dtype):
    case = random_paged_case(
        gen,
        [300, 65, 9],
        [1, 1, 1],
        num_heads=8,
        num_kv_heads=2,
        block_size=16,
        dtype=LOW_PRECISION[dtype],
        device=DEVICE,
    )
    plan, out = attend(attention, case, num_splits)
    assert plan.num_splits == num_splits
    assert out.dtype == case.dtype
    torch.testing.assert_close(out, case.expected(), **tolerance(case.dtype))


@pytest.mark.task4_1
@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_writes_its_query_row_and_no_other(attention, gen, num_splits):
    """A decode's query and output row is decode_rows[d], not d: here a prefill's rows
    come first. The prefill kernel is left out of the plan, so its rows stay NaN."""
    case = random_paged_case(
        gen, [50, 90, 130], [5, 1, 1], num_heads=4, num_kv_heads=2, device=DEVICE
    )
    plan = attention.plan_attention(
        case.seq_lens, case.query_start_loc, case.k_cache.shape[2], num_splits
    )
    assert plan.decode_rows.tolist() == [5, 6]
    decode_only = dataclasses.replace(
        plan, prefill_seqs=plan.prefill_seqs[:0], max_prefill_q_len=0
    )
    _, out = attend(attention, case, num_splits, plan=decode_only)
    rows = plan.decode_rows.long()
    torch.testing.assert_close(
        out[rows], case.expected()[rows], **tolerance(case.dtype)
    )
    assert out[:5].isnan().all(), "the decode kernel wrote a row that is not a decode's"


def chunk_results(case, plan) -> tuple[torch.Tensor, torch.Tensor]:
    """What each chunk must write: its softmax output and the log-sum-exp of its scores.

    Returns:
        `[num_decodes, num_heads, num_splits, head_dim]` and `[num_decodes, num_heads,
        num_splits]`, float32; a chunk past its sequence's end holds 0 and -inf.
    """
    num_heads, head_dim = case.query.shape[1:]
    shape = (plan.decode_seqs.numel(), num_heads, plan.num_splits)
    outs, lses = torch.zeros(*shape, head_dim), torch.full(shape, -math.inf)
    for d, (seq, row) in enumerate(
        zip(plan.decode_seqs.tolist(), plan.decode_rows.tolist(), strict=True)
    ):
        group = num_heads // case.keys[seq].shape[1]
        # [seq_len, num_heads, head_dim]
        keys = case.keys[seq].cpu().float().repeat_interleave(group, dim=1)
        values = case.values[seq].cpu().float().repeat_interleave(group, dim=1)
        q = case.query[row].cpu().float()  # [num_heads, head_dim]
        scores = torch.einsum("hd,lhd->hl", q, keys) * case.scale  # [heads, seq_len]
        for c in range(plan.num_splits):
            chunk = slice(c * plan.tokens_per_split, (c + 1) * plan.tokens_per_split)
            if scores[:, chunk].numel() == 0:
                continue  # past the end: 0 and -inf
            lses[d, :, c] = scores[:, chunk].logsumexp(dim=-1)
            probs = scores[:, chunk].softmax(dim=-1)  # [num_heads, chunk]
            outs[d, :, c] = torch.einsum("hl,lhd->hd", probs, values[chunk])
    return outs, lses


@pytest.mark.task4_1
def test_each_chunk_writes_its_softmax_and_log_sum_exp(attention, gen, monkeypatch):
    """The partial buffers the merge reads, poisoned with NaN before the decode kernel
    runs: every chunk, an empty one included, writes its normalized output and its
    log-sum-exp (0 and -inf when it saw no position)."""
    seen = {}
    decode_kernel, merge_kernel = (
        attention._decode_split_kernel,
        attention._merge_splits_kernel,
    )

    class Poisoned:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                args[4].fill_(math.nan)  # partial_out
                args[5].fill_(math.nan)  # partial_lse
                return decode_kernel[grid](*args, **kwargs)

            return launch

    class Recorded:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen["out"], seen["lse"] = args[0].clone(), args[1].clone()
                return merge_kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(attention, "_decode_split_kernel", Poisoned())
    monkeypatch.setattr(attention, "_merge_splits_kernel", Recorded())
    case = random_paged_case(
        gen, [257, 70, 1], [1, 1, 1], num_heads=8, num_kv_heads=2, device=DEVICE
    )
    plan, out = attend(attention, case, 3)
    assert plan.num_splits == 3 and "lse" in seen, "the plan did not split"
    want_out, want_lse = chunk_results(case, plan)
    torch.testing.assert_close(seen["lse"].cpu(), want_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["out"].cpu(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, case.expected(), **tolerance(case.dtype))


# ---- task 4.2: the prefill kernel ----------------------------------------------------------------


@pytest.mark.task4_2
@pytest.mark.parametrize(
    ("block_size", "num_heads", "num_kv_heads", "head_dim"), SHAPES
)
def test_prefill_matches_dense(
    attention, gen, block_size, num_heads, num_kv_heads, head_dim
):
    # whole prompts of 70 (three 32-row tiles, the last partial) and 2 rows; 37 new
    # rows after 113 cached positions (a prefix-cache hit, or a later chunk of a
    # chunked prefill); 2 rows after 38; an idle sequence
    seq_lens = [70, 2, 150, 33, 40]
    q_lens = [70, 2, 37, 0, 2]
    case = random_paged_case(
        gen,
        seq_lens,
        q_lens,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        device=DEVICE,
    )
    case = dataclasses.replace(case, scale=random_scale(gen))
    plan, out = attend(attention, case, None)
    assert plan.decode_seqs.numel() == 0  # the prefill kernel alone
    torch.testing.assert_close(out, case.expected(), **tolerance(case.dtype))


@pytest.mark.task4_2
@pytest.mark.parametrize("dtype", list(LOW_PRECISION))
def test_prefill_in_half_precision(attention, gen, dtype):
    case = random_paged_case(
        gen,
        [45, 100],
        [45, 40],
        num_heads=6,
        num_kv_heads=3,
        block_size=16,
        dtype=LOW_PRECISION[dtype],
        device=DEVICE,
    )
    _, out = attend(attention, case, None)
    assert out.dtype == case.dtype
    torch.testing.assert_close(out, case.expected(), **tolerance(case.dtype))
