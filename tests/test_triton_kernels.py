"""Inside the Triton backend: the paths the contract tests reach only on a GPU's shapes.

The contract tests (test_kernel_contract.py) hold the public ops to the oracle. These tests open the
dispatch: split-KV decode with every number of chunks (the merge, and chunks past a short sequence's
end), the plan that sends each sequence to its kernel, prefill tiles across a cached prefix, the
split policy, copy_blocks in one launch, the launch on each tensor's own GPU, and the kernels compiled
for real GPUs (no GPU needed). Tensors go to DEVICE (minipaged.testing.device_for): CUDA on a GPU
machine, where the kernels run compiled; the CPU elsewhere, through Triton's interpreter, so the
shapes stay small. The decode and prefill tests here also grade Assignment 4 (markers task4_1 and
task4_2, beside tests/test_assignment4.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from minipaged.backend import available_backends, get_backend
from minipaged.testing import device_for, random_paged_case, tolerance

pytestmark = pytest.mark.skipif(
    "triton" not in available_backends(), reason="triton is not installed"
)

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICE = device_for("triton")


@pytest.fixture
def gen(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="module")
def fast():
    get_backend("triton")  # the import error, if any, says what to set
    from minipaged.fast import attention, cache_ops, decode

    return attention, cache_ops, decode


def planned(fast, case, num_splits):
    """run_planned with a forced number of chunks, into a NaN-poisoned output."""
    attention = fast[0]
    plan = attention.plan_attention(
        case.seq_lens, case.query_start_loc, case.k_cache.shape[2], num_splits
    )
    out = torch.full_like(case.query, math.nan)
    return plan, attention.run_planned(plan, *case.args, out=out)


@pytest.mark.task4_1
@pytest.mark.parametrize("num_splits", [1, 2, 3, 6])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (8, 1)], ids=["mha", "gqa", "mqa"])
def test_split_decode_matches_dense(fast, gen, num_splits, heads):
    # 300 tokens in chunks of 64-token tiles: several full chunks, a partial one, and
    # for the short sequences chunks that lie wholly past their end (lse -inf, weight 0
    # in the merge)
    case = random_paged_case(
        gen,
        [300, 65, 1, 130],
        [1, 1, 1, 1],
        num_heads=heads[0],
        num_kv_heads=heads[1],
        block_size=16,
        device=DEVICE,
    )
    plan, out = planned(fast, case, num_splits)
    # 300 tokens fill at most five 64-token chunks
    assert plan.num_splits == min(num_splits, 5)
    torch.testing.assert_close(out, case.expected(), **tolerance(case.dtype))


@pytest.mark.task4_1
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_split_decode_dtypes_and_odd_head_dim(fast, gen, dtype):
    case = random_paged_case(
        gen,
        [200, 90],
        [1, 1],
        num_heads=6,
        num_kv_heads=2,
        head_dim=40,
        block_size=8,
        dtype=DTYPES[dtype],
        device=DEVICE,
    )  # head_dim 40 pads to 64 lanes; group 3 pads to 16 rows
    _, out = planned(fast, case, 3)
    torch.testing.assert_close(out, case.expected(), **tolerance(case.dtype))


@pytest.mark.task4_1
def test_split_and_unsplit_agree(fast, gen):
    case = random_paged_case(
        gen, [257, 129, 3], [1, 1, 1], block_size=16, device=DEVICE
    )
    _, one = planned(fast, case, 1)
    _, five = planned(fast, case, 5)
    torch.testing.assert_close(five, one, rtol=1e-5, atol=1e-6)


@pytest.mark.task4_2  # and the decode kernel (task 4.1) for its third sequence
def test_prefill_tiles_after_a_cached_prefix(fast, gen):
    # q_len 70 spans three 32-row tiles (the last one partial);
    # 130 cached tokens come before them
    case = random_paged_case(
        gen,
        [200, 40, 9],
        [70, 40, 1],
        num_heads=4,
        num_kv_heads=2,
        block_size=16,
        device=DEVICE,
    )
    plan, out = planned(fast, case, None)
    assert plan.prefill_seqs.tolist() == [0, 1] and plan.decode_seqs.tolist() == [2]
    torch.testing.assert_close(out, case.expected(), **tolerance(case.dtype))


def test_plan_sends_each_sequence_to_its_kernel(fast):
    attention, _, decode = fast
    q_lens = [1, 0, 5, 1, 3]
    starts = torch.tensor(
        [0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32
    )
    seq_lens = torch.tensor([700, 4, 9, 30, 3], dtype=torch.int32)
    plan = attention.plan_attention(seq_lens, starts, num_kv_heads=2, num_splits=3)
    assert plan.decode_seqs.tolist() == [0, 3]  # q_len 1
    assert plan.decode_rows.tolist() == [0, 6]  # their rows: query_start_loc of each
    # q_len > 1; the idle sequence (q_len 0) is in neither
    assert plan.prefill_seqs.tolist() == [2, 4]
    assert plan.max_prefill_q_len == 5
    assert plan.tokens_per_split % decode.DECODE_BLOCK_N == 0
    # the chunks cover the longest decode
    assert plan.tokens_per_split * plan.num_splits >= 700
    # and none lies wholly past it
    assert plan.tokens_per_split * (plan.num_splits - 1) < 700
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        attention.plan_attention(seq_lens, starts, num_kv_heads=2, num_splits=0)


def test_split_policy_fills_the_chip_but_not_with_short_chunks(fast):
    num_kv_splits = fast[2].num_kv_splits
    # batch 1 x 8 KV heads: 8 programs -> 264
    assert num_kv_splits(8, 16384, num_sms=132) == 33
    assert num_kv_splits(64, 4096, num_sms=132) == 5  # batch 8: ceil(264 / 64)
    # batch 256 already fills the chip
    assert num_kv_splits(2048, 16384, num_sms=132) == 1
    # chunks of at least MIN_TOKENS_PER_SPLIT tokens
    assert num_kv_splits(8, 300, num_sms=132) == 2
    assert num_kv_splits(8, 100, num_sms=132) == 1
    assert num_kv_splits(1, 16384, num_sms=1) == 2  # the interpreter's "chip" of one


class LaunchCounter:
    """Stands in for a Triton kernel: counts `kernel[grid](...)` launches, then runs the kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_copy_blocks_is_one_launch_for_every_layer(fast, gen, monkeypatch):
    cache_ops = fast[1]
    counter = LaunchCounter(cache_ops._copy_blocks_kernel)
    monkeypatch.setattr(cache_ops, "_copy_blocks_kernel", counter)
    # 4 layers
    k = [torch.randn(6, 4, 2, 8, generator=gen).to(DEVICE) for _ in range(4)]
    v = [torch.randn(6, 4, 2, 8, generator=gen).to(DEVICE) for _ in range(4)]
    expected_k, expected_v = [t.clone() for t in k], [t.clone() for t in v]
    mapping = torch.tensor([[0, 3], [2, 5], [0, 1]], device=DEVICE)
    get_backend("reference").copy_blocks(expected_k, expected_v, mapping)
    cache_ops.copy_blocks(k, v, mapping)
    assert counter.grids == [(3, 8)]  # one launch: 3 pairs x 8 pools
    for got, want in zip(k + v, expected_k + expected_v, strict=True):
        assert torch.equal(got, want)


def test_copy_blocks_with_mixed_pool_kinds_takes_one_launch_per_kind(
    fast, gen, monkeypatch
):
    cache_ops = fast[1]
    counter = LaunchCounter(cache_ops._copy_blocks_kernel)
    monkeypatch.setattr(cache_ops, "_copy_blocks_kernel", counter)
    k = [
        torch.randn(5, 2, 2, 4, generator=gen).to(DEVICE),
        torch.randn(5, 2, 1, 4, generator=gen).half().to(DEVICE),
    ]
    v = [t.clone() for t in k]
    expected_k, expected_v = [t.clone() for t in k], [t.clone() for t in v]
    mapping = torch.tensor([[4, 0]], device=DEVICE)
    get_backend("reference").copy_blocks(expected_k, expected_v, mapping)
    cache_ops.copy_blocks(k, v, mapping)
    assert len(counter.grids) == 2  # fp32 pools and fp16 pools
    for got, want in zip(k + v, expected_k + expected_v, strict=True):
        assert torch.equal(got, want)


def test_launch_device_is_a_no_op_off_cuda(fast):
    cache_ops = fast[1]
    with cache_ops.launch_device(torch.device("cpu")) as entered:
        # contextlib.nullcontext: nothing switched, no CUDA call made
        assert entered is None


def test_launch_device_makes_the_tensors_gpu_current(fast, monkeypatch):
    """The CUDA branch, simulated: it enters torch.cuda.device with the tensors' device."""
    cache_ops = fast[1]
    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    with cache_ops.launch_device(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]


def test_every_launcher_launches_on_its_tensors_device(fast, gen, monkeypatch):
    """write_kv, paged_attention (decode split and merge, prefill), copy_blocks and both halves of a
    swap each launch inside launch_device(their tensors' device), so a pool on cuda:1 is computed on
    cuda:1 (tests/test_triton_gpu.py runs that on a machine with two GPUs)."""
    attention, cache_ops, _ = fast
    real, active, launches = cache_ops.launch_device, [], []

    @contextlib.contextmanager
    def recording(device):
        with real(device):
            active.append(device)
            try:
                yield
            finally:
                active.pop()

    for module in (attention, cache_ops):
        monkeypatch.setattr(module, "launch_device", recording)
    for module, name in [
        (cache_ops, "_write_kv_kernel"),
        (cache_ops, "_copy_rows_kernel"),
        (cache_ops, "_copy_blocks_kernel"),
        (attention, "_decode_split_kernel"),
        (attention, "_merge_splits_kernel"),
        (attention, "_prefill_kernel"),
    ]:
        monkeypatch.setattr(
            module,
            name,
            InsideLaunchDevice(getattr(module, name), name, active, launches),
        )

    backend = get_backend("triton")
    case = random_paged_case(gen, [300, 20], [1, 20], block_size=16, device=DEVICE)
    plan = attention.plan_attention(
        case.seq_lens, case.query_start_loc, case.k_cache.shape[2], 3
    )
    attention.run_planned(plan, *case.args)
    slots = torch.tensor([5, 9], device=DEVICE)
    backend.write_kv(
        case.query[:2, :2], case.query[2:4, :2], case.k_cache, case.v_cache, slots
    )
    backend.copy_blocks(
        [case.k_cache], [case.v_cache], torch.tensor([[0, 1]], device=DEVICE)
    )
    host = torch.empty((4, *case.k_cache.shape[1:]))
    # gather on DEVICE, scatter on the host
    backend.swap_blocks(case.k_cache, host, torch.tensor([[2, 3]]))
    assert {name for name, _ in launches} == {
        "_decode_split_kernel",
        "_merge_splits_kernel",
        "_prefill_kernel",
        "_write_kv_kernel",
        "_copy_blocks_kernel",
        "_copy_rows_kernel",
    }
    assert all(device == case.k_cache.device for _, device in launches)


class InsideLaunchDevice:
    """Stands in for a kernel: records `kernel[grid](...)` with the launch_device it runs inside."""

    def __init__(self, kernel, name, active, launches):
        self.kernel, self.name, self.active, self.launches = (
            kernel,
            name,
            active,
            launches,
        )

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            assert self.active, f"{self.name} launched outside launch_device"
            self.launches.append((self.name, self.active[-1]))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.needs_every_task  # the compiler refuses a stub, in a subprocess
def test_kernels_compile_for_hopper_without_a_gpu():
    """Triton compiles to a cubin for sm_90 on any machine: catches what the interpreter lets pass."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "compile_kernels.py"),
            "--arch",
            "90",
            "--quick",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all compiled" in result.stdout
    # decode (two), prefill, merge, write_kv, the two copies: each plain (i32 arguments)
    # and as a real launch specializes it (divisible-by-16 pointers and integers,
    # integers equal to 1 made constants)
    assert (
        result.stdout.count(" plain  ok ") >= 7
        and result.stdout.count(" launch ok ") >= 7
    )
