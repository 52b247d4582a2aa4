"""The Triton backend compiled on a GPU, at realistic shapes: `pytest -m gpu` on a CUDA machine.

The contract tests run everywhere with small shapes (through Triton's interpreter on a CPU); these
take the shapes of a real model: head_dim 128, 32 query heads over 8 KV heads, contexts in the
thousands, fp16 and bf16 (and fp32, where tl.dot must not fall back to tf32), block size 16, and
the split-KV decode with as many chunks as a long context gets. Skipped cleanly without CUDA.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from minipaged.backend import available_backends, get_backend
from minipaged.testing import random_paged_case, tolerance

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("triton" not in available_backends(), reason="triton is not installed"),
]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LLAMA = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "block_size": 16}  # Llama-3-8B's attention


@pytest.fixture
def gen(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def check(case, out: torch.Tensor) -> None:
    assert not out.isnan().any(), "an output element was never written (or read a stale slot)"
    torch.testing.assert_close(out.float(), case.expected().float(), **tolerance(case.dtype))


def attend(case, num_splits: int | None = None) -> torch.Tensor:
    from minipaged.fast import attention

    out = torch.full_like(case.query, math.nan)
    if num_splits is None:
        return get_backend("triton").paged_attention(*case.args, out=out)
    plan = attention.plan_attention(case.seq_lens, case.query_start_loc, case.k_cache.shape[2], num_splits)
    return attention.run_planned(plan, *case.args, out=out)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_decode_long_contexts(gen, dtype):
    case = random_paged_case(
        gen, [4100, 1500, 129, 1, 16], [1] * 5, dtype=DTYPES[dtype], device="cuda", **LLAMA
    )
    check(case, attend(case))


@pytest.mark.parametrize("num_splits", [1, 8, 33])
def test_decode_every_split_count(gen, num_splits):
    case = random_paged_case(gen, [8192, 700], [1, 1], dtype=torch.float16, device="cuda", **LLAMA)
    check(case, attend(case, num_splits))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_prefill_after_a_cached_prefix(gen, dtype):
    # 2,560 cached tokens then 512 new ones; a whole 1,000-token prompt; and a decode in the same step
    case = random_paged_case(
        gen, [3072, 1000, 2000], [512, 1000, 1], dtype=DTYPES[dtype], device="cuda", **LLAMA
    )
    check(case, attend(case))


def test_mqa_and_large_groups(gen):
    case = random_paged_case(
        gen,
        [3000, 64],
        [1, 64],
        num_heads=32,
        num_kv_heads=1,
        head_dim=128,
        block_size=16,
        dtype=torch.bfloat16,
        device="cuda",
    )  # group 32: BLOCK_H = 32 rows in the decode tile
    check(case, attend(case))


def test_write_copy_and_swap_round_trip(gen):
    backend, reference = get_backend("triton"), get_backend("reference")
    shape = (256, 16, 8, 128)  # [num_blocks, block_size, num_kv_heads, head_dim]
    k = [torch.randn(shape, generator=gen).half().cuda() for _ in range(32)]  # 32 layers
    v = [torch.randn(shape, generator=gen).half().cuda() for _ in range(32)]
    want_k, want_v = [t.clone() for t in k], [t.clone() for t in v]
    mapping = torch.tensor([[3, 100], [7, 9], [200, 4]], device="cuda")
    backend.copy_blocks(k, v, mapping)
    reference.copy_blocks(want_k, want_v, mapping)
    assert all(torch.equal(a, b) for a, b in zip(k + v, want_k + want_v, strict=True))

    host = torch.full((64, *shape[1:]), math.nan, dtype=torch.float16)  # the swap space, pinned or not
    out_map = torch.tensor([[3, 0], [100, 63], [9, 17]])
    backend.swap_blocks(k[5], host, out_map)  # device -> host: gather, one transfer, scatter
    assert torch.equal(host[[0, 63, 17]], k[5][[3, 100, 9]].cpu())
    back = torch.full_like(k[5], math.nan)
    backend.swap_blocks(host, back, torch.tensor([[0, 1], [63, 2], [17, 250]]))  # host -> device
    assert torch.equal(back[[1, 2, 250]], k[5][[3, 100, 9]])

    qkv = torch.randn(40, 3, 8, 128, generator=gen).half().cuda()  # a fused projection, viewed
    slots = torch.randperm(256 * 16, generator=gen)[:40].cuda()
    slots[::7] = -1
    backend.write_kv(qkv[:, 1], qkv[:, 2], k[0], v[0], slots)
    reference.write_kv(qkv[:, 1], qkv[:, 2], want_k[0], want_v[0], slots)
    assert torch.equal(k[0], want_k[0]) and torch.equal(v[0], want_v[0])


def test_engine_on_cuda_matches_the_reference_backend():
    from minipaged import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 40, 17)]
    got = {}
    for backend in ("reference", "triton"):
        llm = LLM("tiny-llama", backend=backend, device="cuda", block_size=16, num_gpu_blocks=8)
        got[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got["triton"] == got["reference"]
