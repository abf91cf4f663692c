"""Real text that every machine has: the Python standard library's own source.

Used by the tiny LM demo, the end-to-end tests and the benchmarks, so they
train on real code without downloading anything. Whole modules are held out
for evaluation (no file is split between train and held-out), test folders are
excluded, and the choice is seeded.

    python -c "from alambic.data.stdlib_corpus import stdlib_module_texts as f; t, h = f(); print(len(t), len(h))"
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo", "idlelib"}
# ~120 codec tables generated from one template: one of them in train makes another
# in held-out nearly free to predict. The LM demo, which reports absolute held-out
# quality, leaves them out; the tiny test fixtures keep the original module pool.
GENERATED_TABLES = {"encodings"}


def stdlib_files(min_bytes: int = 2_000, max_bytes: int = 60_000, skip_generated: bool = False) -> list[Path]:
    """Source files of the running interpreter's standard library, sorted by path."""
    skip = SKIP_PARTS | GENERATED_TABLES if skip_generated else SKIP_PARTS
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if skip.intersection(relative.parts) or relative.name.startswith("test_"):
            continue
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if min_bytes <= size <= max_bytes:
            files.append(path)
    return files


def stdlib_module_texts(
    n_train: int = 40, n_heldout: int = 8, seed: int = 0, skip_generated: bool = False
) -> tuple[list[str], list[str]]:
    """(train_texts, heldout_texts): whole modules, disjoint, chosen with `seed`."""
    files = stdlib_files(skip_generated=skip_generated)
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    chosen = [files[i] for i in order[: n_train + n_heldout]]

    def read(path: Path) -> str:
        return path.read_text(encoding="utf-8", errors="replace")

    return [read(p) for p in chosen[:n_train]], [read(p) for p in chosen[n_train:]]


def build_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers tokenizer.

    Byte-level means any text encodes (no unknown tokens), so bits per byte stay
    well defined for held-out code.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<bos>", "<eos>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    wrapped.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return wrapped
