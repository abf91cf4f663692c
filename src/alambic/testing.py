"""The tiny LM setup shared by tests, benchmarks and docs: real text, tiny models.

Everything is built in code from the Python standard library's source (present
on every machine), so nothing is downloaded:

    python -m alambic.testing /tmp/tiny   # corpus, tokenizer, a trained 2-layer teacher
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from alambic.data.stdlib_corpus import build_tokenizer, stdlib_module_texts


def tiny_llama(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0, **overrides):
    """A Llama-style causal LM with random, seeded weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        **overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def chunk_text(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size) if text[i : i + size].strip()]


def write_stdlib_corpus(
    folder: Path, n_train: int = 12, n_heldout: int = 3, chars_per_record: int = 600, vocab_size: int = 384, seed: int = 0
) -> dict:
    """train.jsonl / eval.jsonl of stdlib source chunks (whole modules held out) and a tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train_texts, heldout_texts = stdlib_module_texts(n_train, n_heldout, seed)
    for name, texts in (("train", train_texts), ("eval", heldout_texts)):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for text in texts:
                for chunk in chunk_text(text, chars_per_record):
                    handle.write(json.dumps({"text": chunk}) + "\n")
    tokenizer = build_tokenizer(train_texts, vocab_size)
    tokenizer.save_pretrained(folder / "tokenizer")
    return {"train": folder / "train.jsonl", "eval": folder / "eval.jsonl", "tokenizer": folder / "tokenizer"}


def save_model_with_tokenizer(model, tokenizer_folder: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_folder).save_pretrained(out)
    return out


def build_tiny_setup(folder: Path, teacher_steps: int = 150, seed: int = 0, progress: bool = False) -> dict:
    """Corpus + tokenizer + a teacher trained briefly (supervised, through the same loop)."""
    from alambic.config import DistillConfig
    from alambic.training.loop import run_distillation

    folder = Path(folder)
    paths = write_stdlib_corpus(folder / "data", seed=seed)
    vocab = len(__import__("transformers").AutoTokenizer.from_pretrained(paths["tokenizer"]))
    init = save_model_with_tokenizer(tiny_llama(vocab, hidden=64, layers=2, seed=seed), paths["tokenizer"], folder / "teacher_init")
    config = DistillConfig.model_validate(
        {
            "student": {"model": str(init)},
            "data": {"train": str(paths["train"]), "eval": str(paths["eval"]), "max_length": 128},
            "loss": {"alpha": 1.0},
            "train": {
                "output_dir": str(folder / "teacher_run"), "max_steps": teacher_steps, "batch_size": 16,
                "lr": 3e-3, "warmup_steps": 10, "seed": seed, "progress": progress, "cpu": True,
            },
        }
    )
    result = run_distillation(config, overwrite=True)
    student_init = save_model_with_tokenizer(
        tiny_llama(vocab, hidden=32, layers=1, heads=2, seed=seed + 1), paths["tokenizer"], folder / "student_init"
    )
    return {**paths, "teacher": result.output_dir / "final", "student_init": student_init, "teacher_metrics": result.final_metrics}


def describe_tiny_setup(setup: dict) -> str:
    """What `python -m alambic.testing DIR` built, for people: paths, the teacher's held-out figures, next step."""
    metrics = setup.get("teacher_metrics") or {}
    figures = ", ".join(f"{key.removeprefix('eval_')} {value:.3g}" for key, value in metrics.items())
    return "\n".join([
        f"tiny setup ready in {Path(setup['train']).parent.parent}",
        f"  data     {setup['train']}, {Path(setup['eval']).name}; tokenizer {setup['tokenizer']}",
        f"  teacher  {setup['teacher']}" + (f" (held-out {figures})" if figures else ""),
        f"  student  {setup['student_init']} (untrained, 1 layer)",
        "next: alambic distill configs/tiny_kd.yaml",
    ])


def build_extras(folder: Path, progress: bool = False) -> str:
    """What `python -m alambic.testing DIR` adds to build_tiny_setup (the doc test builds the same)."""
    from alambic.testing_classify import build_tiny_classifier

    teacher = build_tiny_classifier(Path(folder) / "classify", progress=progress)["teacher"]
    return f"  classify {teacher} (BERT classifier teacher; configs/classify_transfer.yaml)"


if __name__ == "__main__":
    from alambic import output

    output.configure(output.pop_verbose(sys.argv))
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny")
    print(describe_tiny_setup(build_tiny_setup(folder, progress=True)))
    print(build_extras(folder, progress=True))
