"""Cross-tokenizer distillation: a teacher whose vocabulary differs from the student's.

Plugs into the one loop like every mode:
- the main logit loss sees no teacher (its vocabulary does not match), so it
  is the student's plain CE;
- an extra term runs the teacher on its own tokenization of the same text
  (`CrossTokenizerTeacher`), aligns positions through character offsets and
  adds the cross-tokenizer divergence (ULD or token-aligned KL) so that the
  total is `alpha * CE + (1 - alpha) * divergence`, as in plain KD. It reads
  the student's logits from the main path's forward (no second forward).

The teacher model is loaded once, by build_models; no live-teacher source is
built for the main path (this mode provides "no main-path teacher").

    alambic distill configs/cross_tokenizer.yaml
"""

from __future__ import annotations

from pathlib import Path

import torch

from alambic.config import ModelConfig
from alambic.data import IGNORE
from alambic.errors import ConfigError
from alambic.losses import token_cross_entropy
from alambic.losses.cross_tokenizer import projected_teacher_kl, uld_distance
from alambic.losses.options import LossOptions
from alambic.models.alignment import align_positions, char_ends, same_vocabulary, student_row_ends, vocabulary_map
from alambic.teachers.base import SignalRequest, TeacherSignal
from alambic.training.modes.base import TeacherChoice


class CrossTokenizerTeacher:
    """Re-tokenizes each student row with the teacher's tokenizer and runs the teacher on it.

    The row's text is recovered by decoding the student's tokens, so any data
    format works. `extras["alignment"]` holds (row, student position, teacher
    position) triples of positions that have read the same text.
    """

    def __init__(self, model, teacher_tokenizer, student_tokenizer, name: str = "teacher"):
        self.model = model
        self.teacher_tokenizer = teacher_tokenizer
        self.student_tokenizer = student_tokenizer
        self.teacher_vocab = len(teacher_tokenizer)
        self.name = name

    def _teacher_row(self, text: str) -> tuple[list[int], list[int]]:
        ids, ends = char_ends(self.teacher_tokenizer, text)
        bos = self.teacher_tokenizer.bos_token_id
        if bos is not None:  # the teacher's first prediction is then conditioned on no text, like the student's
            ids, ends = [bos, *ids], [0, *ends]
        return ids, ends

    @torch.no_grad()
    def __call__(self, batch: dict, request: SignalRequest | None = None) -> TeacherSignal:
        device = batch["input_ids"].device
        teacher_rows, triples = [], []
        for row, (ids, mask) in enumerate(zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())):
            student_ids = [token for token, keep in zip(ids, mask) if keep]
            text, student_ends = student_row_ends(self.student_tokenizer, student_ids)
            teacher_ids, teacher_ends = self._teacher_row(text)
            teacher_rows.append(teacher_ids or [self.teacher_tokenizer.pad_token_id])
            triples += [(row, s, t) for s, t in align_positions(student_ends, teacher_ends)]
        length = max(len(r) for r in teacher_rows)
        pad = self.teacher_tokenizer.pad_token_id
        input_ids = torch.full((len(teacher_rows), length), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(teacher_rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        alignment = torch.tensor(triples, dtype=torch.long, device=device).reshape(-1, 3)
        return TeacherSignal(
            logits=logits[..., : self.teacher_vocab],
            extras={"alignment": alignment, "teacher_input_ids": input_ids, "teacher_attention_mask": attention_mask},
        )


class CrossTokenizerTerm:
    """Extra loss term: (1 - alpha) * (divergence - CE) on top of the main path's CE.

    The main path computes the full CE because it sees no teacher; subtracting
    the same CE here leaves alpha * CE + (1 - alpha) * divergence, so
    `loss.alpha` means what it means in plain KD.
    """

    name = "cross_tokenizer"

    def __init__(self, source: CrossTokenizerTeacher, method: str, options: LossOptions, vocab_map=None):
        self.source = source
        self.method = method
        self.options = options
        self.vocab_map = vocab_map

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if self.method == "uld":
            return uld_distance(student_logits, teacher_logits, self.options.temperature)
        return projected_teacher_kl(student_logits, teacher_logits, self.vocab_map, self.options.temperature)

    def __call__(self, step) -> dict:
        batch = step.batch
        signal = self.source(batch, SignalRequest())
        logits = step.logits()  # the main path's forward: same inputs, so no second student forward
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE
        row_weight = batch["weight"] if "weight" in batch else torch.ones(labels.shape[0], device=labels.device)
        ce_sum = (token_cross_entropy(logits[:, :-1], labels) * mask * row_weight[:, None]).sum()
        rows, student_pos, teacher_pos = signal.extras["alignment"].unbind(-1)
        # Only positions whose next token carries a loss count, as in the main path.
        inside = student_pos < labels.shape[1]
        rows, student_pos, teacher_pos = rows[inside], student_pos[inside], teacher_pos[inside]
        carries = mask[rows, student_pos]
        rows, student_pos, teacher_pos = rows[carries], student_pos[carries], teacher_pos[carries]
        values = self.divergence(logits[rows, student_pos], signal.logits[rows, teacher_pos])
        divergence_sum = (values * row_weight[rows]).sum()
        total = (1.0 - self.options.alpha) * (divergence_sum - ce_sum)
        return {"loss": total, "kd": divergence_sum.detach(), "xt_aligned": torch.tensor(float(rows.numel()))}


def _teacher_tokenizer(setup, config):
    path = config.cross_tokenizer.teacher_tokenizer
    if path is None:
        return setup.teacher_tokenizer
    if not Path(path).expanduser().exists():
        raise ConfigError(
            f"cross_tokenizer.teacher_tokenizer folder {path!r} does not exist",
            "point it at a folder with the teacher's tokenizer files, or leave it out to use teacher.model's",
        )
    from alambic.models import load_tokenizer

    trust = config.teacher.trust_remote_code
    return load_tokenizer(ModelConfig(model=str(Path(path).expanduser()), trust_remote_code=trust), role="teacher")


def teacher(setup, config) -> TeacherChoice | None:
    """No teacher for the main logit path (its vocabulary differs): the teacher runs inside the term."""
    section = config.cross_tokenizer
    if section is None:
        return None
    teacher_tokenizer = _teacher_tokenizer(setup, config)
    if teacher_tokenizer is None or setup.teacher_model is None:
        raise ConfigError(
            "cross_tokenizer needs two tokenizers: the teacher's was not found",
            "set teacher.model to a folder with a tokenizer, or cross_tokenizer.teacher_tokenizer",
        )
    if same_vocabulary(teacher_tokenizer, setup.tokenizer):
        raise ConfigError(
            "cross_tokenizer is set but the teacher and the student use the same tokenizer",
            "remove cross_tokenizer: plain logit KD is exact (and cheaper) when vocabularies match",
        )
    rows = setup.teacher_model.get_output_embeddings().weight.shape[0]
    if rows < len(teacher_tokenizer):
        raise ConfigError(
            f"the teacher model has {rows} output rows but its tokenizer {len(teacher_tokenizer)} tokens",
            "set cross_tokenizer.teacher_tokenizer to the tokenizer the teacher was trained with",
        )
    # The main logit path and the held-out KL compare logits token id by token id: no teacher there.
    return TeacherChoice(None, config.teacher.model, evaluable=False, tokenizer=teacher_tokenizer)


def configure(setup, config) -> None:
    section = config.cross_tokenizer
    if section is None:
        return
    teacher_tokenizer = setup.teacher_tokenizer
    source = CrossTokenizerTeacher(setup.teacher_model, teacher_tokenizer, setup.tokenizer, setup.teacher_name or "teacher")
    vocab_map = vocabulary_map(teacher_tokenizer, setup.tokenizer) if section.method == "align" else None
    setup.extra_terms.append(CrossTokenizerTerm(source, section.method, LossOptions.from_config(config.loss), vocab_map))


def build_demo_student(tiny_folder: str | Path, vocab_size: int = 300) -> Path:
    """A 1-layer student with its own byte-level BPE (another vocabulary size), for the tiny setup."""
    import json

    from alambic.data.stdlib_corpus import build_tokenizer
    from alambic.testing import tiny_llama

    tiny_folder = Path(tiny_folder)
    train = tiny_folder / "data" / "train.jsonl"
    if not train.exists():
        raise ConfigError(f"{train} does not exist", "make the tiny setup first: python -m alambic.testing runs/tiny")
    texts = [json.loads(line)["text"] for line in train.read_text(encoding="utf-8").splitlines() if line.strip()]
    tokenizer = build_tokenizer(texts, vocab_size)
    folder = tiny_folder / f"student_bpe{vocab_size}"
    tiny_llama(len(tokenizer), hidden=32, layers=1, heads=2, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import sys

    print(build_demo_student(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny"))
