"""The trained preset "tiny-llama-docs": shipped, small, as documented, served exactly, and readable.

The engine's greedy output must equal transformers' own generate token for token, as for every
random-weight preset; what this preset adds is text a reader can check by eye, so the last tests
hold it to that: the greedy continuation of a docs-like prompt is printable English made of words
from the docs, which random weights (the control) do not produce, and it is the sample that
docs/engine/trained-preset.md shows.
"""

from __future__ import annotations

import random
import re
import string
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from minipaged import LLM, SamplingParams
from minipaged.presets import ByteTokenizer, load_preset
from minipaged.trained_preset import WEIGHTS_DIR, load_trained_preset

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTED_CONFIG = {  # docs/engine/trained-preset.md, "Architecture"
    "model_type": "llama",
    "vocab_size": 259,
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
NUM_PARAMETERS = 1_674_048
DOCS_PROMPTS = ["The block table", "Paging is"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def docs_words() -> set[str]:
    """Every lower-case word of three letters or more in the docs pages and the README."""
    pages = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
    text = " ".join(p.read_text(encoding="utf-8") for p in pages)
    return {w.lower() for w in re.findall(r"[A-Za-z]{3,}", text)}


def random_docs_prompts(rng: random.Random, num: int) -> list[str]:
    """`num` prompts cut from README.md at word boundaries, 2 to 6 words long."""
    words = (ROOT / "README.md").read_text(encoding="utf-8").split()
    prompts = []
    for _ in range(num):
        start, length = rng.randrange(len(words) - 6), rng.randint(2, 6)
        prompts.append(" ".join(words[start : start + length]))
    return prompts


def hf_greedy(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """transformers' own greedy generate (SDPA attention, its own KV cache), generated tokens only."""
    out = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.int64),
        do_sample=False,
        max_new_tokens=max_tokens,
        min_new_tokens=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt_ids) :].tolist()


def readability(text: str, vocabulary: set[str]) -> tuple[float, set[str]]:
    """(share of characters that are printable ASCII, the distinct docs words among the text's words)."""
    printable = sum(ch in string.printable for ch in text) / max(1, len(text))
    words = {w.lower() for w in re.findall(r"[A-Za-z]{3,}", text)}
    return printable, words & vocabulary


def test_the_shipped_files_exist_and_are_small():
    files = {p.name: p.stat().st_size for p in WEIGHTS_DIR.iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors"} <= set(files)
    assert sum(files.values()) < 5 * 2**20, files
    with safe_open(WEIGHTS_DIR / "model.safetensors", framework="pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 (not a dict)
    assert dtypes == {"BF16"}  # stored in bfloat16: half the bytes of float32


def test_loading_gives_the_documented_config():
    model = load_trained_preset()
    config = model.config.to_dict()
    assert {key: config[key] for key in DOCUMENTED_CONFIG} == DOCUMENTED_CONFIG
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == NUM_PARAMETERS
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.training


def test_every_dtype_loads_the_same_stored_values():
    as_float32 = load_trained_preset(torch.float32).state_dict()
    as_bfloat16 = load_trained_preset(torch.bfloat16).state_dict()
    assert as_float32.keys() == as_bfloat16.keys()
    for name, tensor in as_bfloat16.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor.float(), as_float32[name]), (
            name
        )  # bf16 -> fp32 is exact


@pytest.mark.parametrize("bad", ["float32", torch.int64, None])
def test_a_bad_dtype_is_refused(bad):
    with pytest.raises(TypeError, match=r"dtype must be one of torch\.float32"):
        load_trained_preset(bad)


def test_engine_greedy_equals_transformers_generate():
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    prompts = DOCS_PROMPTS + random_docs_prompts(rng, 2)
    block_size = rng.choice([4, 8, 16])
    tokenizer = ByteTokenizer()
    oracle = load_trained_preset()
    oracle.set_attn_implementation("sdpa")
    llm = LLM(
        load_trained_preset(),
        tokenizer=tokenizer,
        num_gpu_blocks=64,
        block_size=block_size,
    )
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs, strict=True):
        expected = hf_greedy(oracle, tokenizer.encode(prompt), MAX_TOKENS)
        got = list(output.outputs[0].token_ids)
        assert got == expected, (
            f"seed {seed}, block_size {block_size}, prompt {prompt!r}"
        )
        assert output.outputs[0].text == tokenizer.decode(expected)


def test_greedy_text_is_readable_where_random_weights_are_not(docs_words):
    docs_page = (ROOT / "docs" / "engine" / "trained-preset.md").read_text(
        encoding="utf-8"
    )
    tokenizer = ByteTokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)
    trained = LLM(
        load_trained_preset(), tokenizer=tokenizer, num_gpu_blocks=64, block_size=16
    )
    control = LLM(
        load_preset("tiny-llama", seed=random.randrange(2**31)),
        tokenizer=tokenizer,
        num_gpu_blocks=64,
        block_size=16,
    )
    for prompt in DOCS_PROMPTS:
        text = trained.generate([prompt], params, use_tqdm=False)[0].outputs[0].text
        printable, words = readability(text, docs_words)
        assert printable > 0.9, f"{prompt!r} -> {text!r}"
        assert len(words) >= 3, f"{prompt!r} -> {text!r}: docs words {sorted(words)}"
        shown = " ".join(docs_page.split())  # the page wraps long lines at a space
        assert " ".join((prompt + text).split()) in shown, (
            f"docs/engine/trained-preset.md lacks {text!r}"
        )
        noise = control.generate([prompt], params, use_tqdm=False)[0].outputs[0].text
        noise_printable, noise_words = readability(noise, docs_words)
        assert noise_printable < 0.9 or len(noise_words) < 3, (
            f"random weights read well: {noise!r}"
        )
