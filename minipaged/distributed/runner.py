"""One scheduler, N shards: rank 0's runner and the workers' loop.

OS idea: a single page table over several memory banks. One memory manager decides where every page
lives; each bank only carries out the decisions for its own part of the memory. KV counterpart: vLLM
paper section 4.6 (Fig. 5): the scheduler and the KV cache manager run once, on rank 0. At each
step, rank 0 sends every worker the same step inputs (its tokens, the slot mapping, the block
tables, sequence lengths and query starts, and the block swaps and copies). Each worker applies
them to its own pools, which hold its share of the KV heads in the same blocks, and runs its shard
of the model. The shards' partial results meet in the all-reduces of the row-parallel layers
(sharding.py). Rank 0 alone samples; the workers' logits are dropped.

So copy-on-write, swapping and prefix caching work unchanged: they are decisions about blocks, made
once, and every rank moves its own part of the same blocks.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import time
import traceback
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from minipaged.backend import KVBackend, get_backend
from minipaged.distributed import group
from minipaged.distributed.sharding import CommStats, local_kv_heads, shard_model
from minipaged.model_runner import ModelRunner, StepInputs
from minipaged.reference.block_manager import BlockManager
from minipaged.reference.scheduler import SchedulerOutput

DESCRIBE = (
    "describe"  # rank 0 asks every rank for its pools (TensorParallelRunner.pools)
)


@dataclass
class StepComm:
    """What one step sent between the ranks, seen from rank 0."""

    broadcast_bytes: int  # the pickled step inputs, sent to every worker
    broadcast_s: float
    allreduce_calls: int  # two a layer: after attention and after the MLP
    allreduce_bytes: int  # of each rank's partial outputs, summed over the calls
    allreduce_s: float


class TensorParallelRunner:
    """Rank 0's runner over a group of `world_size` ranks (engine.LLM(tensor_parallel_size=N)).

    Args:
        model: the full model; this rank keeps its share (the workers got the full model before).
        backend: the kernel contract's implementation (every rank uses the same one).
        block_manager: rank 0's, whose tables every rank's pools follow.
        device: rank 0's device; worker r uses "cpu", or "cuda:r" (its LOCAL_RANK under torchrun).
        world_size: ranks in the group, rank 0 included.
        processes: the workers that rank 0 started (none under torchrun, whose workers are not
            rank 0's children).
        errors: the queue where those workers put their tracebacks (None under torchrun).
        owns_group: whether close() destroys the process group (rank 0 made it).
    """

    simulated = False

    def __init__(
        self,
        model: torch.nn.Module,
        backend: KVBackend,
        block_manager: BlockManager,
        device: str | torch.device,
        world_size: int,
        processes: list,
        errors: object,
        owns_group: bool,
    ) -> None:
        self.world_size, self.processes, self.errors = world_size, processes, errors
        self.comm = CommStats()
        self.last_step: StepComm | None = None
        self.closed = False
        # what the shutdown needs, without this object: the workers, and whether they failed
        self._state = {
            "processes": processes,
            "owns_group": owns_group,
            "failed": False,
        }
        self._finalizer = weakref.finalize(self, _shutdown, self._state)
        shard_model(model, 0, world_size, self.comm)
        kv_heads = local_kv_heads(model.config, world_size)
        m = block_manager
        self._send({"pool": (m.device.num_blocks, m.host.num_blocks, m.block_size),
                    "kv_heads": kv_heads})  # fmt: skip
        self.local = ModelRunner(model, backend, block_manager, device, kv_heads)
        self.device = self.local.device

    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Send the step to the workers, run rank 0's shard, return its logits `[num_seqs, vocab]`."""
        if self.closed:
            raise RuntimeError("the tensor-parallel group is closed")
        inputs = self.local.prepare(out)
        before = (
            self.comm.allreduce_calls,
            self.comm.allreduce_bytes,
            self.comm.allreduce_s,
        )
        try:
            start = time.perf_counter()
            sent = self._send(inputs)
            sent_s = time.perf_counter() - start
            logits = self.local.run(inputs)
        except Exception as error:
            failure = group.failure(self.processes, self.errors, error)
            self._state["failed"] = True
            self.close()  # the group is broken: leave it now, so a new engine can start
            raise failure from error
        calls, nbytes, seconds = (
            self.comm.allreduce_calls,
            self.comm.allreduce_bytes,
            self.comm.allreduce_s,
        )
        self.last_step = StepComm(sent, sent_s, calls - before[0], nbytes - before[1],
                                  seconds - before[2])  # fmt: skip
        return logits

    def pools(self) -> list[dict]:
        """Every rank's device KV pools, rank 0 first: [{"rank", "kv_heads", "shape",
        "bytes"}], where shape is one layer's K pool and bytes counts K and V of every layer."""
        self._send(DESCRIBE)
        gathered: list[dict | None] = [None] * self.world_size
        dist.gather_object(describe_pools(self.local, 0), gathered, dst=0)
        return gathered

    def close(self) -> None:
        """Tell the workers to stop, wait for them, and leave the process group. Idempotent."""
        self.closed = True
        self._finalizer()

    def _send(self, obj: object) -> int:
        """Broadcast `obj` from rank 0 to every rank; returns its size in bytes."""
        dist.broadcast_object_list([obj], src=0)
        return len(pickle.dumps(obj))


def _shutdown(state: dict) -> None:
    """Stop message, reap the workers, leave the group: close() and garbage collection both."""
    if not state["failed"]:  # after a failure, the workers are already stopped
        # a worker that died since fails the broadcast: stop() reaps or kills the rest
        with contextlib.suppress(Exception):
            dist.broadcast_object_list([None], src=0)
    group.stop(state["processes"])
    group.leave(state["owns_group"])


def start(
    model, backend, block_manager, device, world_size: int
) -> TensorParallelRunner:
    """Make the group and return rank 0's runner. Under torchrun, a rank other than 0 serves here
    as a worker until rank 0 closes, then exits the process (SystemExit(0)): the same script runs
    on every rank, and only rank 0 goes past the LLM constructor."""
    if group.launched_by_torchrun():
        rank, made = group.join_torchrun_group(world_size, device)
        if rank != 0:
            serve(model, rank, world_size, backend.name, device)
            raise SystemExit(0)
        processes, errors = [], None
    else:
        processes, errors = group.spawn_workers(
            world_size, device, worker_main, (model, backend.name, str(device))
        )
        made = True
    return TensorParallelRunner(
        model, backend, block_manager, device, world_size, processes, errors, made
    )


def worker_main(
    rank, world_size, address, errors, parent_pid, model, backend, device
) -> None:
    """A worker process started by rank 0: join the group, serve, and report any failure."""
    group.watch_parent(parent_pid)
    try:
        if torch.device(device).type == "cpu":
            torch.set_num_threads(1)  # the ranks share this machine's cores
        group.join_spawned_group(rank, world_size, address, device)
        serve(model, rank, world_size, backend, device)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        os._exit(1)


def serve(model, rank: int, world_size: int, backend: str, device) -> None:
    """The worker's loop: keep this rank's shard, make its pools as rank 0 says, then run every
    step rank 0 sends until it sends None."""
    device = _worker_device(device, rank)
    shard_model(model, rank, world_size)
    hello = _receive()
    runner = ModelRunner(
        model, get_backend(backend), None, device, hello["kv_heads"], hello["pool"]
    )
    while (inputs := _receive()) is not None:
        if isinstance(inputs, str) and inputs == DESCRIBE:
            dist.gather_object(describe_pools(runner, rank), None, dst=0)
        else:
            runner.run(inputs)
    dist.destroy_process_group()


def describe_pools(runner: ModelRunner, rank: int) -> dict:
    """One rank's device pools: its KV heads, one layer's K pool shape and the bytes of all."""
    shape = runner.k_caches[0].shape  # [num_blocks, block_size, num_kv_heads, head_dim]
    pools = runner.k_caches + runner.v_caches
    return {"rank": rank, "kv_heads": shape[2], "shape": list(shape),
            "bytes": sum(p.numel() * p.element_size() for p in pools)}  # fmt: skip


def _receive() -> StepInputs | dict | str | None:
    payload = [None]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def _worker_device(device, rank: int) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


__all__ = ["StepComm", "TensorParallelRunner", "serve", "start", "worker_main"]
