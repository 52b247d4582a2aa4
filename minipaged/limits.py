"""Up-front limits: check what the engine is asked for against what the machine has, before allocating.

OS idea: a kernel refuses an impossible request at the system call, with an error code, instead of
half-granting it and failing later: `mmap` of more than the address space returns ENOMEM, `open` of
a device that does not exist returns ENODEV (OSTEP ch. 13-14 on the memory API). KV counterpart:
vLLM sizes its pools from the memory it measures (`gpu_memory_utilization`) and refuses a
configuration that cannot fit before it loads the model's weights into the cache.

Every check here runs in `LLM.__init__` before the pools exist, and each error names the argument:
- `resolve_device`: "cpu" or "cuda[:N]", and CUDA must be there;
- `resolve_dtype`: the cache dtypes of the kernel contract (float32, float16, bfloat16);
- `check_pool_memory`: the device pool, the host swap space and the manager's per-block bookkeeping
  against the memory free on each, with both figures in the message.
"""

from __future__ import annotations

import os

import torch

# The block manager's Python bookkeeping per block (a free-list entry, a reference count, the
# block-table slots that point at it): a generous figure, so that a pool of 10**9 blocks is
# refused before its lists are built rather than killed by the out-of-memory killer.
BOOKKEEPING_BYTES_PER_BLOCK = 64

# What `dtype` may be: the kernel contract's cache dtypes, by torch name and by vLLM's names.
DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve_device(device: object) -> torch.device:
    """`device` as a torch.device, checked: "cpu", or "cuda"/"cuda:N" on a machine that has it.

    Raises:
        ValueError: naming `device`, for an unknown name, a device type minipaged does not run on
            (meta, mps, ...), or CUDA that torch cannot find.
    """
    if not isinstance(device, (str, torch.device)):
        raise TypeError(
            f"device must be a string such as 'cpu' or 'cuda', got {type(device).__name__}"
        )
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}"
        ) from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(
            f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}"
        )
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} but torch finds no CUDA device here: use device='cpu'"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return resolved


def resolve_dtype(dtype: object) -> torch.dtype | None:
    """`dtype` as a torch dtype the kernels support, or None for the model's own ("auto").

    Raises:
        ValueError: naming `dtype`, for a name or dtype outside float32, float16 and bfloat16
            (float64 and integer caches are not in the kernel contract).
        TypeError: naming `dtype`, for something that is neither a string nor a torch dtype.
    """
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(
                f"dtype must be one of {', '.join(DTYPES)} or a torch dtype, got {dtype!r}"
            )
        return DTYPES[dtype]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"dtype must be a torch dtype or its name, got {type(dtype).__name__}"
        )
    check_supported_dtype(dtype, "dtype")
    return dtype


def check_supported_dtype(dtype: torch.dtype, name: str) -> None:
    """Refuse a dtype the kernel contract has no cache for, naming where it came from."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{name} must be float32, float16 or bfloat16 (the KV cache dtypes the kernels support), "
            f"got {dtype}"
        )


def available_memory(device: torch.device) -> int | None:
    """Bytes free on `device` now: CUDA's free memory, or the host's available memory (None if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(num_bytes: float) -> str:
    """1536 -> '1.5 KiB': the figures in the errors below."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(num_bytes) < 1024 or unit == "PiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def check_pool_memory(
    num_gpu_blocks: int,
    num_cpu_blocks: int,
    bytes_per_block: int,
    device: torch.device,
    free_device: int | None = None,
    free_host: int | None = None,
) -> None:
    """Refuse pools that do not fit in the memory free now, before anything is allocated.

    The device pool holds num_gpu_blocks x bytes_per_block on `device`; the host swap space
    num_cpu_blocks x bytes_per_block in host memory; the block manager's lists about
    BOOKKEEPING_BYTES_PER_BLOCK per block of both, in host memory too. On a CPU device all three
    share the host's memory.

    Args:
        num_gpu_blocks: the device pool's size asked for, in blocks.
        num_cpu_blocks: the host swap space's size asked for, in blocks.
        bytes_per_block: K and V of one block in every layer (0 for a simulated runner, which
            allocates no tensors).
        device: where the device pool lives.
        free_device: the bytes free on a CUDA device (None: measured now); the tests pass small
            figures.
        free_host: the bytes available in host memory (None: measured now).

    Raises:
        ValueError: naming the argument, with the bytes needed and the bytes free.
    """
    host = torch.device("cpu")
    free_host = available_memory(host) if free_host is None else free_host
    bookkeeping = (num_gpu_blocks + num_cpu_blocks) * BOOKKEEPING_BYTES_PER_BLOCK
    device_bytes, host_bytes = (
        num_gpu_blocks * bytes_per_block,
        num_cpu_blocks * bytes_per_block,
    )
    if device.type == "cuda":
        free_device = available_memory(device) if free_device is None else free_device
        if free_device is not None and device_bytes > free_device:
            raise ValueError(
                f"num_gpu_blocks={num_gpu_blocks} needs {format_bytes(device_bytes)} of KV cache "
                f"({bytes_per_block} bytes a block) but {device} has {format_bytes(free_device)} free"
            )
        device_bytes = 0  # not on the host
    if free_host is None:
        return
    need = device_bytes + host_bytes + bookkeeping
    if need > free_host:
        raise ValueError(
            f"num_gpu_blocks={num_gpu_blocks} and num_cpu_blocks={num_cpu_blocks} need "
            f"{format_bytes(need)} of host memory ({bytes_per_block} bytes a block of KV cache plus "
            f"{BOOKKEEPING_BYTES_PER_BLOCK} of bookkeeping) but the host has {format_bytes(free_host)} "
            "available: ask for fewer blocks"
        )
