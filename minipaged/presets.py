"""Built-in models: tiny transformers configs with seeded random weights, and a byte-level tokenizer.

Nothing is downloaded: a preset is a transformers config small enough to run anywhere, initialized
from a seed, so outputs are reproducible but meaningless (random weights). The engine runs them
exactly as it runs a real checkpoint loaded from a local directory. "tiny-llama" is the default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3  # byte b is token b + 3
VOCAB_SIZE = 256 + BYTE_OFFSET
SPECIAL_IDS = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}


class ByteTokenizer:
    """UTF-8 bytes as tokens, after three special ids (pad 0, bos 1, eos 2): strings with no download."""

    pad_token_id, bos_token_id, eos_token_id = PAD_ID, BOS_ID, EOS_ID
    vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        """`[bos] + bytes`, as Llama-style tokenizers start a prompt."""
        return [BOS_ID] + [b + BYTE_OFFSET for b in text.encode("utf-8")]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        data = bytes(t - BYTE_OFFSET for t in token_ids if t >= BYTE_OFFSET)
        return data.decode("utf-8", errors="replace")


# The configs are built, and transformers imported, only when a preset is loaded: importing
# transformers takes seconds, and `import minipaged` (or `minipaged --help`) needs no model.


def _llama(
    hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2
) -> PretrainedConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        **SPECIAL_IDS,
    )


def _small_llama() -> PretrainedConfig:
    return _llama(hidden=512, layers=8, heads=8, kv_heads=2)


def _qwen2() -> PretrainedConfig:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        **SPECIAL_IDS,
    )


def _mistral() -> PretrainedConfig:
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        sliding_window=None,
        **SPECIAL_IDS,
    )


def _gpt2() -> PretrainedConfig:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=1024,
        **SPECIAL_IDS,
    )


def _opt() -> PretrainedConfig:
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,
        word_embed_proj_dim=64,
        **SPECIAL_IDS,
    )


CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny-llama": _llama,
    "small-llama": _small_llama,
    "tiny-qwen2": _qwen2,
    "tiny-mistral": _mistral,
    "tiny-gpt2": _gpt2,
    "tiny-opt": _opt,
}
# shipped trained weights (minipaged/trained_preset.py)
TRAINED_PRESETS = ("tiny-llama-docs",)
PRESETS = (*CONFIGS, *TRAINED_PRESETS)
DEFAULT_PRESET = "tiny-llama"


def load_preset(
    name: str, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """The preset's model with weights drawn from `seed` (the global RNG is left as it was).

    A trained preset ("tiny-llama-docs") loads its shipped weights instead: `seed` does not apply.

    Raises:
        ValueError: if `name` is not a preset (the message lists them).
    """
    if name in TRAINED_PRESETS:
        from minipaged.trained_preset import load_trained_preset

        return load_trained_preset(dtype)
    from transformers import AutoModelForCausalLM

    if name not in CONFIGS:
        raise ValueError(
            f"model must be a preset ({', '.join(PRESETS)}) or a local directory, got {name!r}"
        )
    config = CONFIGS[name]()
    # larger than the usual 0.02: outputs vary more, ties are rarer
    config.initializer_range = 0.2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
