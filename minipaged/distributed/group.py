"""The tensor-parallel group: start the worker processes, or join the group torchrun made.

OS idea: a parent process forks workers and must reap them: it learns how each one ended (waitpid),
and a worker whose parent dies must not live on as an orphan (Linux's PR_SET_PDEATHSIG). KV
counterpart: vLLM paper section 4.6: one scheduler process drives N GPU workers. On one machine
minipaged starts the N - 1 workers itself (torch.multiprocessing, "spawn"); under `torchrun` every
rank is already running the same script, and the process group is made from its environment
(MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE), on one machine or several.

The distributed backend is gloo on the CPU and NCCL on CUDA: torch.distributed's own.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# how long a collective may wait for a rank before failing (a dead peer usually fails it at once)
TIMEOUT = datetime.timedelta(seconds=60)
JOIN_SECONDS = 10.0  # how long close() waits for a worker to exit before it is killed
_made_here = (
    False  # whether the default group is one that spawn_workers made (and not closed)
)


def launched_by_torchrun() -> bool:
    """True when this process is one rank of a group that someone else made: torchrun (its
    environment says so), or the caller, who made the default process group before the LLM."""
    if dist.is_initialized():
        return not _made_here
    return "TORCHELASTIC_RUN_ID" in os.environ or all(
        name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR")
    )


def backend_for(device: str | torch.device) -> str:
    """gloo for CPU tensors, NCCL for CUDA ones."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def join_torchrun_group(
    world_size: int, device: str | torch.device
) -> tuple[int, bool]:
    """Join (or find) the process group torchrun describes; returns (rank, whether we made it).

    Raises:
        ValueError: when the group's size is not `world_size`.
    """
    made = not dist.is_initialized()
    if made:
        dist.init_process_group(
            backend_for(device), init_method="env://", timeout=TIMEOUT
        )
    if dist.get_world_size() != world_size:
        raise ValueError(
            f"tensor_parallel_size={world_size}, but the torchrun group has "
            f"{dist.get_world_size()} ranks: run torchrun with --nproc-per-node={world_size}"
        )
    return dist.get_rank(), made


def spawn_workers(world_size: int, device, target, args: tuple) -> tuple[list, object]:
    """Start ranks 1 .. world_size - 1 as `target(rank, world_size, store address, errors,
    parent pid, *args)`, then make the group as rank 0. Returns (the processes, their error queue).

    Rank 0 serves the group's store (a TCPStore on this machine); each worker checks in there
    before joining, and rank 0 watches the workers while it waits, so one that dies while starting
    is reported at once, not after a timeout. The workers do not run the caller's script again
    (spawn would, without an `if __name__ == "__main__":` guard): the model they need comes pickled.

    Raises:
        RuntimeError: naming the rank, if a worker dies before the group is made.
    """
    if dist.is_initialized():
        raise RuntimeError(
            "this process already serves another tensor-parallel LLM: close it first "
            "(LLM.close()); one process group serves one engine at a time"
        )
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        world_size,
        is_master=True,
        wait_for_workers=False,
        timeout=TIMEOUT,
    )
    address = ("127.0.0.1", store.port)
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    processes = []
    with _main_not_rerun():
        for rank in range(1, world_size):
            process = context.Process(
                target=target,
                args=(rank, world_size, address, errors, os.getpid(), *args),
                daemon=True,
                name=f"minipaged-tp-rank{rank}",
            )
            process.start()
            processes.append(process)
    ready = [f"minipaged/ready/{rank}" for rank in range(1, world_size)]
    deadline = time.monotonic() + TIMEOUT.total_seconds()
    while not store.check(ready):
        if any(p.exitcode is not None for p in processes):
            raise failure(
                processes, errors, RuntimeError("a worker exited while starting")
            )
        if time.monotonic() > deadline:  # alive, but stuck (an import that hangs)
            late = [r for r, key in enumerate(ready, start=1) if not store.check([key])]
            stop(processes, timeout=0.0)
            raise RuntimeError(
                f"tensor-parallel worker rank(s) {late} did not start within "
                f"{TIMEOUT.total_seconds():.0f} s"
            )
        time.sleep(0.05)
    dist.init_process_group(
        backend_for(device), store=store, rank=0, world_size=world_size, timeout=TIMEOUT
    )
    global _made_here
    _made_here = True
    return processes, errors


def leave(owns_group: bool) -> None:
    """Destroy the default process group if this engine made it."""
    global _made_here
    if owns_group and dist.is_initialized():
        dist.destroy_process_group()
        _made_here = False


def join_spawned_group(rank: int, world_size: int, address, device) -> None:
    """In a worker that rank 0 started: check in at rank 0's store, then join the group."""
    host, port = address
    store = dist.TCPStore(host, port, world_size, is_master=False, timeout=TIMEOUT)
    store.set(f"minipaged/ready/{rank}", "1")
    dist.init_process_group(
        backend_for(device),
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=TIMEOUT,
    )


def failure(processes: list, errors, error: BaseException) -> RuntimeError:
    """The error rank 0 raises when a collective failed: it names the worker that ended and how,
    with the last line of its traceback when it sent one. Kills the remaining workers."""
    time.sleep(0.5)  # a worker that crashed may still be writing its error
    reports = {}
    while errors is not None and not errors.empty():
        rank, text = errors.get()
        reports[rank] = text.strip().splitlines()[-1]
    dead = [
        (rank, p.exitcode)
        for rank, p in enumerate(processes, start=1)
        if p.exitcode is not None
    ]
    stop(processes)
    if not dead and not reports:
        return RuntimeError(f"the tensor-parallel group failed: {error}")
    parts = []
    for rank, code in dead or [(r, None) for r in reports]:
        why = reports.get(rank, f"exit code {code}")
        parts.append(f"tensor-parallel worker rank {rank} failed ({why})")
    return RuntimeError("; ".join(parts))


def stop(processes: list, timeout: float = JOIN_SECONDS) -> None:
    """Wait for the workers to exit; kill any still alive after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def watch_parent(parent_pid: int, interval: float = 0.5) -> None:
    """In a worker: exit at once when the process that started it is gone (no orphans). A daemon
    thread polls the parent's pid, as a worker blocked in a collective cannot notice by itself."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="minipaged-parent-watch").start()


@contextlib.contextmanager
def _main_not_rerun() -> Iterator[None]:
    """While workers start: hide the caller's script from spawn, which would run it again in each
    worker to rebuild `__main__` (and start workers of workers, with no `__main__` guard)."""
    main = sys.modules["__main__"]
    saved = getattr(main, "__file__", None)
    if saved is not None:
        del main.__file__
    try:
        yield
    finally:
        if saved is not None:
            main.__file__ = saved


__all__ = [
    "backend_for",
    "failure",
    "join_spawned_group",
    "join_torchrun_group",
    "launched_by_torchrun",
    "leave",
    "spawn_workers",
    "stop",
    "watch_parent",
]
