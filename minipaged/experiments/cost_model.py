"""A GPU step-time cost model: what one engine step would cost, priced instead of run.

OS idea: the roofline (Williams, Waterman and Patterson, CACM 2009): a kernel runs no faster
than its arithmetic allows (FLOPs / peak FLOP/s) nor than its memory traffic allows (bytes /
bandwidth), so it takes the larger of the two. A storage simulator prices a disk request the
same way (seek + rotation + transfer) without moving a head. KV counterpart: vLLM paper
section 6 (Figs. 12, 14, 16: throughput and latency against request rate) runs OPT and LLaMA
on A100s; here the one engine loop runs with a simulated runner that computes no tensors and
asks this model how long each step would take on a named GPU. Section 7.3 (Fig. 19) prices a
swap by PCIe bandwidth plus a cost per copy, so swap against recompute shows in simulation too.

A step charges, on each of `tensor_parallel_size` GPUs:

- linear layers: max(2 x parameters x tokens FLOPs, every weight byte read once);
- attention: max(4 x layers x heads x head_dim FLOPs per (query, key) pair, causal, each
  sequence's K/V read once plus the new K/V written);
- two all-reduces a layer of tokens x hidden x dtype bytes (ring: 2(N-1)/N of them cross
  NVLink, plus NCCL's latency), when N > 1;
- a fixed overhead: scheduling, sampling, kernel launches.

Decode reads all the weights for a token or two per sequence, so it is memory-bound; a long
prefill does thousands of tokens' FLOPs per weight byte, so it is compute-bound.

The efficiencies (what fraction of a datasheet peak real kernels reach), and why:

- compute_efficiency = 0.7: large fp16 GEMMs on an A100 reach 70-75% of 312 TFLOP/s
  (FasterTransformer's MLP GEMMs in kipply's profile; LMDeploy's 2,048-token prefill of
  Llama-2-13B implies 73%).
- bandwidth_efficiency = 0.8: a stream of large reads gets about 80% of HBM's rate (vLLM's
  decode step grows by 0.49 us per cached token of OPT-13B on an A100-80GB in DistServe's fit:
  819,200 bytes / 0.49 us = 81% of 2,039 GB/s); used for PCIe and NVLink too.
- step_overhead = 2 ms: the CPU side of a step (schedule, sample, launch). Beyond the weights'
  read at 80%, a C++ engine (LMDeploy) spends about 1.4 ms a step, vLLM about 4 (DistServe's
  fit); 2 is between.
- swap_overhead = 6 us a copy: one cudaMemcpyAsync costs 5-7 us whatever its size (measured in
  DualPath, Wu et al. 2026, section 5.2). vLLM's swap_blocks issues one a block, a layer, K or V.
- allreduce latency = 6.6 us + 0.6 us a ring step (2(N-1) steps): NCCL's own tuning model
  for the ring LL protocol over NVLink (src/graph/tuning.cc, baseLat and hwLat).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

from minipaged.experiments.hardware import (
    GPU,
    GPUS,
    MODELS,
    ModelSpec,
    get_gpu,
    get_model,
)

COMPUTE_EFFICIENCY = 0.7
BANDWIDTH_EFFICIENCY = 0.8
STEP_OVERHEAD = 2e-3  # seconds
SWAP_OVERHEAD = 6e-6  # seconds a copy
ALLREDUCE_LATENCY = 6.6e-6  # seconds an all-reduce
ALLREDUCE_STEP_LATENCY = 0.6e-6  # seconds a ring step
PARTS = ("linear", "attention", "allreduce", "overhead")  # what step_time adds
KEYS = (  # what step_parts gives
    "linear_compute",
    "linear_memory",
    "linear",
    "attention_compute",
    "attention_memory",
    "attention",
    "allreduce",
    "overhead",
)


class CostModel:
    """Prices engine steps, swaps and copies of one model on `tensor_parallel_size` GPUs.

    Args:
        model: a preset name of MODELS, a ModelSpec, or a transformers config.
        gpu: a preset name of GPUS, or a GPU.
        tensor_parallel_size: GPUs that split every layer (Megatron-style); heads divide by it.
        compute_efficiency: the fraction of peak_flops that matmuls and attention reach.
        bandwidth_efficiency: the fraction of every link's rate (HBM, PCIe, NVLink) reached.
        step_overhead: seconds a step costs besides the GPU work.
        swap_overhead: seconds each host<->device copy costs besides its bytes.
        allreduce_latency: seconds an all-reduce costs besides its bytes and ring steps.
        allreduce_step_latency: seconds each of the ring's 2(N-1) steps adds.

    Raises:
        ValueError: naming the argument, for an unknown model or GPU, a tensor_parallel_size
            that is not a positive int or does not divide the heads, an efficiency outside
            (0, 1] or a negative overhead.
    """

    def __init__(
        self,
        model: str | ModelSpec | Any = "opt-13b",
        gpu: str | GPU = "A100-40GB",
        tensor_parallel_size: int = 1,
        *,
        compute_efficiency: float = COMPUTE_EFFICIENCY,
        bandwidth_efficiency: float = BANDWIDTH_EFFICIENCY,
        step_overhead: float = STEP_OVERHEAD,
        swap_overhead: float = SWAP_OVERHEAD,
        allreduce_latency: float = ALLREDUCE_LATENCY,
        allreduce_step_latency: float = ALLREDUCE_STEP_LATENCY,
    ):
        self.model, self.gpu = get_model(model), get_gpu(gpu)
        tp = tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp <= 0:
            raise ValueError(f"tensor_parallel_size must be a positive int, got {tp!r}")
        m = self.model
        kv_split = m.num_kv_heads % tp == 0 or tp % m.num_kv_heads == 0
        if m.num_heads % tp or not kv_split:
            raise ValueError(
                f"tensor_parallel_size={tp} must divide {m.name}'s {m.num_heads} heads "
                f"({m.num_kv_heads} KV heads: divide or be divided by it)"
            )
        efficiencies = {
            "compute_efficiency": compute_efficiency,
            "bandwidth_efficiency": bandwidth_efficiency,
        }
        for name, value in efficiencies.items():
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        overheads = {
            "step_overhead": step_overhead,
            "swap_overhead": swap_overhead,
            "allreduce_latency": allreduce_latency,
            "allreduce_step_latency": allreduce_step_latency,
        }
        for name, value in overheads.items():
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
        self.tensor_parallel_size = tp
        self.compute_efficiency, self.bandwidth_efficiency = (
            compute_efficiency,
            bandwidth_efficiency,
        )
        self.step_overhead, self.swap_overhead = step_overhead, swap_overhead
        self.allreduce_latency, self.allreduce_step_latency = (
            allreduce_latency,
            allreduce_step_latency,
        )
        # what one GPU reaches
        self.flops_per_s = self.gpu.peak_flops * compute_efficiency
        self.bytes_per_s = self.gpu.memory_bandwidth * bandwidth_efficiency
        # fewer KV heads than GPUs: replicated
        kv_heads_per_rank = max(m.num_kv_heads // tp, 1)
        self.kv_bytes_per_token_per_rank = (
            2 * m.num_layers * kv_heads_per_rank * m.head_dim * m.dtype_bytes
        )

    def step_parts(
        self, query_lens: Sequence[int], seq_lens: Sequence[int]
    ) -> dict[str, float]:
        """The seconds of each part of one step, on one GPU of the group (they run in lockstep).

        Keys: linear_compute, linear_memory and linear (their max); attention_compute,
        attention_memory and attention; allreduce; overhead. step_time adds the four of PARTS.
        Arguments as in step_time; empty lists give zeros (no step).
        """
        q, s = _check_lens(query_lens, seq_lens)
        m, tp = self.model, self.tensor_parallel_size
        tokens = sum(q)
        if not tokens:
            return dict.fromkeys(KEYS, 0.0)
        parts = {
            "linear_compute": 2 * m.num_parameters * tokens / tp / self.flops_per_s,
            "linear_memory": m.weight_bytes / tp / self.bytes_per_s,
        }
        parts["linear"] = max(parts["linear_compute"], parts["linear_memory"])
        # query token at position p (0-based) attends to p + 1 keys: the last q of s positions
        pairs = sum(qi * si - qi * (qi - 1) // 2 for qi, si in zip(q, s, strict=True))
        # QK^T and PV
        attention_flops = 4 * m.num_layers * m.num_heads * m.head_dim * pairs
        # read all s, write the q new
        kv_tokens = sum(si + qi for qi, si in zip(q, s, strict=True) if qi)
        parts["attention_compute"] = attention_flops / tp / self.flops_per_s
        parts["attention_memory"] = (
            kv_tokens * self.kv_bytes_per_token_per_rank / self.bytes_per_s
        )
        parts["attention"] = max(parts["attention_compute"], parts["attention_memory"])
        # after attention, after the MLP
        activations = tokens * m.hidden_size * m.dtype_bytes
        parts["allreduce"] = 2 * m.num_layers * self.allreduce_time(activations)
        parts["overhead"] = self.step_overhead
        return parts

    def step_time(self, query_lens: Sequence[int], seq_lens: Sequence[int]) -> float:
        """Seconds one engine step takes: linear + attention + all-reduce + overhead.

        Args:
            query_lens: the new tokens sequence i computes this step: its uncached prompt
                (a prefill, or a chunk of one) or 1 (a decode).
            seq_lens: the tokens sequence i attends over: its length after the step.

        Returns:
            0.0 for empty lists (no model step), else the step's seconds.

        Raises:
            ValueError: if the lists differ in length, or a query_len is < 0 or > its seq_len.
        """
        parts = self.step_parts(query_lens, seq_lens)
        return sum(parts[p] for p in PARTS) if any(parts.values()) else 0.0

    def allreduce_time(self, num_bytes: int) -> float:
        """Seconds a ring all-reduce of `num_bytes` takes across the group (0 on one GPU)."""
        n = self.tensor_parallel_size
        if n == 1:
            return 0.0
        link = self.gpu.interconnect_bandwidth * self.bandwidth_efficiency
        latency = self.allreduce_latency + 2 * (n - 1) * self.allreduce_step_latency
        return latency + 2 * (n - 1) / n * num_bytes / link

    def swap_time(self, num_blocks: int, block_size: int, num_transfers: int) -> float:
        """Seconds to move `num_blocks` KV blocks (every layer, K and V) over PCIe, one way.

        Each GPU moves its share of the heads over its own link, in parallel. vLLM's
        swap_blocks copies a block of one layer's K or V pool at a time, so a caller that
        mimics it passes num_transfers = num_blocks x num_layers x 2.

        Args:
            num_blocks: blocks moved.
            block_size: tokens a block holds.
            num_transfers: separate copies the blocks travel in (>= 1 when blocks move).

        Raises:
            ValueError: naming the argument, for a negative count, a block_size < 1, or
                blocks to move in no transfer.
        """
        _check_counts(
            num_blocks=num_blocks, num_transfers=num_transfers, block_size=block_size
        )
        if num_blocks and not num_transfers:
            raise ValueError(
                f"num_transfers must be >= 1 to move {num_blocks} blocks, got 0"
            )
        num_bytes = num_blocks * block_size * self.kv_bytes_per_token_per_rank
        pcie = self.gpu.pcie_bandwidth * self.bandwidth_efficiency
        return num_bytes / pcie + num_transfers * self.swap_overhead

    def copy_time(self, num_blocks: int, block_size: int) -> float:
        """Seconds of device-side block copies (copy-on-write): read and write through HBM.

        Raises:
            ValueError: naming the argument, for a negative count or a block_size < 1.
        """
        _check_counts(num_blocks=num_blocks, block_size=block_size)
        return (
            2
            * num_blocks
            * block_size
            * self.kv_bytes_per_token_per_rank
            / self.bytes_per_s
        )

    def kv_cache_tokens(self, gpu_memory_utilization: float = 0.9) -> int:
        """Token slots for the KV cache of the tensor-parallel group, as vLLM sizes its pool.

        (TP x memory x utilization - weights) / kv_bytes_per_token, activations not counted.
        OPT-13B on an A100-40GB: 36 GiB (38.7 GB) less 25.7 GB of weights leaves 13.0 GB,
        15,837 slots of 800 KiB; the paper rounds to 26 GB and 12 GB (Fig. 1), and
        serving.py's KV_SLOTS = 15,000 is 12 GB / 800 KB.

        Raises:
            ValueError: if the utilization is outside (0, 1], or the weights do not fit.
        """
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}"
            )
        tp, m = self.tensor_parallel_size, self.model
        # per GPU
        free = self.gpu.memory_bytes * gpu_memory_utilization - m.weight_bytes / tp
        if free <= 0:
            raise ValueError(
                f"{m.name}'s {m.weight_bytes / 1e9:.1f} GB of weights do not fit in {tp} x "
                f"{self.gpu.name} at gpu_memory_utilization={gpu_memory_utilization}"
            )
        return int(free // self.kv_bytes_per_token_per_rank)


def _check_lens(
    query_lens: Sequence[int], seq_lens: Sequence[int]
) -> tuple[list[int], list[int]]:
    try:
        q, s = (
            [operator.index(x) for x in query_lens],
            [operator.index(x) for x in seq_lens],
        )
    except TypeError as error:
        raise ValueError(f"query_lens and seq_lens must hold ints: {error}") from None
    if len(q) != len(s):
        raise ValueError(
            f"query_lens and seq_lens must have one entry a sequence, got {len(q)} and {len(s)}"
        )
    for i, (qi, si) in enumerate(zip(q, s, strict=True)):
        if not 0 <= qi <= si:
            raise ValueError(
                f"query_lens[{i}] must be in [0, seq_lens[{i}]] = [0, {si}], got {qi}"
            )
    return q, s


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        low = 1 if name == "block_size" else 0
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


__all__ = [
    "GPU",
    "GPUS",
    "MODELS",
    "PARTS",
    "CostModel",
    "ModelSpec",
    "get_gpu",
    "get_model",
]
