"""Compile every Triton kernel of minipaged/fast for a GPU, on a machine without one.

Triton compiles ahead of time for a named target: Python -> Triton IR -> GPU IR -> LLVM IR -> PTX ->
cubin (through the ptxas that ships with triton), and none of those steps needs the GPU itself. So
this script catches what the interpreter cannot: a tl.dot tile too small for the tensor cores, a
loop-carried value that changes type, a shape the compiler rejects. It also prints what the compiler
reports about each kernel (shared memory, warps), the report METHOD-style tuning reads first.

Each configuration compiles twice. `plain`: every integer argument an i32 and no pointer alignment
known, the most general code. `launch`: the specialization a real launch at a Llama-like shape gets
(32 query heads or 8 x group, 8 KV heads, blocks of 16, 16-byte-aligned tensors): Triton marks each
pointer and each integer divisible by 16 as such (tt.divisibility, which lets it vectorize loads) and
makes an integer equal to 1 a compile-time constant. The specialization is worked out by Triton's own
function (triton.runtime.jit.native_specialize_impl) on representative argument values, so it is
the one a launch with those values compiles, not a guess; other shapes give other specializations,
which this does not compile.

    python benchmarks/compile_kernels.py              # sm_90 (H100/H200) and sm_80 (A100), every config
    python benchmarks/compile_kernels.py --arch 90 --quick

The kernels are loaded from their files (not through minipaged.fast, which refuses to import on a
machine with no GPU and no interpreter), and TRITON_INTERPRET must be unset or 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit(
        "compile_kernels.py compiles for a GPU: run it with TRITON_INTERPRET unset (or 0)"
    )

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend

# triton's own per-argument specialization (3.4+);
# without it only the plain variants compile
try:
    from triton.runtime.jit import native_specialize_impl
except ImportError:  # pragma: no cover - older or newer triton
    native_specialize_impl = None

ROOT = Path(__file__).resolve().parent.parent
FAST = ROOT / "minipaged" / "fast"
sys.path.insert(0, str(ROOT))  # cache_ops imports minipaged.reference.validation


def _load(name: str):
    """A module of minipaged/fast by its file, without the package's import-time device check."""
    spec = importlib.util.spec_from_file_location(
        f"_minipaged_fast_{name}", FAST / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _signature(
    fn, pointers: dict[str, str], floats: set[str], constexprs: dict
) -> dict[str, str]:
    """Each argument's type for ASTSource: pointers typed, floats fp32, constexprs, the rest i32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


TORCH_DTYPES = {"*fp32": torch.float32, "*fp16": torch.float16, "*bf16": torch.bfloat16}
TORCH_DTYPES |= {"*i32": torch.int32, "*i64": torch.int64}


def _launch_variant(
    fn, pointers: dict[str, str], values: dict[str, Any], constexprs: dict, backend
):
    """(signature, constexprs, attrs) as a launch with these argument values specializes the kernel.

    `values` holds every non-pointer runtime argument; pointers are given 16-byte-aligned tensors of
    their type (every allocation is). This is what JITFunction.run does before it compiles.
    """
    sig, consts, attrs = {}, dict(constexprs), {}
    for index, param in enumerate(fn.params):
        name = param.name
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        value = (
            torch.empty(64, dtype=TORCH_DTYPES[pointers[name]])
            if name in pointers
            else values[name]
        )
        kind, attr = native_specialize_impl(
            backend,
            value,
            param.is_const,
            not param.do_not_specialize,
            not param.do_not_specialize_on_alignment,
        )
        if kind == "constexpr":  # an integer equal to 1 becomes a compile-time constant
            sig[name], consts[name] = "constexpr", value
            continue
        sig[name] = kind
        if isinstance(attr, str):
            attrs[(index,)] = backend.parse_attr(attr)  # "D": [["tt.divisibility", 16]]
    return sig, consts, attrs


# the launch variants' shape: tables of up to 4,112 tokens
NUM_KV_HEADS, BLOCK_SIZE, TABLE_WIDTH = 8, 16, 257


def attention_configs(quick: bool):
    """(label, kernel, pointer types, constexprs, launch values) for the decode, merge and prefill kernels.

    The launch values are the other arguments of a launch at a Llama-like shape (num_heads = 8 x group).
    """
    decode, prefill = _load("decode"), _load("prefill")
    import triton.language as tl

    dtypes = ["fp16"] if quick else ["fp32", "fp16", "bf16"]
    head_dims = [128] if quick else [64, 80, 128]
    groups = [4] if quick else [1, 4, 8]
    for dt in dtypes:
        for head_dim in head_dims:
            block_d = max(16, triton.next_power_of_2(head_dim))
            common = {
                "DOT_DTYPE": getattr(
                    tl, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dt]
                ),
                "DOT_PRECISION": "ieee" if dt == "fp32" else "tf32",
            }
            for group in groups:
                num_heads = NUM_KV_HEADS * group
                # query and out: row-major
                rows = {"stride_qt": num_heads * head_dim, "stride_qh": head_dim}
                rows |= {
                    "stride_ot": num_heads * head_dim,
                    "stride_oh": head_dim,
                    "stride_bt": TABLE_WIDTH,
                }
                shape = {
                    "num_kv_heads": NUM_KV_HEADS,
                    "head_dim": head_dim,
                    "scale": head_dim**-0.5,
                }
                shape |= {"block_size": BLOCK_SIZE}
                for split in (False, True):
                    ptrs = {
                        n: f"*{dt}"
                        for n in ("query_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")
                    }
                    ptrs |= {"partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32"}
                    ptrs |= {
                        n: "*i32"
                        for n in (
                            "block_tables_ptr",
                            "seq_lens_ptr",
                            "decode_seqs_ptr",
                            "decode_rows_ptr",
                        )
                    }
                    consts = {
                        "GROUP": group,
                        "BLOCK_H": max(16, triton.next_power_of_2(group)),
                        "BLOCK_N": decode.DECODE_BLOCK_N,
                        "BLOCK_D": block_d,
                        "SPLIT": split,
                        **common,
                    }
                    chunks = (
                        {"tokens_per_split": 256, "num_splits": 16} if split else {}
                    )
                    # 1: a constant then
                    chunks = chunks or {"tokens_per_split": 4096, "num_splits": 1}
                    yield (
                        f"decode {dt} d={head_dim} group={group} split={split}",
                        decode._decode_split_kernel,
                        ptrs,
                        consts,
                        {**rows, **shape, "num_heads": num_heads, **chunks},
                    )
                ptrs = {
                    n: f"*{dt}"
                    for n in ("query_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")
                }
                ptrs |= {
                    n: "*i32"
                    for n in (
                        "block_tables_ptr",
                        "seq_lens_ptr",
                        "query_start_loc_ptr",
                        "prefill_seqs_ptr",
                    )
                }
                consts = {
                    "GROUP": group,
                    "BLOCK_M": prefill.PREFILL_BLOCK_M,
                    "BLOCK_N": prefill.PREFILL_BLOCK_N,
                    "BLOCK_D": block_d,
                    **common,
                }
                yield (
                    f"prefill {dt} d={head_dim} group={group}",
                    prefill._prefill_kernel,
                    ptrs,
                    consts,
                    {**rows, **shape},
                )
            ptrs = {
                "partial_out_ptr": "*fp32",
                "partial_lse_ptr": "*fp32",
                "out_ptr": f"*{dt}",
                "decode_rows_ptr": "*i32",
            }
            yield (
                f"merge {dt} d={head_dim}",
                decode._merge_splits_kernel,
                ptrs,
                {"BLOCK_SPLITS": 32, "BLOCK_D": triton.next_power_of_2(head_dim)},
                {
                    "stride_ot": 32 * head_dim,
                    "stride_oh": head_dim,
                    "num_heads": 32,
                    "head_dim": head_dim,
                }
                | {"num_splits": 20},  # 20 chunks: BLOCK_SPLITS 32
            )


def cache_op_configs(quick: bool):
    """(label, kernel, pointer types, constexprs, launch values) for write_kv and the block copies.

    write_kv's launch values are views of a fused QKV projection (32 query heads, 8 KV heads of 128).
    """
    ops = _load("cache_ops")
    for dt in ["fp16"] if quick else ["fp32", "fp16", "bf16"]:
        ptrs = {
            n: f"*{dt}" for n in ("key_ptr", "value_ptr", "k_cache_ptr", "v_cache_ptr")
        }
        ptrs["slot_mapping_ptr"] = "*i64"
        fused = {
            "stride_kt": 48 * 128,
            "stride_kh": 128,
            "stride_vt": 48 * 128,
            "stride_vh": 128,
        }
        values = {**fused, "num_kv_heads": NUM_KV_HEADS, "head_dim": 128}
        yield (
            f"write_kv {dt}",
            ops._write_kv_kernel,
            ptrs,
            {"BLOCK_H": 8, "BLOCK_D": 128},
            values,
        )
        for name in ("_copy_blocks_kernel", "_copy_rows_kernel"):
            kernel = getattr(ops, name)
            ptrs = {
                n: (
                    "*i64" if "rows" in n or "ptrs" in n or "mapping" in n else f"*{dt}"
                )
                for n in kernel.arg_names
                if n.endswith("_ptr")
            }
            consts = {n: ops.COPY_TILE for n in kernel.arg_names if n == "TILE"}
            consts |= (
                {
                    "DTYPE": getattr(
                        triton.language,
                        {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dt],
                    )
                }
                if "DTYPE" in kernel.arg_names
                else {}
            )
            block = {
                "block_numel": BLOCK_SIZE * NUM_KV_HEADS * 128,
                "row_size": BLOCK_SIZE * NUM_KV_HEADS * 128,
            }
            values = {n: v for n, v in block.items() if n in kernel.arg_names}
            yield f"{name.strip('_')} {dt}", kernel, ptrs, consts, values


def compile_all(archs: list[int], quick: bool) -> int:
    """Compile each config for each arch, plain and launch-specialized; one line each; the failures."""
    failures = 0
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        for label, kernel, ptrs, consts, values in [
            *attention_configs(quick),
            *cache_op_configs(quick),
        ]:
            variants = [
                ("plain", _signature(kernel, ptrs, {"scale"}, consts), consts, {})
            ]
            if native_specialize_impl is not None:
                variants.append(
                    ("launch", *_launch_variant(kernel, ptrs, values, consts, backend))
                )
            for variant, sig, constexprs, attrs in variants:
                start = time.perf_counter()
                try:
                    source = ASTSource(
                        fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs
                    )
                    compiled = triton.compile(source, target=target)
                # report every failing config, not only the first
                except Exception as error:
                    failures += 1
                    print(
                        f"sm_{arch} {label:<38} {variant:<6} FAILED: {type(error).__name__}: "
                        f"{str(error)[:300]}"
                    )
                    continue
                meta = compiled.metadata
                print(
                    # one line fits the docs' code column (docs/kernels/gpu-results.md)
                    f"sm_{arch} {label:<38} {variant:<6} ok shared={meta.shared:>6} B "
                    f"warps={meta.num_warps} {time.perf_counter() - start:5.1f} s"
                )
    if native_specialize_impl is None:
        print(
            "launch-specialized variants not compiled: this triton has no native_specialize_impl"
        )
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch",
        type=int,
        action="append",
        help="compute capability x10 (default: 90 and 80)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="one dtype, head_dim 128, group 4"
    )
    args = parser.parse_args(argv)
    failures = compile_all(args.arch or [90, 80], args.quick)
    print(f"{failures} failed" if failures else "all compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
