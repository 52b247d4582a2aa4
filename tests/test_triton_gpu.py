"""The Triton backend at a real model's shapes, compiled on a GPU; the same tests small, anywhere.

Each test runs at two scales. `real` (marked `gpu`, so `pytest -m gpu` on a CUDA machine selects it,
and it is skipped cleanly elsewhere) takes the shapes of a real model: head_dim 128, 32 query heads
over 8 KV heads, contexts in the thousands, fp16 and bf16 (and fp32, where tl.dot must not fall back
to tf32), block size 16, split-KV decode with as many chunks as a long context gets, a pool past
2**31 elements, the engine on CUDA. `small` runs the same body at small shapes wherever triton is
installed: through Triton's interpreter on a CPU (which is slow, hence small), compiled on a GPU. So
the logic of every GPU test (its plan, its bookkeeping, its assertions) is checked on any machine;
only the `real` runs show what compiling and the sizes add.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from minipaged.backend import available_backends, get_backend
from minipaged.reference.attention import dense_attention
from minipaged.testing import device_for, random_paged_case, tolerance

pytestmark = pytest.mark.skipif(
    "triton" not in available_backends(), reason="triton is not installed"
)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SHAPES = {
    "small": {"num_heads": 8, "num_kv_heads": 2, "head_dim": 32, "block_size": 16},
    # Llama-3-8B's
    "real": {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "block_size": 16},
}
SCALES = [
    pytest.param("small", id="small"),
    pytest.param("real", id="real", marks=pytest.mark.gpu),
]


def device_of(scale: str) -> torch.device:
    """`real` runs on CUDA; `small` wherever the Triton backend's tests run here (device_for)."""
    return torch.device("cuda") if scale == "real" else device_for("triton")


@pytest.fixture
def gen(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def check(case, out: torch.Tensor) -> None:
    assert not out.isnan().any(), (
        "an output element was never written (or read a stale slot)"
    )
    torch.testing.assert_close(
        out.float(), case.expected().float(), **tolerance(case.dtype)
    )


def attend(case, num_splits: int | None = None) -> torch.Tensor:
    """The public op (num_splits None) or run_planned with a forced plan, into a NaN-poisoned out."""
    from minipaged.fast import attention

    out = torch.full_like(case.query, math.nan)
    if num_splits is None:
        return get_backend("triton").paged_attention(*case.args, out=out)
    plan = attention.plan_attention(
        case.seq_lens, case.query_start_loc, case.k_cache.shape[2], num_splits
    )
    assert plan.num_splits == num_splits, (
        "the plan runs another number of chunks than the test names"
    )
    return attention.run_planned(plan, *case.args, out=out)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_decode_long_contexts(gen, dtype, scale):
    lens = {"small": [300, 90, 17, 1, 16], "real": [4100, 1500, 129, 1, 16]}[scale]
    case = random_paged_case(
        gen,
        lens,
        [1] * len(lens),
        dtype=DTYPES[dtype],
        device=device_of(scale),
        **SHAPES[scale],
    )
    check(case, attend(case))


# Chunks are whole 64-token tiles, so a plan may run fewer chunks than asked (8192 tokens in 33 chunks
# would be 32 chunks of 256). These contexts split exactly: 8,448 = 33 x 256 and 640 = 5 x 128; the
# 33 and the 5 are not powers of two, so the merge's BLOCK_SPLITS lanes past num_splits are masked.
SPLITS = [
    *(pytest.param("small", [640, 70], n, id=f"small-{n}") for n in (1, 3, 5)),
    *(
        pytest.param("real", [8448, 700], n, id=f"real-{n}", marks=pytest.mark.gpu)
        for n in (1, 8, 33)
    ),
]


@pytest.mark.parametrize("scale, lens, num_splits", SPLITS)
def test_decode_every_split_count(gen, scale, lens, num_splits):
    case = random_paged_case(
        gen, lens, [1, 1], dtype=torch.float16, device=device_of(scale), **SHAPES[scale]
    )
    check(case, attend(case, num_splits))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_prefill_after_a_cached_prefix(gen, dtype, scale):
    # real: 2,560 cached tokens then 512 new ones; a whole 1,000-token prompt; a decode in the same step
    # small: 110 cached then 40 new (two 32-row tiles, the second partial); a 40-token prompt; a decode
    lens, q_lens = {
        "small": ([150, 40, 60], [40, 40, 1]),
        "real": ([3072, 1000, 2000], [512, 1000, 1]),
    }[scale]
    case = random_paged_case(
        gen, lens, q_lens, dtype=DTYPES[dtype], device=device_of(scale), **SHAPES[scale]
    )
    check(case, attend(case))


@pytest.mark.parametrize("scale", SCALES)
def test_mqa_and_large_groups(gen, scale):
    lens = {"small": [200, 20], "real": [3000, 64]}[scale]
    # group 32: BLOCK_H = 32 decode rows
    shape = {**SHAPES[scale], "num_heads": 32, "num_kv_heads": 1}
    case = random_paged_case(
        gen, lens, [1, lens[1]], dtype=torch.bfloat16, device=device_of(scale), **shape
    )
    check(case, attend(case))


# pool shape, layers, and the (src, dst) pairs of a copy, a swap out, a swap in
ROUND_TRIP = {
    "small": {
        "shape": (16, 4, 2, 32),
        "layers": 4,
        "copy": [[3, 10], [7, 9], [12, 4]],
        "out": [[3, 0], [10, 7], [9, 5]],
        "in": [[0, 1], [7, 2], [5, 15]],
        "tokens": 10,
    },
    "real": {
        "shape": (256, 16, 8, 128),
        "layers": 32,
        "copy": [[3, 100], [7, 9], [200, 4]],
        "out": [[3, 0], [100, 63], [9, 17]],
        "in": [[0, 1], [63, 2], [17, 250]],
        "tokens": 40,
    },
}


@pytest.mark.parametrize("scale", SCALES)
def test_write_copy_and_swap_round_trip(gen, scale):
    shape, num_layers, num_tokens = (
        ROUND_TRIP[scale][key] for key in ("shape", "layers", "tokens")
    )
    copy_pairs, out_pairs, in_pairs = (
        ROUND_TRIP[scale][key] for key in ("copy", "out", "in")
    )
    device, host_blocks = device_of(scale), max(p[1] for p in out_pairs) + 1
    backend, reference = get_backend("triton"), get_backend("reference")
    k = [torch.randn(shape, generator=gen).half().to(device) for _ in range(num_layers)]
    v = [torch.randn(shape, generator=gen).half().to(device) for _ in range(num_layers)]
    want_k, want_v = [t.clone() for t in k], [t.clone() for t in v]
    mapping = torch.tensor(copy_pairs, device=device)
    backend.copy_blocks(k, v, mapping)
    reference.copy_blocks(want_k, want_v, mapping)
    assert all(torch.equal(a, b) for a, b in zip(k + v, want_k + want_v, strict=True))

    # the swap space
    host = torch.full((host_blocks, *shape[1:]), math.nan, dtype=torch.float16)
    moved = [p[0] for p in out_pairs]  # device blocks swapped out
    # device -> host: gather, one transfer, scatter
    backend.swap_blocks(k[1], host, torch.tensor(out_pairs))
    assert torch.equal(host[[p[1] for p in out_pairs]], k[1][moved].cpu())
    back = torch.full_like(k[1], math.nan)
    # host -> device, into other blocks
    backend.swap_blocks(host, back, torch.tensor(in_pairs))
    assert torch.equal(back[[p[1] for p in in_pairs]], k[1][moved])

    # a fused projection
    qkv = torch.randn(num_tokens, 3, *shape[2:], generator=gen).half().to(device)
    slots = torch.randperm(shape[0] * shape[1], generator=gen)[:num_tokens].to(device)
    slots[::7] = -1
    backend.write_kv(qkv[:, 1], qkv[:, 2], k[0], v[0], slots)
    reference.write_kv(qkv[:, 1], qkv[:, 2], want_k[0], want_v[0], slots)
    assert torch.equal(k[0], want_k[0]) and torch.equal(v[0], want_v[0])


@pytest.mark.parametrize("scale", SCALES)
def test_a_pool_past_2_31_elements(gen, scale):
    """Offsets into a pool of more than 2**31 elements need 64-bit arithmetic: the kernels widen the
    block id (decode, prefill), the slot (write_kv) and the block (copies) to int64 before multiplying.

    `real`: 140,000 fp16 blocks of 16 x 8 x 128 (2.29e9 elements, 4.6 GB a pool, K and V) and every
    op on the top blocks, past element 2**31, and on the two blocks either side of it. The pools are
    NaN everywhere else, so a wrapped offset that lands in the pool shows. `small` runs the same steps
    on a small pool (nothing to overflow there: it checks the test's own logic).
    """
    device, shape = device_of(scale), SHAPES[scale]
    block_size, num_kv_heads, head_dim = (
        shape["block_size"],
        shape["num_kv_heads"],
        shape["head_dim"],
    )
    block_numel = block_size * num_kv_heads * head_dim
    if scale == "real":
        if torch.cuda.get_device_properties(device).total_memory < 24 * 2**30:
            pytest.skip("needs a GPU with 24 GiB: two pools of 4.6 GB and their copies")
        # block `boundary` starts at element 2**31
        num_blocks, boundary = 140_000, 2**31 // block_numel
        assert num_blocks * block_numel > 2**31 and boundary * block_numel == 2**31
    else:
        num_blocks, boundary = 48, 24
    pool_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(pool_shape, math.nan, dtype=torch.float16, device=device)
    v_cache = torch.full(pool_shape, math.nan, dtype=torch.float16, device=device)
    top = num_blocks - 1
    tables = [[top, boundary, boundary - 1, top - 1], [top - 2, top - 3, boundary + 1]]
    # a decode, a chunk
    seq_lens, q_lens = [4 * block_size - 3, 3 * block_size], [1, 2 * block_size]
    for table in tables:
        ids = torch.tensor(table, device=device)
        k_cache[ids] = (
            torch.randn(len(table), *pool_shape[1:], generator=gen).half().to(device)
        )
        v_cache[ids] = (
            torch.randn(len(table), *pool_shape[1:], generator=gen).half().to(device)
        )

    # [n, num_kv_heads, head_dim]: the sequence's K or V by position
    def gathered(cache, table, n):
        return cache[torch.tensor(table, device=device)].flatten(0, 1)[:n]

    query = (
        torch.randn(sum(q_lens), shape["num_heads"], head_dim, generator=gen)
        .half()
        .to(device)
    )
    block_tables = torch.tensor(
        [t + [-1] * (4 - len(t)) for t in tables], dtype=torch.int32, device=device
    )
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    starts = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32, device=device)
    scale_ = head_dim**-0.5
    keys = [gathered(k_cache, t, n) for t, n in zip(tables, seq_lens, strict=True)]
    values = [gathered(v_cache, t, n) for t, n in zip(tables, seq_lens, strict=True)]
    expected = dense_attention(query, keys, values, starts, scale_)
    backend = get_backend("triton")
    out = backend.paged_attention(
        query, k_cache, v_cache, block_tables, lens, starts, scale_
    )
    assert not out.isnan().any()
    torch.testing.assert_close(
        out.float(), expected.float(), **tolerance(torch.float16)
    )

    slots = torch.tensor(
        [top * block_size + 5, boundary * block_size, (boundary - 1) * block_size + 2]
    )
    key = torch.randn(3, num_kv_heads, head_dim, generator=gen).half().to(device)
    backend.write_kv(key, key + 1, k_cache, v_cache, slots.to(device))
    for i, slot in enumerate(slots.tolist()):
        assert torch.equal(k_cache[slot // block_size, slot % block_size], key[i])
        assert torch.equal(v_cache[slot // block_size, slot % block_size], key[i] + 1)

    backend.copy_blocks(
        [k_cache],
        [v_cache],
        torch.tensor([[top, boundary + 2], [boundary - 1, top - 4]], device=device),
    )
    assert torch.equal(k_cache[boundary + 2], k_cache[top]) and torch.equal(
        v_cache[top - 4], v_cache[boundary - 1]
    )
    host = torch.full((2, *pool_shape[1:]), math.nan, dtype=torch.float16)
    backend.swap_blocks(k_cache, host, torch.tensor([[top, 1], [boundary, 0]]))
    assert torch.equal(host[1], k_cache[top].cpu()) and torch.equal(
        host[0], k_cache[boundary].cpu()
    )
    backend.swap_blocks(host, v_cache, torch.tensor([[1, boundary + 3]]))
    assert torch.equal(v_cache[boundary + 3], k_cache[top])


# LLM settings under memory pressure (both modes preempt), prompt lengths, max_tokens
ENGINE = {
    "small": (
        {"block_size": 4, "num_gpu_blocks": 6, "num_cpu_blocks": 8},
        (6, 3, 9),
        6,
    ),
    "real": (
        {"block_size": 16, "num_gpu_blocks": 8, "num_cpu_blocks": 8},
        (5, 40, 17),
        24,
    ),
}


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_engine_matches_the_reference_backend_on_the_cpu(scale, mode):
    """The engine on the Triton backend (on CUDA at `real`) gives the tokens of the reference backend on
    the CPU, while the pool is small enough to preempt. (tiny-llama's top two logits are at least
    0.009 apart along these greedy paths on the CPU: far more than fp32 differs between devices.)"""
    from minipaged import LLM, SamplingParams

    settings, prompt_lens, max_tokens = ENGINE[scale]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in prompt_lens]
    got = {}
    for backend, device in (("reference", "cpu"), ("triton", str(device_of(scale)))):
        llm = LLM(
            "tiny-llama",
            backend=backend,
            device=device,
            preemption_mode=mode,
            **settings,
        )
        got[backend] = [
            o.outputs[0].token_ids
            for o in llm.generate(prompts, params, use_tqdm=False)
        ]
        assert llm.stats.num_preemptions[mode] > 0, (
            "the pool was meant to be small enough to preempt"
        )
        if mode == "swap":
            assert llm.stats.blocks_swapped_out > 0 and llm.stats.blocks_swapped_in > 0
        # every block came back
        assert llm.block_manager.device.num_free == settings["num_gpu_blocks"]
    assert got["triton"] == got["reference"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_the_second_gpu_are_computed_there(gen):
    """Every op on cuda:1 while cuda:0 is current: each launcher launches on its tensors' device."""
    torch.cuda.set_device(0)
    device = torch.device("cuda", 1)
    backend, reference = get_backend("triton"), get_backend("reference")
    case = random_paged_case(
        gen,
        [3000, 200, 90],
        [1, 1, 90],
        dtype=torch.float16,
        device=device,
        **SHAPES["real"],
    )
    # decode (split: 2 decodes x 8 KV heads leave the chip room) and prefill
    check(case, attend(case))
    check(case, attend(case, 4))  # split-KV with its merge, forced

    k, v = case.k_cache.clone(), case.v_cache.clone()
    key = torch.randn(5, 8, 128, generator=gen).half().to(device)
    slots = torch.tensor([3, 17, -1, 40, 2], device=device)
    backend.write_kv(key, key * 2, case.k_cache, case.v_cache, slots)
    reference.write_kv(key, key * 2, k, v, slots)
    mapping = torch.tensor([[0, 5], [7, 2]], device=device)
    backend.copy_blocks([case.k_cache], [case.v_cache], mapping)
    reference.copy_blocks([k], [v], mapping)
    assert torch.equal(case.k_cache, k) and torch.equal(case.v_cache, v)
    host = torch.full((3, *k.shape[1:]), math.nan, dtype=torch.float16)
    backend.swap_blocks(case.k_cache, host, torch.tensor([[5, 0], [9, 2]]))
    backend.swap_blocks(host, case.v_cache, torch.tensor([[0, 11], [2, 12]]))
    assert torch.equal(case.v_cache[[11, 12]], k[[5, 9]])
    torch.cuda.synchronize(device)
    assert torch.cuda.current_device() == 0, "a launcher left another device current"
