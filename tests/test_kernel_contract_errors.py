"""The kernel contract's input checks, on every backend: each bad argument gets a ValueError that names it.

Each case starts from valid arguments, breaks one, and checks the message. A tensor on the "meta"
device stands in for "a tensor on another device", so the device checks run on a machine without a
GPU too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from minipaged.backend import available_backends, get_backend
from minipaged.testing import device_for

I32, I64 = torch.int32, torch.int64


@pytest.fixture(params=available_backends())
def backend(request):
    return get_backend(request.param)


def on_meta(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(tensor, device="meta")


# ---- write_kv --------------------------------------------------------------------------------------


def write_kv_args() -> dict:
    """Valid: 3 tokens, pools of 4 blocks x 4 slots, 2 KV heads of 8."""
    return {
        "key": torch.randn(3, 2, 8),
        "value": torch.randn(3, 2, 8),
        "k_cache": torch.randn(4, 4, 2, 8),
        "v_cache": torch.randn(4, 4, 2, 8),
        "slot_mapping": torch.tensor([5, -1, 15]),
    }


WRITE_KV_ERRORS: list[tuple[str, Callable[[dict], dict], str]] = [
    ("key not a tensor", lambda a: {**a, "key": a["key"].tolist()}, r"key must be a torch\.Tensor"),
    ("key 2-d", lambda a: {**a, "key": a["key"][0]}, r"key must have shape \[num_tokens, num_kv_heads=2, head_dim=8\]"),
    ("key heads", lambda a: {**a, "key": torch.randn(3, 4, 8)}, r"key must have shape .* to match k_cache, got \(3, 4, 8\)"),
    ("key dtype", lambda a: {**a, "key": a["key"].half()}, r"key must have dtype torch\.float32, got torch\.float16"),
    ("key device", lambda a: {**a, "key": on_meta(a["key"])}, r"key must be on the device of k_cache \(cpu\), got meta"),
    ("value tokens", lambda a: {**a, "value": torch.randn(2, 2, 8)}, r"value must have the shape of key \(3, 2, 8\)"),
    ("value dtype", lambda a: {**a, "value": a["value"].double()}, r"value must have dtype torch\.float32"),
    ("k_cache 3-d", lambda a: {**a, "k_cache": a["k_cache"][0]}, r"k_cache must have shape \[num_blocks, block_size"),
    ("k_cache dtype", lambda a: {**a, "k_cache": a["k_cache"].double()}, r"k_cache must have dtype torch\.float32 or torch\.float16 or torch\.bfloat16, got torch\.float64"),
    ("v_cache shape", lambda a: {**a, "v_cache": torch.randn(5, 4, 2, 8)}, r"v_cache must have the shape of k_cache \(4, 4, 2, 8\), got \(5, 4, 2, 8\)"),
    ("v_cache dtype", lambda a: {**a, "v_cache": a["v_cache"].half()}, r"v_cache must have dtype torch\.float32, got torch\.float16"),
    ("v_cache device", lambda a: {**a, "v_cache": on_meta(a["v_cache"])}, r"v_cache must be on the device of k_cache"),
    ("slots int32", lambda a: {**a, "slot_mapping": a["slot_mapping"].int()}, r"slot_mapping must have dtype torch\.int64, got torch\.int32"),
    ("slots length", lambda a: {**a, "slot_mapping": torch.tensor([1, 2])}, r"slot_mapping must have shape \[num_tokens=3\], got \(2,\)"),
    ("slots 2-d", lambda a: {**a, "slot_mapping": a["slot_mapping"][None]}, r"slot_mapping must have shape \[num_tokens=3\]"),
    ("slots device", lambda a: {**a, "slot_mapping": on_meta(a["slot_mapping"])}, r"slot_mapping must be on the device of k_cache"),
    ("slot past pool", lambda a: {**a, "slot_mapping": torch.tensor([5, -1, 16])}, r"slot_mapping must hold -1 \(skip\) or slots in \[0, 16\), got \[5, -1, 16\]"),
    ("slot -2", lambda a: {**a, "slot_mapping": torch.tensor([5, -2, 1])}, r"slot_mapping must hold -1 \(skip\) or slots in \[0, 16\)"),
    ("slot twice", lambda a: {**a, "slot_mapping": torch.tensor([5, 5, -1])}, r"slot_mapping must not name a slot twice, got \[5, 5, -1\]"),
]  # fmt: skip


@pytest.mark.parametrize(
    "mutate, message",
    [c[1:] for c in WRITE_KV_ERRORS],
    ids=[c[0] for c in WRITE_KV_ERRORS],
)
def test_write_kv_rejects(backend, mutate, message):
    args = mutate(write_kv_args())
    with pytest.raises(ValueError, match=message):
        backend.write_kv(*args.values())


def test_write_kv_rejection_leaves_the_pool_alone(backend):
    args = write_kv_args()
    args["slot_mapping"] = torch.tensor([5, 5, -1])
    before = args["k_cache"].clone()
    with pytest.raises(ValueError):
        backend.write_kv(*args.values())
    assert torch.equal(args["k_cache"], before), "checks run before any write"


# ---- paged_attention ---------------------------------------------------------------------------------


def attention_args() -> dict:
    """Valid: 2 sequences (decode of 6 tokens, prefill of 3) over 5 blocks of 4; 4 query heads, 2 KV heads of 8."""
    return {
        "query": torch.randn(4, 4, 8),
        "k_cache": torch.randn(5, 4, 2, 8),
        "v_cache": torch.randn(5, 4, 2, 8),
        "block_tables": torch.tensor([[3, 0, -1], [4, -1, -1]], dtype=I32),
        "seq_lens": torch.tensor([6, 3], dtype=I32),
        "query_start_loc": torch.tensor([0, 1, 4], dtype=I32),
        "scale": 0.35,
        "out": None,
    }


def call_attention(backend, args: dict) -> torch.Tensor:
    out = args.pop("out")
    return backend.paged_attention(*args.values(), out=out)


ATTENTION_ERRORS: list[tuple[str, Callable[[dict], dict], str]] = [
    ("query 2-d", lambda a: {**a, "query": a["query"][0]}, r"query must have shape \[num_q_tokens, num_heads, head_dim=8\]"),
    ("query head_dim", lambda a: {**a, "query": torch.randn(4, 4, 16)}, r"query must have shape .* to match k_cache, got \(4, 4, 16\)"),
    ("query heads", lambda a: {**a, "query": torch.randn(4, 3, 8)}, r"query's num_heads must be a positive multiple of num_kv_heads=2, got 3"),
    ("query dtype", lambda a: {**a, "query": a["query"].half()}, r"query must have dtype torch\.float32, got torch\.float16"),
    ("query device", lambda a: {**a, "query": on_meta(a["query"])}, r"query must be on the device of k_cache"),
    ("cache dtype", lambda a: {**a, "k_cache": a["k_cache"].half(), "v_cache": a["v_cache"].half()}, r"query must have dtype torch\.float16"),
    ("v_cache shape", lambda a: {**a, "v_cache": a["v_cache"][:4]}, r"v_cache must have the shape of k_cache"),
    ("tables int64", lambda a: {**a, "block_tables": a["block_tables"].long()}, r"block_tables must have dtype torch\.int32, got torch\.int64"),
    ("tables 1-d", lambda a: {**a, "block_tables": a["block_tables"][0]}, r"block_tables must have shape \[num_seqs, max_blocks\]"),
    ("tables device", lambda a: {**a, "block_tables": on_meta(a["block_tables"])}, r"block_tables must be on the device of k_cache"),
    ("block past pool", lambda a: {**a, "block_tables": torch.tensor([[3, 5, -1], [4, -1, -1]], dtype=I32)}, r"block_tables must name blocks in \[0, 5\) for every block a sequence reads, got \[5\]"),
    ("-1 inside a table", lambda a: {**a, "block_tables": torch.tensor([[3, -1, -1], [4, -1, -1]], dtype=I32)}, r"block_tables must name blocks in \[0, 5\) .* got \[-1\]"),
    ("seq_lens int64", lambda a: {**a, "seq_lens": a["seq_lens"].long()}, r"seq_lens must have dtype torch\.int32"),
    ("seq_lens length", lambda a: {**a, "seq_lens": torch.tensor([6], dtype=I32)}, r"seq_lens must have shape \[num_seqs=2\], got \(1,\)"),
    ("seq_lens device", lambda a: {**a, "seq_lens": on_meta(a["seq_lens"])}, r"seq_lens must be on the device of k_cache"),
    ("seq_len past table", lambda a: {**a, "seq_lens": torch.tensor([13, 3], dtype=I32)}, r"seq_lens must be in \[0, 12\] \(max_blocks=3 x block_size=4\), got \[13, 3\]"),
    ("seq_len negative", lambda a: {**a, "seq_lens": torch.tensor([-1, 3], dtype=I32), "query_start_loc": torch.tensor([0, 0, 4], dtype=I32)}, r"seq_lens must be in \[0, 12\]"),
    ("starts int64", lambda a: {**a, "query_start_loc": a["query_start_loc"].long()}, r"query_start_loc must have dtype torch\.int32"),
    ("starts length", lambda a: {**a, "query_start_loc": torch.tensor([0, 4], dtype=I32)}, r"query_start_loc must have shape \[num_seqs \+ 1 = 3\], got \(2,\)"),
    ("starts device", lambda a: {**a, "query_start_loc": on_meta(a["query_start_loc"])}, r"query_start_loc must be on the device of k_cache"),
    ("starts not at 0", lambda a: {**a, "query_start_loc": torch.tensor([1, 1, 4], dtype=I32)}, r"query_start_loc must start at 0 and end at num_q_tokens=4, got \[1, 1, 4\]"),
    ("starts short end", lambda a: {**a, "query_start_loc": torch.tensor([0, 1, 3], dtype=I32)}, r"query_start_loc must start at 0 and end at num_q_tokens=4"),
    ("starts decreasing", lambda a: {**a, "query_start_loc": torch.tensor([0, 5, 4], dtype=I32), "seq_lens": torch.tensor([6, 6], dtype=I32), "block_tables": torch.tensor([[3, 0, -1], [4, 1, -1]], dtype=I32)}, r"query_start_loc must be non-decreasing, got \[0, 5, 4\]"),
    ("q_len > seq_len", lambda a: {**a, "query_start_loc": torch.tensor([0, 0, 4], dtype=I32)}, r"query_start_loc gives sequence 1 q_len=4 query rows but seq_lens\[1\]=3: q_len must be <= seq_len"),
    ("scale zero", lambda a: {**a, "scale": 0.0}, r"scale must be a positive finite float, got 0\.0"),
    ("scale nan", lambda a: {**a, "scale": math.nan}, r"scale must be a positive finite float, got nan"),
    ("scale string", lambda a: {**a, "scale": "0.35"}, r"scale must be a positive finite float, got '0\.35'"),
    ("scale bool", lambda a: {**a, "scale": True}, r"scale must be a positive finite float, got True"),
    ("scale tensor", lambda a: {**a, "scale": torch.tensor(0.35)}, r"scale must be a positive finite float"),
    ("out shape", lambda a: {**a, "out": torch.empty(4, 4, 4)}, r"out must have the shape of query \(4, 4, 8\), got \(4, 4, 4\)"),
    ("out dtype", lambda a: {**a, "out": torch.empty(4, 4, 8, dtype=torch.bfloat16)}, r"out must have dtype torch\.float32, got torch\.bfloat16"),
    ("out device", lambda a: {**a, "out": torch.empty(4, 4, 8, device="meta")}, r"out must be on the device of k_cache"),
]  # fmt: skip


@pytest.mark.parametrize(
    "mutate, message",
    [c[1:] for c in ATTENTION_ERRORS],
    ids=[c[0] for c in ATTENTION_ERRORS],
)
def test_paged_attention_rejects(backend, mutate, message):
    args = mutate(attention_args())
    with pytest.raises(ValueError, match=message):
        call_attention(backend, args)


def to(args: dict, device: torch.device) -> dict:
    return {
        k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()
    }


def test_valid_arguments_pass(backend):
    """The base of every case above is valid, so each error comes from the one broken argument.

    (On the backend's own device: the Triton backend on a GPU machine takes CUDA tensors; the cases
    above fail their checks before that matters.)
    """
    device = device_for(backend.name)
    assert call_attention(backend, to(attention_args(), device)).shape == (4, 4, 8)
    backend.write_kv(*to(write_kv_args(), device).values())
    caches = (
        [torch.randn(6, 4, 2, 8, device=device)],
        [torch.randn(6, 4, 2, 8, device=device)],
    )
    backend.copy_blocks(*caches, torch.tensor([[0, 1]], device=device))
    backend.swap_blocks(
        torch.randn(6, 4, 2, 8), torch.randn(3, 4, 2, 8), torch.tensor([[5, 2]])
    )


@pytest.mark.skipif(
    "triton" not in available_backends(), reason="triton is not installed"
)
def test_triton_refuses_cpu_tensors_without_its_interpreter(monkeypatch):
    """CPU tensors with Triton's interpreter off (a GPU machine's state): a ValueError naming the argument.

    TRITON_INTERPRET is what the launchers consult, so setting it to 0 here puts them in that state
    on any machine; every check runs before a kernel would.
    """
    backend = get_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cuda = r"must be on a CUDA device for the Triton backend, got cpu: .*set TRITON_INTERPRET=1 before triton"
    with pytest.raises(ValueError, match=r"k_cache " + cuda):
        call_attention(backend, attention_args())
    with pytest.raises(ValueError, match=r"k_cache " + cuda):
        backend.write_kv(*write_kv_args().values())
    with pytest.raises(ValueError, match=r"k_caches and v_caches " + cuda):
        backend.copy_blocks(*copy_args().values())


# ---- copy_blocks and swap_blocks ---------------------------------------------------------------------


def copy_args() -> dict:
    """Valid: two layers of 6 blocks, pairs (0 -> 1), (2 -> 5)."""
    return {
        "k_caches": [torch.randn(6, 4, 2, 8) for _ in range(2)],
        "v_caches": [torch.randn(6, 4, 2, 8) for _ in range(2)],
        "block_mapping": torch.tensor([[0, 1], [2, 5]]),
    }


COPY_ERRORS: list[tuple[str, Callable[[dict], dict], str]] = [
    ("a tensor not a list", lambda a: {**a, "k_caches": a["k_caches"][0]}, r"k_caches and v_caches must be lists of per-layer pools, got Tensor and list"),
    ("no layers", lambda a: {**a, "k_caches": [], "v_caches": []}, r"k_caches and v_caches must list the same number \(>= 1\) of layers, got 0 and 0"),
    ("layer counts", lambda a: {**a, "v_caches": a["v_caches"][:1]}, r"must list the same number \(>= 1\) of layers, got 2 and 1"),
    ("layer sizes", lambda a: {**a, "k_caches": [a["k_caches"][0], torch.randn(7, 4, 2, 8)], "v_caches": [a["v_caches"][0], torch.randn(7, 4, 2, 8)]}, r"k_caches\[1\] must have k_caches\[0\]'s 6 blocks on cpu, got 7 on cpu"),
    ("layer dtype", lambda a: {**a, "v_caches": [a["v_caches"][0], a["v_caches"][1].half()]}, r"v_caches\[1\] must have dtype torch\.float32, got torch\.float16"),
    ("mapping 3 columns", lambda a: {**a, "block_mapping": torch.tensor([[0, 1, 2]])}, r"block_mapping must have shape \[n, 2\] of \(src, dst\) block ids, got \(1, 3\)"),
    ("mapping 1-d", lambda a: {**a, "block_mapping": torch.tensor([0, 1])}, r"block_mapping must have shape \[n, 2\]"),
    ("mapping int32", lambda a: {**a, "block_mapping": a["block_mapping"].int()}, r"block_mapping must have dtype torch\.int64, got torch\.int32"),
    ("mapping device", lambda a: {**a, "block_mapping": on_meta(a["block_mapping"])}, r"block_mapping must be on the device of k_caches\[0\] \(cpu\), got meta"),
    ("src past pool", lambda a: {**a, "block_mapping": torch.tensor([[6, 1]])}, r"block_mapping sources must be block ids in \[0, 6\), got \[6\]"),
    ("dst negative", lambda a: {**a, "block_mapping": torch.tensor([[0, -1]])}, r"block_mapping destinations must be block ids in \[0, 6\), got \[-1\]"),
    ("dst twice", lambda a: {**a, "block_mapping": torch.tensor([[0, 1], [2, 1]])}, r"block_mapping must name each destination block once, got \[1, 1\]"),
    ("dst is a src", lambda a: {**a, "block_mapping": torch.tensor([[0, 1], [1, 2]])}, r"block_mapping must not copy into a block it copies from, got \[\[0, 1\], \[1, 2\]\]"),
]  # fmt: skip


@pytest.mark.parametrize(
    "mutate, message", [c[1:] for c in COPY_ERRORS], ids=[c[0] for c in COPY_ERRORS]
)
def test_copy_blocks_rejects(backend, mutate, message):
    args = mutate(copy_args())
    with pytest.raises(ValueError, match=message):
        backend.copy_blocks(*args.values())


def swap_args() -> dict:
    """Valid: a device pool of 6 blocks to a host pool of 3, pairs (5 -> 0), (1 -> 2)."""
    return {
        "src": torch.randn(6, 4, 2, 8),
        "dst": torch.randn(3, 4, 2, 8),
        "block_mapping": torch.tensor([[5, 0], [1, 2]]),
    }


SWAP_ERRORS: list[tuple[str, Callable[[dict], dict], str]] = [
    ("src 3-d", lambda a: {**a, "src": a["src"][0]}, r"src must have shape \[num_blocks, block_size, num_kv_heads, head_dim\]"),
    ("dst dtype", lambda a: {**a, "dst": a["dst"].half()}, r"dst must hold blocks like src \(torch\.float32, block shape \(4, 2, 8\)\), got torch\.float16"),
    ("dst block shape", lambda a: {**a, "dst": torch.randn(3, 8, 2, 8)}, r"dst must hold blocks like src .* block shape \(8, 2, 8\)"),
    ("int64 pools", lambda a: {**a, "src": a["src"].long(), "dst": a["dst"].long()}, r"src must have dtype torch\.float32 or torch\.float16 or torch\.bfloat16, got torch\.int64"),
    ("mapping off the CPU", lambda a: {**a, "block_mapping": on_meta(a["block_mapping"])}, r"block_mapping must be on the CPU \(cpu\), got meta"),
    ("src past its pool", lambda a: {**a, "block_mapping": torch.tensor([[6, 0]])}, r"block_mapping sources must be block ids in \[0, 6\)"),
    ("dst past its pool", lambda a: {**a, "block_mapping": torch.tensor([[5, 3]])}, r"block_mapping destinations must be block ids in \[0, 3\), got \[3\]"),
    ("dst twice", lambda a: {**a, "block_mapping": torch.tensor([[5, 0], [1, 0]])}, r"block_mapping must name each destination block once"),
]  # fmt: skip


@pytest.mark.parametrize(
    "mutate, message", [c[1:] for c in SWAP_ERRORS], ids=[c[0] for c in SWAP_ERRORS]
)
def test_swap_blocks_rejects(backend, mutate, message):
    args = mutate(swap_args())
    with pytest.raises(ValueError, match=message):
        backend.swap_blocks(*args.values())
