"""Train the "tiny-llama-docs" preset: a byte-level Llama that learned to write like minipaged's docs.

Serving idea: an engine is judged by what it returns, and random weights return byte noise that no
student can read. A model trained for a few minutes on the project's own prose returns English-like
text about pages and blocks, so a reader can see at a glance that minipaged's paged engine and
transformers' own generate() write the same sentence (docs/engine/trained-preset.md).

Everything is local: the corpus is this repository's docs (docs/**/*.md), README.md and the module
docstrings of minipaged/. The data order is drawn from --seed, so a rerun on the same corpus and the
same machine gives the same weights, as long as the --steps budget ends the run before the
--max-minutes one does (training_log.json records which). Run from the repository root:

    python scripts/train_tiny_preset.py   # the shipped weights: --steps 1400 --batch-size 16 --seed 0

It writes minipaged/weights/tiny-llama-docs/{config.json, model.safetensors, training_log.json} and
the loss curve docs/engine/img/trained-preset-loss.png.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(
    0, str(ROOT)
)  # run as a script from a checkout: import minipaged from it

from minipaged.presets import BOS_ID, BYTE_OFFSET, EOS_ID, PAD_ID, VOCAB_SIZE  # noqa: E402

OUT_DIR = ROOT / "minipaged" / "weights" / "tiny-llama-docs"
PLOT_PATH = ROOT / "docs" / "engine" / "img" / "trained-preset-loss.png"
OWN_PAGE = (
    "docs/engine/trained-preset.md"  # the page about this model, kept out of its corpus
)
SAMPLE_PROMPTS = ("The block table", "Paging is", "A sequence")


def model_config():
    """The preset's architecture: 4 layers, hidden 192, 6 query heads sharing 2 KV heads (GQA)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,  # 3 query heads per KV head: the paged kernels' GQA path
        max_position_embeddings=512,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )


def corpus_files() -> list[Path]:
    """The training documents, in a fixed order: docs pages, README.md, then Python modules."""
    docs = sorted(
        p
        for p in (ROOT / "docs").rglob("*.md")
        if p.relative_to(ROOT).as_posix() != OWN_PAGE
    )
    modules = sorted((ROOT / "minipaged").rglob("*.py"))
    return [*docs, ROOT / "README.md", *modules]


def document_text(path: Path) -> str:
    """A page's text, or a module's docstring (empty when it has none)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".py":
        return text
    return ast.get_docstring(ast.parse(text)) or ""


def build_corpus() -> bytes:
    """All documents' UTF-8 bytes, separated by blank lines."""
    texts = (document_text(p).strip() for p in corpus_files())
    return "\n\n".join(t for t in texts if t).encode("utf-8") + b"\n"


def word_starts(data: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Offsets where a training window may begin: just after a space or newline.

    A prompt starts a word right after BOS, so the windows do too.
    """
    space = (data == ord(" ")) | (data == ord("\n"))
    starts = torch.nonzero(space[:-seq_len]).flatten() + 1  # [num_starts]
    return starts


def batches(
    data: torch.Tensor, starts: torch.Tensor, batch_size: int, seq_len: int, generator
):
    """Endless batches `[batch_size, seq_len]` of token ids: BOS, then seq_len - 1 bytes."""
    offsets = torch.arange(seq_len - 1)  # [seq_len - 1]
    bos = torch.full((batch_size, 1), BOS_ID, dtype=torch.long)
    while True:
        picks = starts[
            torch.randint(len(starts), (batch_size,), generator=generator)
        ]  # [batch_size]
        window = (
            data[picks[:, None] + offsets[None, :]] + BYTE_OFFSET
        )  # [batch_size, seq_len - 1]
        yield torch.cat([bos, window], dim=1)  # [batch_size, seq_len]


def learning_rate(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then a cosine decay to a tenth of `peak` as progress goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def training_progress(
    step: int, steps: int, elapsed_s: float, max_minutes: float
) -> float:
    """How far along the run is: the step budget or the time budget, whichever is further spent.

    On an idle machine the steps end first and the run is reproducible step for step; on a busy one
    the clock ends it, and the learning rate still decays to its floor instead of stopping mid-way.
    """
    return max(step / steps, elapsed_s / (max_minutes * 60))


@torch.no_grad()
def evaluate(model, val_batches: list[torch.Tensor]) -> float:
    """Mean next-byte cross-entropy (nats) on the held-out batches."""
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in val_batches]
    model.train()
    return sum(losses) / len(losses)


def greedy_samples(model, max_new_tokens: int = 80) -> dict[str, str]:
    """Greedy continuations of the sample prompts, decoded with the preset's ByteTokenizer."""
    from minipaged.presets import ByteTokenizer

    tok = ByteTokenizer()
    model.eval()
    samples = {}
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        out = model.generate(
            ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=PAD_ID
        )
        samples[prompt] = tok.decode(out[0, ids.shape[1] :].tolist())
    return samples


def plot_losses(history: dict, path: Path) -> None:
    """The train loss per step (and its moving average) with the validation loss on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = history["train_loss"]
    window = 20
    smooth = [
        sum(train[max(0, i - window + 1) : i + 1])
        / len(train[max(0, i - window + 1) : i + 1])
        for i in range(len(train))
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(train, color="#bbbbbb", linewidth=0.8, label="train (per step)")
    ax.plot(smooth, color="#1f77b4", label=f"train ({window}-step mean)")
    steps, vals = zip(*history["val_loss"], strict=True)
    ax.plot(steps, vals, "o-", color="#d62728", label="validation (held-out 5%)")
    ax.axhline(
        math.log(256), color="#999999", linestyle=":", label="uniform over bytes (5.55)"
    )
    ax.set_xlabel("step")
    ax.set_ylabel("next-byte cross-entropy (nats)")
    ax.set_title("tiny-llama-docs: training on minipaged's own docs")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _relative(path: Path) -> str:
    """`path` relative to the repository root when it lies inside it (the log holds no local paths)."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps",
        type=int,
        default=1400,
        help="optimizer steps (the schedule's length)",
    )
    parser.add_argument(
        "--max-minutes", type=float, default=12.0, help="time budget (LR decays by it)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--seq-len",
        type=int,
        default=256,
        help="tokens per window: BOS + seq_len - 1 bytes",
    )
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bfloat16 autocast (CPU)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: a busy 2-core machine ran 2 far slower)",
    )
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--plot", type=Path, default=PLOT_PATH)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "threads", "eval_every", "warmup"):
        if getattr(args, name) < 1:
            parser.error(
                f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
            )
    if not 2 <= args.seq_len <= model_config().max_position_embeddings:
        parser.error(f"--seq-len must be in [2, 512], got {args.seq_len}")
    return args


def main(argv=None) -> None:
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    corpus = build_corpus()
    data = torch.tensor(list(corpus), dtype=torch.long)  # [num_bytes]
    split = int(len(data) * 0.95)
    train_data, val_data = data[:split], data[split:]
    generator = torch.Generator().manual_seed(args.seed)
    train_iter = batches(
        train_data,
        word_starts(train_data, args.seq_len),
        args.batch_size,
        args.seq_len,
        generator,
    )
    val_iter = batches(
        val_data,
        word_starts(val_data, args.seq_len),
        args.batch_size,
        args.seq_len,
        torch.Generator().manual_seed(args.seed + 1),
    )
    val_batches = [next(val_iter) for _ in range(4)]

    model = LlamaForCausalLM(model_config())
    model.train()
    num_params = sum(p.numel() for p in model.parameters())
    print(
        f"corpus {len(corpus):,} bytes from {len(corpus_files())} files; model {num_params:,} parameters"
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1
    )
    history = {"train_loss": [], "val_loss": [], "lr": []}
    start = time.time()
    bar = tqdm(total=args.steps, desc="train", unit="step")
    step, progress = 0, 0.0
    while progress < 1.0:
        lr = learning_rate(step, progress, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(train_iter)  # [batch_size, seq_len]
        with torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=args.bf16
        ):  # master weights stay fp32
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        progress = training_progress(
            step, args.steps, time.time() - start, args.max_minutes
        )
        history["train_loss"].append(round(loss.item(), 4))
        history["lr"].append(lr)
        if step % args.eval_every == 0 or progress >= 1.0:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                history["val_loss"].append(
                    (step, round(evaluate(model, val_batches), 4))
                )
            bar.write(f"step {step}: val loss {history['val_loss'][-1][1]:.3f}")
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
    bar.close()
    if step < args.steps:
        print(
            f"the clock ended the run after {step} of {args.steps} steps (--max-minutes)"
        )
    minutes = (time.time() - start) / 60

    model = model.to(
        torch.bfloat16
    )  # 2 bytes a weight keeps the shipped file under 4 MB
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    samples = greedy_samples(model.float())
    for prompt, text in samples.items():
        print(f"{prompt!r} -> {text!r}")
    log = {
        "command": "python scripts/train_tiny_preset.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {
            k: _relative(v) if isinstance(v, Path) else v for k, v in vars(args).items()
        },
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)",
        "torch": torch.__version__,
        "minutes": round(minutes, 2),
        "steps_done": len(history["train_loss"]),
        "ended_by": "steps"
        if len(history["train_loss"]) >= args.steps
        else "max-minutes",
        "num_parameters": num_params,
        "corpus_bytes": len(corpus),
        "corpus_sha256": hashlib.sha256(corpus).hexdigest(),
        "greedy_samples_bf16": samples,
        **history,
    }
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    plot_losses(history, args.plot)
    print(f"wrote {args.out} and {args.plot} after {minutes:.1f} minutes")


if __name__ == "__main__":
    main()
