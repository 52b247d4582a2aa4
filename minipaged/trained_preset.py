"""A trained preset: "tiny-llama-docs", a byte-level Llama that learned to write like these docs.

Serving idea: an engine that pages the KV cache must return exactly what the model would have
returned without paging. With random weights that output is byte noise, equal but unreadable; with
weights trained for a few minutes on minipaged's own docs it is English-like text about pages and
blocks, so a student can read the engine's answer and see it is transformers' own greedy answer
(vLLM paper section 4: paging changes where the KV cache lives, never what attention computes).

The weights ship inside the package (minipaged/weights/tiny-llama-docs, bfloat16 safetensors, about
3.4 MB) and use the presets' ByteTokenizer ids. scripts/train_tiny_preset.py made them; the page
docs/engine/trained-preset.md says how, on what data and on which machine.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minipaged.limits import SUPPORTED_DTYPES  # the kernel contract's cache dtypes

TRAINED_PRESET = "tiny-llama-docs"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / TRAINED_PRESET


def trained_preset_dir() -> Path:
    """The folder holding the shipped config.json and model.safetensors.

    Raises:
        FileNotFoundError: if the package was installed without its weights (package data).
    """
    for name in ("config.json", "model.safetensors"):
        if not (WEIGHTS_DIR / name).is_file():
            raise FileNotFoundError(
                f"{WEIGHTS_DIR / name} is missing: install minipaged with its package data "
                "(pyproject [tool.setuptools.package-data]) or run scripts/train_tiny_preset.py"
            )
    return WEIGHTS_DIR


def load_trained_preset(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The trained "tiny-llama-docs" model, in eval mode, from the weights shipped in the package.

    The file stores bfloat16; any `dtype` asked for is an exact upcast (float32) or a rounding
    (float16) of those values, so every load gives the same model. Pair it with
    `minipaged.presets.ByteTokenizer`, e.g. `LLM(load_trained_preset(), tokenizer=ByteTokenizer())`.

    Args:
        dtype: the parameters' dtype: torch.float32, torch.float16 or torch.bfloat16.

    Raises:
        TypeError: if `dtype` is not one of those torch dtypes.
        FileNotFoundError: if the weights are not installed.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"dtype must be one of torch.float32, torch.float16, torch.bfloat16, got {dtype!r}"
        )
    from safetensors.torch import load_file  # lazy: importing minipaged stays light
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = trained_preset_dir()
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    # Built from the config and filled from the file, rather than from_pretrained, which draws a
    # progress bar on stderr (the CLI's errors are one line). fork_rng: the throwaway initial
    # weights must not move the caller's random state.
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(
        load_file(folder / "model.safetensors")
    )  # strict: every weight, no other
    return model.to(dtype).eval()
