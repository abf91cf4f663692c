"""A tiny real teacher behind the loopback prompt-logprob server, and configs that use it (served-teacher tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from alambic.teachers.base import SignalRequest, TeacherSignal
from alambic.teachers.live import LiveTeacher

TOP_K = 8
NAME = "tiny-teacher"
FAST_RETRY = {"max_attempts": 5, "base_delay_s": 0.01, "max_delay_s": 0.05, "max_retry_after_s": 1.0}


@dataclass
class Tiny:
    folder: Path
    train: Path
    teacher: Path
    student: Path
    tokenizer: object
    model: object
    server: object


def build_tiny(folder: Path) -> Tiny:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alambic.teachers.testing.logprob_server import LogprobServer, model_scorer
    from alambic.testing import save_model_with_tokenizer, tiny_llama, write_stdlib_corpus

    paths = write_stdlib_corpus(folder / "data", n_train=2, n_heldout=1, chars_per_record=300, vocab_size=300)
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    vocab = len(tokenizer)
    # A larger init range than the default gives peaked, non-trivial teacher distributions.
    teacher = save_model_with_tokenizer(tiny_llama(vocab, hidden=32, layers=1, initializer_range=0.3),
                                        paths["tokenizer"], folder / "teacher")
    student = save_model_with_tokenizer(tiny_llama(vocab, hidden=16, layers=1, heads=2, seed=1),
                                        paths["tokenizer"], folder / "student")
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    server = LogprobServer(model_scorer(model, vocab), NAME, tokenizer, max_logprobs=20).start_in_thread()
    return Tiny(folder, paths["train"], teacher, student, tokenizer, model, server)


def run_config(tiny: Tiny, output_dir, teacher: dict | None = None, **train) -> dict:
    """Served by default; pass `teacher` for a live or cached one."""
    served = {"server": tiny.server.base_url, "server_model": NAME, "top_k": TOP_K,
              "served": {"timeout_s": 5.0, "retry": dict(FAST_RETRY)}}
    return {
        "teacher": teacher or served,
        "student": {"model": str(tiny.student)},
        "data": {"train": str(tiny.train), "max_length": 48, "limit": 40},
        "loss": {"objective": "forward_kl", "temperature": 1.0, "alpha": 0.2},
        "train": {"output_dir": str(output_dir), "max_steps": 4, "batch_size": 4, "grad_accum": 2, "lr": 1e-2,
                  "max_grad_norm": None, "progress": False, "cpu": True, "seed": 0, **train},
    }


class LiveTopK(LiveTeacher):
    """The live teacher restricted to its top-k: the logit cache's signal, computed in the loop."""

    def __call__(self, batch: dict, request: SignalRequest) -> TeacherSignal:
        from alambic.cache.writer import topk_signal

        logits = super().__call__(batch, SignalRequest()).logits
        ids, logprobs, tail = topk_signal(logits.reshape(-1, logits.shape[-1]), TOP_K, 1.0)
        shape = logits.shape[:-1]
        return TeacherSignal(topk_ids=ids.reshape(*shape, TOP_K), topk_logprobs=logprobs.reshape(*shape, TOP_K),
                             tail_logmass=tail.reshape(shape), temperature=1.0)


def weights(run_dir) -> dict:
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def assert_same_run(a, b, atol: float) -> None:
    """Loss history and final weights of two RunResults agree within `atol`."""
    losses_a, losses_b = [r["loss"] for r in a.history], [r["loss"] for r in b.history]
    assert len(losses_a) == len(losses_b) > 0
    for x, y in zip(losses_a, losses_b):
        assert abs(x - y) <= atol, (losses_a, losses_b)
    wa, wb = weights(a.output_dir), weights(b.output_dir)
    for key, value in wa.items():
        torch.testing.assert_close(value, wb[key], atol=atol, rtol=0)
