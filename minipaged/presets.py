"""Built-in models: tiny transformers configs with seeded random weights, and a byte-level tokenizer.

Nothing is downloaded: a preset is a transformers config small enough to run anywhere, initialized
from a seed, so outputs are reproducible but meaningless (random weights). The engine runs them
exactly as it runs a real checkpoint loaded from a local directory. "tiny-llama" is the default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
)

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3  # byte b is token b + 3
VOCAB_SIZE = 256 + BYTE_OFFSET


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


def _llama(**kw) -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=kw.get("hidden", 64),
        intermediate_size=kw.get("hidden", 64) * 2,
        num_hidden_layers=kw.get("layers", 2),
        num_attention_heads=kw.get("heads", 4),
        num_key_value_heads=kw.get("kv_heads", 2),
        max_position_embeddings=1024,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny-llama": _llama,
    "small-llama": lambda: _llama(hidden=512, layers=8, heads=8, kv_heads=2),
    "tiny-qwen2": lambda: Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    ),
    "tiny-mistral": lambda: MistralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        sliding_window=None,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    ),
    "tiny-gpt2": lambda: GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=1024,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    ),
    "tiny-opt": lambda: OPTConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,
        word_embed_proj_dim=64,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    ),
}
PRESETS = tuple(CONFIGS)
DEFAULT_PRESET = "tiny-llama"


def load_preset(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The preset's model with weights drawn from `seed` (the global RNG is left as it was).

    Raises:
        ValueError: if `name` is not a preset (the message lists them).
    """
    from transformers import AutoModelForCausalLM

    if name not in CONFIGS:
        raise ValueError(f"model must be a preset ({', '.join(PRESETS)}) or a local directory, got {name!r}")
    config = CONFIGS[name]()
    config.initializer_range = 0.2  # larger than the usual 0.02: outputs vary more, ties are rarer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
