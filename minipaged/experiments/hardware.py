"""The machines and models the cost model prices: GPU datasheet figures and model shapes.

OS idea: a performance model starts from the machine's published limits (the roofline of
Williams, Waterman and Patterson: peak arithmetic rate and peak memory bandwidth) and the size
of the program's working set, before any measurement. KV counterpart: vLLM paper section 6.1
(Table 1) serves OPT-13B on one A100-40GB, OPT-66B on four A100s and OPT-175B on eight
A100-80GBs, with LLaMA-13B for the shared-prefix runs; the ModelSpec presets below are those
models' published shapes, the GPU presets the datasheets of the A100 and of its successors.

Nothing is downloaded: every number is written out here, with its source in a comment.
`ModelSpec.from_config` reads the same shapes from any transformers config built locally.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

GiB = 2**30


@dataclass(frozen=True)
class GPU:
    """One accelerator's datasheet limits, the inputs of a roofline.

    Attributes:
        name: the key of GPUS.
        peak_flops: dense fp16/bf16 tensor-core FLOP/s (datasheets also quote 2x "with
            sparsity", which dense matmuls never reach).
        memory_bandwidth: HBM bytes/s.
        memory_bytes: HBM capacity in bytes.
        pcie_bandwidth: host<->device bytes/s in one direction: what a swap moves over.
        interconnect_bandwidth: NVLink bytes/s per GPU in one direction, for the
            all-reduce of tensor parallelism.
    """

    name: str
    peak_flops: float
    memory_bandwidth: float
    memory_bytes: int
    pcie_bandwidth: float
    interconnect_bandwidth: float

    def __post_init__(self):
        for f in fields(self)[1:]:
            if not getattr(self, f.name) > 0:
                raise ValueError(
                    f"GPU.{f.name} must be positive, got {getattr(self, f.name)!r}"
                )


# Sources: NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): FP16
# tensor 312 TFLOPS dense (624 with sparsity); 1,555 GB/s (40GB) and 2,039 GB/s (80GB SXM);
# NVLink 600 GB/s (both directions: 300 each way); PCIe Gen4 64 GB/s (32 each way).
# NVIDIA H100 / H200 datasheets: FP16 tensor 1,979 TFLOPS *with sparsity*, so 989 dense;
# HBM 3.35 TB/s (H100 SXM5 80GB) and 4.8 TB/s (H200, 141 GB); NVLink 900 GB/s (450 each
# way); PCIe Gen5 128 GB/s (64 each way). Capacities are the marketed GB read as GiB
# (five 8 GiB stacks make the A100's 40; CUDA reports 40,441 MiB of it).
GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU("A100-40GB", 312e12, 1555e9, 40 * GiB, 32e9, 300e9),
        GPU("A100-80GB", 312e12, 2039e9, 80 * GiB, 32e9, 300e9),
        GPU("H100", 989e12, 3350e9, 80 * GiB, 64e9, 450e9),  # SXM5 80GB
        GPU("H200", 989e12, 4800e9, 141 * GiB, 64e9, 450e9),
    )
}


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer: all the cost model needs to know of it.

    Parameters count the matrices (attention, MLP, embeddings); biases, norms and OPT's
    learned positions add under 0.1% and are left out.

    Attributes:
        gated_mlp: LLaMA's SwiGLU MLP (gate, up, down: 3 matrices) rather than OPT's 2.
        dtype_bytes: bytes per weight and per cached K/V element (2 for fp16/bf16).
        tie_word_embeddings: the LM head reuses the input embedding (OPT), or has its own
            matrix (LLaMA).
    """

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool
    dtype_bytes: int = 2
    tie_word_embeddings: bool = True

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            bad = not isinstance(value, int) or isinstance(value, bool) or value <= 0
            if f.type == "int" and bad:
                raise ValueError(
                    f"ModelSpec.{f.name} must be a positive int, got {value!r}"
                )

    @property
    def num_parameters(self) -> int:
        """Weights of the matrices: per layer Q, K, V, O and the MLP, plus the embeddings."""
        attention = (
            self.hidden_size * self.head_dim * 2 * (self.num_heads + self.num_kv_heads)
        )
        mlp = (3 if self.gated_mlp else 2) * self.hidden_size * self.intermediate_size
        embeddings = (
            (1 if self.tie_word_embeddings else 2) * self.vocab_size * self.hidden_size
        )
        return self.num_layers * (attention + mlp) + embeddings

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights: what one step reads from HBM whatever its batch."""
        return self.num_parameters * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token keeps in the KV cache: K and V, every layer, every KV head."""
        return (
            2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes
        )

    @classmethod
    def from_config(cls, config: Any, name: str | None = None) -> ModelSpec:
        """The shape of a transformers `PretrainedConfig` (built locally; nothing is fetched).

        Reads LlamaConfig's names (intermediate_size, num_key_value_heads, head_dim) and
        OPTConfig's (ffn_dim, activation_function); for a multimodal config, its text model
        (`get_text_config()`). The MLP counts as gated when its activation is SiLU (LLaMA,
        Mistral, Qwen2), a heuristic. OPT-350m's small embedding projection is not counted.

        Args:
            config: a transformers config, or any object with the same attribute names.
            name: the spec's name; defaults to the config's name_or_path or model_type.
        """
        text = (
            config.get_text_config() if hasattr(config, "get_text_config") else config
        )
        hidden, heads = text.hidden_size, text.num_attention_heads
        intermediate = (
            getattr(text, "intermediate_size", None)
            or getattr(text, "ffn_dim", None)
            or getattr(text, "n_inner", None)
            or 4 * hidden
        )
        activation = getattr(text, "hidden_act", None) or getattr(
            text, "activation_function", ""
        )
        dtype = str(getattr(text, "dtype", None) or "float16").removeprefix("torch.")
        return cls(
            name=name or getattr(text, "name_or_path", "") or text.model_type,
            num_layers=text.num_hidden_layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or hidden // heads,
            intermediate_size=intermediate,
            vocab_size=text.vocab_size,
            gated_mlp=activation in ("silu", "swish"),
            dtype_bytes=4 if dtype == "float32" else 2,
            tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", True)),
        )


# Shapes from the published configs: OPT (Zhang et al. 2022, Table 1; facebook/opt-13b and
# facebook/opt-66b config.json; OPT-175B from metaseq's 175B config: 96 layers, 96 heads, 12288
# wide) and LLaMA-13B (Touvron et al. 2023, Table 2; intermediate 13824, vocab 32000).
MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("opt-13b", 40, 5120, 40, 40, 128, 20480, 50272, gated_mlp=False),
        ModelSpec("opt-66b", 64, 9216, 72, 72, 128, 36864, 50272, gated_mlp=False),
        ModelSpec("opt-175b", 96, 12288, 96, 96, 128, 49152, 50272, gated_mlp=False),
        ModelSpec(
            "llama-13b",
            40,
            5120,
            40,
            40,
            128,
            13824,
            32000,
            True,
            tie_word_embeddings=False,
        ),
    )
}


def get_model(model: str | ModelSpec | Any) -> ModelSpec:
    """A ModelSpec from a preset name, a ModelSpec, or a transformers config.

    Raises:
        ValueError: if `model` is an unknown name or none of the three.
    """
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str):
        if model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
        return MODELS[model]
    if hasattr(model, "get_text_config") or hasattr(model, "num_hidden_layers"):
        return ModelSpec.from_config(model)
    raise ValueError(
        f"model must be a preset name, a ModelSpec or a config, got {model!r}"
    )


def get_gpu(gpu: str | GPU) -> GPU:
    """A GPU from a preset name or a GPU.

    Raises:
        ValueError: if `gpu` is an unknown name or not a GPU.
    """
    if isinstance(gpu, GPU):
        return gpu
    if isinstance(gpu, str) and gpu in GPUS:
        return GPUS[gpu]
    raise ValueError(f"gpu must be one of {sorted(GPUS)} or a GPU, got {gpu!r}")


def gpu_table() -> str:
    """The GPU presets as a Markdown table (docs/experiments/cost-model.md)."""
    lines = [
        "| GPU | dense fp16 TFLOP/s | HBM TB/s | HBM GiB | PCIe GB/s, one way | NVLink GB/s, one way |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for g in GPUS.values():
        lines.append(
            f"| {g.name} | {g.peak_flops / 1e12:g} | {g.memory_bandwidth / 1e12:g} "
            f"| {g.memory_bytes / GiB:g} | {g.pcie_bandwidth / 1e9:g} "
            f"| {g.interconnect_bandwidth / 1e9:g} |"
        )
    return "\n".join(lines)


def model_table() -> str:
    """The model presets as a Markdown table, with the derived sizes."""
    lines = [
        "| model | layers | hidden | heads | MLP | vocab | parameters | weights GB | KV bytes / token |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in MODELS.values():
        mlp = f"{m.intermediate_size} {'gated' if m.gated_mlp else ''}".strip()
        lines.append(
            f"| {m.name} | {m.num_layers} | {m.hidden_size} | {m.num_heads} | {mlp} "
            f"| {m.vocab_size} | {m.num_parameters / 1e9:.2f} B | {m.weight_bytes / 1e9:.1f} "
            f"| {m.kv_bytes_per_token:,} |"
        )
    return "\n".join(lines)


__all__ = [
    "GPU",
    "GPUS",
    "MODELS",
    "GiB",
    "ModelSpec",
    "get_gpu",
    "get_model",
    "gpu_table",
    "model_table",
]
