"""Megatron-style tensor parallelism: each rank keeps its share of every layer's heads and MLP.

OS idea: one address space over several memory banks (NUMA): the program sees one memory, and each
bank holds its part. KV counterpart: vLLM paper section 4.6 (Fig. 5): with Megatron-LM tensor
parallelism (Shoeybi et al. 2019), each GPU holds some of every layer's attention heads, so it holds
the K/V of those heads only. Every rank's KV pool has the same blocks, in the same layout, with fewer
heads: one block table, the scheduler's, serves them all.

How a layer is split, for N ranks (rank r):

- **column-parallel** (Q, K, V projections; the MLP's up and gate projections, OPT's fc1): the
  output features are split, each rank keeps rows `[r * out / N, (r + 1) * out / N)` of the weight.
  Attention heads are contiguous groups of output features, so rank r computes heads
  `[r * H / N, (r + 1) * H / N)`. No communication: each head's attention needs only its own Q, K, V.
- **row-parallel** (the attention's output projection, the MLP's down projection, OPT's fc2): the
  input features are split the same way, so each rank multiplies its heads' (or its MLP slice's)
  output by its columns of the weight. The sum over ranks is the full product: one all-reduce after
  the layer. The bias is added once, by rank 0.
- **KV heads**: when N divides them, each rank keeps its share. When there are fewer KV heads than
  ranks (MQA, GQA with few groups), each is replicated, as in vLLM: rank r keeps KV head
  `r * num_kv_heads // N`, the one its query heads attend with.
- Embeddings, norms and the LM head are replicated: every rank has all of them.

Which layer is which comes from transformers' own plan (`config.base_model_tp_plan`, the plan its
DTensor tensor parallelism uses) where the model has one, and from `PLANS` below otherwise. The
splitting itself is done here with plain slicing and a `torch.distributed.all_reduce` hook: the
minipaged attention function receives each rank's heads as an ordinary tensor.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from minipaged.model_runner import kv_shape

# model_type -> {module pattern under the base model: "colwise" | "rowwise"}, for models whose
# config has no base_model_tp_plan
PLANS = {
    "opt": {
        "decoder.layers.*.self_attn.q_proj": "colwise",
        "decoder.layers.*.self_attn.k_proj": "colwise",
        "decoder.layers.*.self_attn.v_proj": "colwise",
        "decoder.layers.*.self_attn.out_proj": "rowwise",
        "decoder.layers.*.fc1": "colwise",
        "decoder.layers.*.fc2": "rowwise",
    },
}
STYLES = ("colwise", "rowwise")


def tp_plan(config) -> dict[str, str]:
    """{module pattern: "colwise" | "rowwise"} of the model, its own or from PLANS.

    Raises:
        ValueError: naming the model type, for one with no plan here or in transformers, or a plan
            with another kind of split (transformers also knows "gather", "local_rowwise", ...).
    """
    config = config.get_text_config()
    plan = getattr(config, "base_model_tp_plan", None) or PLANS.get(config.model_type)
    if not plan:
        raise ValueError(
            f"tensor_parallel_size > 1 needs a plan of the model's layers: {config.model_type!r} "
            f"has no base_model_tp_plan and is not one of {', '.join(sorted(PLANS))}"
        )
    odd = sorted({style for style in plan.values() if style not in STYLES})
    if odd:
        raise ValueError(
            f"{config.model_type!r}'s tensor-parallel plan splits layers as {', '.join(odd)}; "
            f"minipaged splits only {' and '.join(STYLES)}"
        )
    return dict(plan)


def check_divisible(config, world_size: int) -> None:
    """Raise ValueError, with the numbers, unless `world_size` ranks can split the model: it has a
    plan (tp_plan), and the ranks divide its attention heads and its KV heads (or are a multiple
    of them). A layer whose features do not divide is refused when it is split (shard_model)."""
    tp_plan(config)
    num_kv_heads = kv_shape(config)[1]
    text = config.get_text_config()
    num_heads = text.num_attention_heads
    name = text.model_type
    if num_heads % world_size:
        raise ValueError(
            f"tensor_parallel_size={world_size} must divide {name}'s {num_heads} attention heads"
        )
    if num_kv_heads % world_size and world_size % num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size={world_size} must divide {name}'s {num_kv_heads} KV heads, "
            f"or be a multiple of them (each is then replicated)"
        )


def local_kv_heads(config, world_size: int) -> int:
    """KV heads in each rank's pools: its share, or one replicated head when there are fewer."""
    return max(1, kv_shape(config)[1] // world_size)


def shard_model(
    model: torch.nn.Module, rank: int, world_size: int, stats: CommStats | None = None
) -> torch.nn.Module:
    """Keep this rank's share of every split layer, in place; returns the model.

    After it, a forward pass on every rank (with the same inputs) gives every rank the full
    model's hidden states: each row-parallel layer all-reduces its output over the default group.
    `stats`, if given, counts the all-reduces' bytes and seconds.

    Raises:
        ValueError: from check_divisible and tp_plan, or for a plan that names no layer.
    """
    config = model.config
    check_divisible(config, world_size)
    plan = tp_plan(config)
    num_kv_heads = kv_shape(config)[1]
    num_heads = config.get_text_config().num_attention_heads
    kv_rank, kv_world = _kv_share(rank, world_size, num_kv_heads)
    base = model.base_model
    split = 0
    for name, module in base.named_modules():
        style = next((s for p, s in plan.items() if fnmatch.fnmatchcase(name, p)), None)
        if style is None or not isinstance(module, torch.nn.Linear):
            continue
        if style == "colwise" and name.endswith(("k_proj", "v_proj")):
            _keep_rows(name, module, kv_rank, kv_world)
        elif style == "colwise":
            _keep_rows(name, module, rank, world_size)
        else:
            _keep_columns(name, module, rank, world_size, stats)
        split += 1
    if not split:
        raise ValueError(
            f"the tensor-parallel plan matched no layer of {config.model_type!r}"
        )
    heads, kv_heads = num_heads // world_size, local_kv_heads(config, world_size)
    for (
        module
    ) in base.modules():  # attention modules that count their heads (OPT views by them)
        if hasattr(module, "num_heads") and hasattr(module, "head_dim"):
            module.num_heads = heads
        if hasattr(module, "num_key_value_heads"):
            module.num_key_value_heads = kv_heads
        if hasattr(module, "num_key_value_groups"):
            module.num_key_value_groups = heads // kv_heads
    return model


def _kv_share(rank: int, world_size: int, num_kv_heads: int) -> tuple[int, int]:
    """(part, parts) of the KV projections this rank keeps: its share when the heads divide among
    the ranks, else the one head its query heads use (num_kv_heads parts)."""
    if num_kv_heads >= world_size:
        return rank, world_size
    return rank * num_kv_heads // world_size, num_kv_heads


@dataclass
class CommStats:
    """What a rank's row-parallel layers all-reduced: how many calls, bytes and seconds."""

    allreduce_calls: int = 0
    allreduce_bytes: int = 0
    allreduce_s: float = 0.0


def _split(name: str, features: int, parts: int) -> int:
    if features % parts:
        raise ValueError(f"{name}: {features} features do not split over {parts} ranks")
    return features // parts


@torch.no_grad()
def _keep_rows(name: str, linear: torch.nn.Linear, part: int, parts: int) -> None:
    """Column-parallel: keep output features [part * out / parts, (part + 1) * out / parts)."""
    size = _split(name, linear.out_features, parts)
    rows = slice(part * size, (part + 1) * size)
    linear.weight = torch.nn.Parameter(linear.weight[rows].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias[rows].clone(), requires_grad=False)
    linear.out_features = size


@torch.no_grad()
def _keep_columns(
    name: str, linear: torch.nn.Linear, part: int, parts: int, stats: CommStats | None
) -> None:
    """Row-parallel: keep input features of this part, add the bias on part 0 only, and all-reduce
    the output (the sum over ranks of the partial products is the full product)."""
    size = _split(name, linear.in_features, parts)
    columns = slice(part * size, (part + 1) * size)
    # [out_features, in_features / parts]
    linear.weight = torch.nn.Parameter(
        linear.weight[:, columns].clone(), requires_grad=False
    )
    if linear.bias is not None and part != 0:
        linear.bias = None
    linear.in_features = size

    def all_reduce_output(module, args, output: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        dist.all_reduce(output)  # sums the ranks' partial products, in place
        if stats is not None:
            stats.allreduce_calls += 1
            stats.allreduce_bytes += output.numel() * output.element_size()
            stats.allreduce_s += time.perf_counter() - start
        return output

    linear.register_forward_hook(all_reduce_output)


__all__ = [
    "PLANS",
    "CommStats",
    "check_divisible",
    "local_kv_heads",
    "shard_model",
    "tp_plan",
]
