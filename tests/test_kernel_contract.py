"""The kernel contract (minipaged/backend.py), held on every backend by one test file.

Every test takes the `backend` fixture, so it runs once per backend that `available_backends()`
finds: the reference always, the Triton backend where triton is installed. Tensors go to the
`device` fixture (minipaged.testing.device_for): the CPU, except for the Triton backend on a machine
with a GPU, where they go to CUDA and the kernels run compiled. The tests know the contract, not any
backend's insides. Inputs are fresh random tensors; every slot that no sequence
covers holds NaN or inf (minipaged.testing.random_paged_case), so reading one shows up; outputs are
poisoned with NaN before the backend writes them, so an unwritten row shows up.

The oracle chain: paged_attention must equal dense_attention (SDPA over the same K/V, laid out
contiguously) within minipaged.testing.tolerance.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minipaged.backend import available_backends, get_backend
from minipaged.testing import (
    PagedCase,
    device_for,
    interpreted,
    last_slots,
    random_paged_case,
    tolerance,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


@pytest.fixture(params=available_backends())
def backend(request):
    return get_backend(request.param)


@pytest.fixture
def device(backend) -> torch.device:
    """Where this backend's tensors go: CUDA for the Triton backend on a GPU machine, else the CPU.

    Triton on CPU tensors runs through its interpreter, thousands of times slower than compiled: the
    sweeps keep their shapes but shorten their sequences there (`interpreted`); on CUDA, compiled,
    they run the full lengths.
    """
    return device_for(backend.name)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's id: fresh data per test, the same data on every run."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes, so that NaN == NaN: 'byte-identical' comparisons."""
    return tensor.contiguous().view(torch.uint8).cpu()


def run_attention(backend, case: PagedCase) -> torch.Tensor:
    """paged_attention into a NaN-poisoned `out` and without `out`; both must equal the oracle."""
    k_before, v_before = bits(case.k_cache), bits(case.v_cache)
    out = torch.full_like(case.query, math.nan)  # an unwritten row stays NaN and fails
    returned = backend.paged_attention(*case.args, out=out)
    assert returned.data_ptr() == out.data_ptr(), (
        "paged_attention(out=...) must return the buffer it wrote"
    )
    fresh = backend.paged_attention(*case.args)
    expected = case.expected()
    for got in (out, fresh):
        assert got.shape == case.query.shape and got.dtype == case.dtype
        torch.testing.assert_close(got, expected, **tolerance(case.dtype))
    assert torch.equal(bits(case.k_cache), k_before) and torch.equal(
        bits(case.v_cache), v_before
    ), "paged_attention must not write the caches"
    return out


def random_lens(gen: torch.Generator, num_seqs: int, low: int, high: int) -> list[int]:
    return torch.randint(low, high + 1, (num_seqs,), generator=gen).tolist()


# ---- paged attention: the oracle chain -----------------------------------------------------------


@pytest.mark.task2_2
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_matches_dense(backend, device, gen, dtype):
    seq_lens = random_lens(gen, 4, 1, 40)
    case = random_paged_case(gen, seq_lens, [1] * 4, dtype=dtype, device=device)
    run_attention(backend, case)


@pytest.mark.task2_2
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_prefill_matches_dense(backend, device, gen, dtype):
    seq_lens = random_lens(gen, 3, 1, 40)
    case = random_paged_case(gen, seq_lens, seq_lens, dtype=dtype, device=device)
    run_attention(backend, case)


@pytest.mark.task2_2
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_chunked_prefill_matches_dense(backend, device, gen, dtype):
    seq_lens = random_lens(gen, 3, 3, 40)
    # 1 < q_len < seq_len
    q_lens = [int(torch.randint(2, n, (1,), generator=gen)) for n in seq_lens]
    case = random_paged_case(gen, seq_lens, q_lens, dtype=dtype, device=device)
    run_attention(backend, case)


@pytest.mark.task2_2
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_prefill_chunk_and_idle_mixed_in_one_call(backend, device, gen, dtype):
    # decode, prefill, a chunk of a chunked prefill (or a prefill after a prefix-cache hit), no rows
    case = random_paged_case(
        gen, seq_lens=[23, 9, 30, 12], q_lens=[1, 9, 13, 0], dtype=dtype, device=device
    )
    run_attention(backend, case)


def sweep_lens(
    gen: torch.Generator, block_size: int, high: int = 48
) -> tuple[list[int], list[int]]:
    """Four sequences (decode, prefill, chunk, decode), last blocks mostly partly filled."""
    high = min(3 * block_size + 3, high)
    seq_lens = random_lens(gen, 4, 3, high)
    seq_lens[3] = (
        2 * block_size + 1 if 2 * block_size + 1 <= high else seq_lens[3]
    )  # one slot in its last block
    chunk = int(torch.randint(2, seq_lens[2], (1,), generator=gen))
    return seq_lens, [1, seq_lens[1], chunk, 1]


@pytest.mark.task2_2
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128])
@pytest.mark.parametrize(
    "num_heads, num_kv_heads", [(8, 8), (8, 2), (8, 1)], ids=["mha", "gqa", "mqa"]
)
def test_sweep_matches_dense(
    backend, device, gen, num_heads, num_kv_heads, head_dim, block_size, dtype
):
    seq_lens, q_lens = sweep_lens(
        gen, block_size, high=12 if interpreted(backend.name) else 48
    )
    case = random_paged_case(
        gen,
        seq_lens,
        q_lens,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        device=device,
    )
    run_attention(backend, case)


@st.composite
def batches(draw) -> dict:
    """A random varlen batch: 1-4 sequences, each with 0 <= q_len <= seq_len, and random shapes."""
    num_seqs = draw(st.integers(1, 4))
    seq_lens = draw(st.lists(st.integers(1, 40), min_size=num_seqs, max_size=num_seqs))
    q_lens = [draw(st.integers(0, n)) for n in seq_lens]
    num_kv_heads = draw(st.sampled_from([1, 2, 4]))
    return {
        "seq_lens": seq_lens,
        "q_lens": q_lens,
        "num_kv_heads": num_kv_heads,
        "num_heads": num_kv_heads * draw(st.sampled_from([1, 2, 4])),
        "head_dim": draw(st.sampled_from([8, 16, 24])),
        "block_size": draw(st.sampled_from([1, 2, 4, 8, 16])),
        "dtype": draw(st.sampled_from(DTYPES)),
        "seed": draw(st.integers(0, 2**31)),
    }


@pytest.mark.task2_2
# 40 examples whatever the profile (each runs the whole oracle chain); the backend fixture is stateless.
@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=batches())
def test_random_batches_match_dense(backend, device, batch):
    seed = batch.pop("seed")
    # shorter sequences, same shapes (see the `device` fixture)
    if interpreted(backend.name):
        batch["seq_lens"] = [min(n, 10) for n in batch["seq_lens"]]
        batch["q_lens"] = [
            min(q, n) for q, n in zip(batch["q_lens"], batch["seq_lens"], strict=True)
        ]
    case = random_paged_case(
        torch.Generator().manual_seed(seed), **batch, device=device
    )
    run_attention(backend, case)


@pytest.mark.task2_2
def test_distinct_blocks_match_dense(backend, device, gen):
    case = random_paged_case(
        gen, [17, 5, 32], [1, 5, 4], repeat_blocks=False, device=device
    )
    run_attention(backend, case)


@pytest.mark.task2_2
def test_shared_and_repeated_blocks(backend, device, gen):
    """Two sequences share their first two blocks (a fork); one table names a block twice."""
    case = random_paged_case(
        gen, [20, 20], [1, 1], block_size=8, repeat_blocks=False, device=device
    )
    shared = case.block_tables[0, :2].clone()
    # sequence 1 now reads sequence 0's first 16 tokens
    case.block_tables[1, :2] = shared
    # sequence 0's positions 16..19 read block `shared[0]`'s rows 0..3
    case.block_tables[0, 2] = shared[0]
    flat_k = case.k_cache.flatten(0, 1)  # [num_slots, num_kv_heads, head_dim]
    flat_v = case.v_cache.flatten(0, 1)
    # the oracle's contiguous K/V: read each position's slot by the formula
    for b in range(2):
        table = case.block_tables[b].tolist()
        slots = [table[pos // 8] * 8 + pos % 8 for pos in range(20)]
        case.keys[b], case.values[b] = flat_k[slots], flat_v[slots]
    out = run_attention(backend, case)
    assert torch.isfinite(out).all()


@pytest.mark.task2_2
def test_stale_slots_never_change_the_result(backend, device, gen):
    """Overwrite every slot past seq_len with other garbage: the output must not move a bit."""
    case = random_paged_case(
        gen, [13, 6, 9], [1, 6, 2], block_size=4, repeat_blocks=False, device=device
    )
    first = run_attention(backend, case)
    for b, seq_len in enumerate(case.seq_lens.tolist()):
        last = case.block_tables[b, (seq_len - 1) // 4]
        for cache in (case.k_cache, case.v_cache):
            # finite but huge: it would dominate any softmax
            cache[last, seq_len % 4 or 4 :] = 1e4
    second = backend.paged_attention(*case.args)
    assert torch.equal(first, second)


@pytest.mark.task2_2
@pytest.mark.parametrize("scale", [1.0, 0.05])
def test_scale_is_the_one_given(backend, device, gen, scale):
    case = random_paged_case(gen, [11, 7], [3, 7], device=device)
    case.scale = scale  # e.g. OPT scales inside its projection and passes 1.0
    run_attention(backend, case)


@pytest.mark.task2_2
def test_empty_batch(backend, device):
    k_cache = torch.randn(4, 8, 2, 32, device=device)
    query = torch.randn(0, 8, 32, device=device)
    out = backend.paged_attention(
        query,
        k_cache,
        k_cache.clone(),
        torch.empty(0, 3, dtype=torch.int32, device=device),
        torch.empty(0, dtype=torch.int32, device=device),
        torch.zeros(1, dtype=torch.int32, device=device),
        0.1,
    )
    assert out.shape == (0, 8, 32)


def strided(values: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """A view of `values` with stride 2, `other` in the gaps: a kernel that assumes stride 1 reads it."""
    view = torch.stack([values, other], dim=1)[:, 0]
    assert torch.equal(view, values) and view.stride(0) == 2
    return view


@pytest.mark.task2_2
@pytest.mark.parametrize(
    "which", ["block_tables", "seq_lens", "query_start_loc", "all"]
)
def test_metadata_of_any_strides(backend, device, gen, which):
    """The metadata may come as views: a column-major block table, every other element of a buffer.

    The reference indexes them like any tensor; a kernel must not assume they are contiguous. The
    gaps hold other valid values (a table padded with real blocks, lengths and offsets of other
    sequences), so a kernel that read the gaps would compute a wrong answer rather than fault.
    """
    # ascending: a gap's length is never past a table
    seq_lens = sorted(random_lens(gen, 4, 2, 40))
    case = random_paged_case(gen, seq_lens, [1, seq_lens[1], 2, 1], device=device)
    tables = case.block_tables
    # padding may name any block:
    # now every entry a wrong read could land on is a real block
    tables[tables < 0] = torch.randint(
        case.k_cache.shape[0], (int((tables < 0).sum()),), generator=gen
    ).to(device=device, dtype=torch.int32)
    expected = case.expected()
    if which in ("block_tables", "all"):
        # column-major: a row's entries num_seqs apart
        case.block_tables = tables.t().contiguous().t()
        assert case.block_tables.stride() == (1, tables.shape[0])
    if which in ("seq_lens", "all"):
        # the gaps: [s0, s0, s1, s1, ...]
        case.seq_lens = strided(case.seq_lens, case.seq_lens)
    if which in ("query_start_loc", "all"):
        case.query_start_loc = strided(case.query_start_loc, case.query_start_loc)
    out = run_attention(backend, case)
    torch.testing.assert_close(out, expected, **tolerance(case.dtype))


@pytest.mark.task2_2
@pytest.mark.parametrize("out_layout", ["none", "permuted", "sliced"])
def test_query_and_out_of_any_strides(backend, device, gen, out_layout):
    """A dense query whose head_dim is not its innermost dimension, and out buffers that are views.

    `out` like the query (permuted) cannot be written in place by a kernel that stores head_dim
    elements one apart; a slice of a wider buffer can. Either way the buffer given is the one returned.
    """
    case = random_paged_case(gen, [21, 9, 14], [1, 9, 5], device=device)
    expected, query = case.expected(), case.query
    # dense, strides (H, 1, T*H)
    case.query = query.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert case.query.stride(2) != 1 and torch.equal(case.query, query)
    # a new buffer: row-major whatever the query's strides
    fresh = backend.paged_attention(*case.args)
    torch.testing.assert_close(fresh, expected, **tolerance(case.dtype))
    if out_layout == "none":
        run_attention(backend, case)  # out=full_like(query): the permuted strides again
        return
    rows, heads, dim = case.query.shape
    if out_layout == "permuted":
        buffer = torch.full((dim, rows, heads), math.nan, device=device)
        out = buffer.permute(1, 2, 0)  # head_dim elements rows * heads apart
    else:
        buffer = torch.full((rows, heads + 3, dim + 5), math.nan, device=device)
        # head_dim elements one apart, rows and heads wider
        out = buffer[:, 1 : heads + 1, 2 : dim + 2]
    assert not out.is_contiguous()
    returned = backend.paged_attention(*case.args, out=out)
    assert returned is out
    torch.testing.assert_close(out, expected, **tolerance(case.dtype))
    out.fill_(0.0)
    assert buffer.isnan().sum() == buffer.numel() - out.numel(), (
        "nothing outside `out` is written"
    )


# ---- write_kv: writing through the table -----------------------------------------------------------


def random_pool(
    gen: torch.Generator,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    return (
        torch.randn(num_blocks, block_size, 2, 16, generator=gen).to(dtype).to(device)
    )


def check_written(
    before: torch.Tensor, after: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor
) -> None:
    """Slot slots[i] of `after` holds rows[i] exactly where slots[i] >= 0; every other slot is unchanged."""
    expected = before.flatten(0, 1).clone()  # [num_slots, num_kv_heads, head_dim]
    keep = slots >= 0
    expected[slots[keep]] = rows[keep]
    assert torch.equal(bits(after.flatten(0, 1)), bits(expected))


@pytest.mark.task2_1
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_write_kv_stores_each_row_at_its_slot(backend, device, gen, dtype, block_size):
    k_cache, v_cache = (
        random_pool(gen, 6, block_size, dtype, device) for _ in range(2)
    )
    k_before, v_before = k_cache.clone(), v_cache.clone()
    num_tokens = 5
    slots = torch.randperm(6 * block_size, generator=gen)[:num_tokens]
    slots[1] = -1  # a padding token: skipped
    slots = slots.to(device)
    key = torch.randn(num_tokens, 2, 16, generator=gen).to(dtype).to(device)
    value = torch.randn(num_tokens, 2, 16, generator=gen).to(dtype).to(device)
    backend.write_kv(key, value, k_cache, v_cache, slots)
    check_written(k_before, k_cache, key, slots)
    check_written(v_before, v_cache, value, slots)


@pytest.mark.task2_1
def test_write_kv_takes_views_of_a_fused_qkv(backend, device, gen):
    # [num_tokens, q|k|v, num_kv_heads, head_dim]
    qkv = torch.randn(7, 3, 2, 16, generator=gen).to(device)
    # non-contiguous views, as a fused projection gives them
    _, key, value = qkv.unbind(1)
    assert not key.is_contiguous()
    k_cache, v_cache = (random_pool(gen, 4, 4, torch.float32, device) for _ in range(2))
    k_before, v_before = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([3, 4, 5, 6, -1, 12, 0], device=device)
    backend.write_kv(key, value, k_cache, v_cache, slots)
    check_written(k_before, k_cache, key, slots)
    check_written(v_before, v_cache, value, slots)


@pytest.mark.task2_1
def test_write_kv_takes_a_strided_slot_mapping(backend, device, gen):
    """slot_mapping as a view with stride 2; the gaps hold -1 and other tokens' slots, never its own."""
    k_cache, v_cache = (random_pool(gen, 5, 4, torch.float32, device) for _ in range(2))
    k_before, v_before = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([7, -1, 2, 19, 11, 0], device=device)
    # [7, -1, -1, 7, 2, -1, ...] if read flat
    gaps = torch.tensor([-1, 7, -1, 2, -1, 11], device=device)
    key = torch.randn(6, 2, 16, generator=gen).to(device)
    value = torch.randn(6, 2, 16, generator=gen).to(device)
    view = torch.stack([slots, gaps], dim=1)[:, 0]
    assert torch.equal(view, slots) and view.stride(0) == 2
    backend.write_kv(key, value, k_cache, v_cache, view)
    check_written(k_before, k_cache, key, slots)
    check_written(v_before, v_cache, value, slots)


@pytest.mark.task2_1
def test_write_kv_all_padding_changes_nothing(backend, device, gen):
    k_cache, v_cache = (random_pool(gen, 3, 4, torch.float16, device) for _ in range(2))
    k_before = bits(k_cache)
    key = torch.randn(3, 2, 16, generator=gen).half().to(device)
    backend.write_kv(
        key, key.clone(), k_cache, v_cache, torch.full((3,), -1, device=device)
    )
    assert torch.equal(bits(k_cache), k_before)


@pytest.mark.task2_2  # needs write_kv (task 2.1) and paged attention (task 2.2)
def test_write_then_attend_through_block_tables(backend, device, gen):
    """The two halves together: a prefill's K/V written through its slots is what attention reads."""
    from minipaged.reference.block_table import BlockTable, block_tables_tensor

    num_blocks, block_size = 8, 4
    # unwritten slots: NaN
    k_cache = torch.full((num_blocks, block_size, 2, 16), math.nan, device=device)
    v_cache = torch.full_like(k_cache, math.nan)
    free = [6, 1, 4, 0, 7, 2]
    tables = [BlockTable(block_size), BlockTable(block_size)]
    lens = [7, 10]
    keys, values = [], []
    for table, n in zip(tables, lens, strict=True):
        # the blocks a prefill of n tokens takes (task 1.3 does this for the engine)
        table.block_ids += [free.pop() for _ in range(-(-n // block_size))]
        table.num_tokens = n
        key = torch.randn(n, 2, 16, generator=gen).to(device)
        value = torch.randn(n, 2, 16, generator=gen).to(device)
        backend.write_kv(
            key,
            value,
            k_cache,
            v_cache,
            torch.tensor(last_slots(table, n), device=device),
        )
        keys.append(key)
        values.append(value)
    query = torch.randn(sum(lens), 4, 16, generator=gen).to(device)
    case = PagedCase(
        query=query,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables_tensor(tables, max_blocks=4).to(device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, 7, 17], dtype=torch.int32, device=device),
        scale=0.25,
        keys=keys,
        values=values,
    )
    run_attention(backend, case)


# ---- copy_blocks and swap_blocks ---------------------------------------------------------------------


def poisoned_pool(
    gen: torch.Generator, num_blocks: int, dtype: torch.dtype, device="cpu"
) -> torch.Tensor:
    """A random pool with some NaN and inf in it: byte-exact copies must carry those too."""
    pool = torch.randn(num_blocks, 4, 2, 8, generator=gen)
    pool[0, 0, 0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    return pool.to(dtype).to(device)


@pytest.mark.task2_4
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_copy_blocks_in_every_layer(backend, device, gen, dtype):
    num_layers, num_blocks = 3, 10
    k_caches = [
        poisoned_pool(gen, num_blocks, dtype, device) for _ in range(num_layers)
    ]
    v_caches = [
        poisoned_pool(gen, num_blocks, dtype, device) for _ in range(num_layers)
    ]
    before = [(k.clone(), v.clone()) for k, v in zip(k_caches, v_caches, strict=True)]
    # a source copied twice is fine
    mapping = torch.tensor([[0, 7], [3, 5], [0, 9], [2, 4]], device=device)
    backend.copy_blocks(k_caches, v_caches, mapping)
    for layer in range(num_layers):
        for after, old in zip(
            (k_caches[layer], v_caches[layer]), before[layer], strict=True
        ):
            expected = old.clone()
            expected[mapping[:, 1]] = old[mapping[:, 0]]
            assert torch.equal(bits(after), bits(expected)), f"layer {layer}"


@pytest.mark.task2_4
def test_copy_blocks_with_no_pairs_changes_nothing(backend, device, gen):
    k_caches = [poisoned_pool(gen, 4, torch.float32, device)]
    v_caches = [poisoned_pool(gen, 4, torch.float32, device)]
    before = bits(k_caches[0])
    backend.copy_blocks(
        k_caches, v_caches, torch.empty(0, 2, dtype=torch.int64, device=device)
    )
    assert torch.equal(bits(k_caches[0]), before)


@pytest.mark.task2_4
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_swap_blocks_moves_whole_blocks(backend, gen, dtype):
    # pools of different sizes
    src, dst = poisoned_pool(gen, 10, dtype), poisoned_pool(gen, 6, dtype)
    src_before, dst_before = bits(src), dst.clone()
    mapping = torch.tensor([[9, 0], [0, 3], [4, 5]])
    backend.swap_blocks(src, dst, mapping)
    expected = dst_before.clone()
    expected[mapping[:, 1]] = src[mapping[:, 0]]
    assert torch.equal(bits(dst), bits(expected))
    assert torch.equal(bits(src), src_before), "swap_blocks must not change its source"


@pytest.mark.task2_4
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_swap_round_trip_is_byte_identical(backend, gen, dtype):
    """Device -> host -> device, into other blocks: every byte comes back (on CUDA when there is one)."""
    # every backend's swap crosses to the host
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for _layer in range(2):
        device_pool = poisoned_pool(gen, 8, dtype, device)
        host_pool = poisoned_pool(gen, 5, dtype)
        original = bits(device_pool[torch.tensor([1, 2, 6], device=device)])
        # swap out
        backend.swap_blocks(
            device_pool, host_pool, torch.tensor([[1, 4], [2, 0], [6, 2]])
        )
        backend.swap_blocks(
            host_pool, device_pool, torch.tensor([[4, 3], [0, 7], [2, 0]])
        )  # swap in elsewhere
        back = bits(device_pool[torch.tensor([3, 7, 0], device=device)])
        assert torch.equal(back, original)
