"""MiniLLM: the gradient estimator is the gradient of the sequence-level reverse KL, and training lowers it."""

import itertools

import pytest
import torch

from helpers import invoke, kd_config, write_config

from alambic.losses import token_divergence
from alambic.training.modes.minillm import estimate_sequence_reverse_kl, importance_weights, long_term_surrogate
from alambic.training.sampling import mixture_log_probs

VOCAB, LENGTH = 3, 3
START = VOCAB  # the "previous token" of the first position


def _tables(seed):
    """A Markov student (trainable logits per position and previous token) and a fixed teacher."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(LENGTH, VOCAB + 1, VOCAB, generator=generator).requires_grad_(True)
    teacher = 1.5 * torch.randn(LENGTH, VOCAB + 1, VOCAB, generator=generator)
    return student, teacher


def _sequence_logprob(table, sequence):
    previous, total = START, 0.0
    for position, token in enumerate(sequence):
        total = total + torch.log_softmax(table[position, previous], -1)[token]
        previous = token
    return total


def analytic_gradient(student, teacher):
    """grad of KL(q || p) over all VOCAB**LENGTH sequences, by enumeration."""
    kl = 0.0
    for sequence in itertools.product(range(VOCAB), repeat=LENGTH):
        log_q, log_p = _sequence_logprob(student, sequence), _sequence_logprob(teacher, sequence)
        kl = kl + log_q.exp() * (log_q - log_p)
    return torch.autograd.grad(kl, student)[0]


def _sample(student, teacher, n, teacher_mix, generator):
    previous = torch.full((n,), START)
    tokens, sampling = [], []
    with torch.no_grad():
        for position in range(LENGTH):
            log_q = torch.log_softmax(student[position, previous], -1)
            log_p = torch.log_softmax(teacher[position, previous], -1)
            mixture = mixture_log_probs(log_q, log_p, teacher_mix)
            token = torch.multinomial(mixture.exp(), 1, generator=generator).squeeze(-1)
            tokens.append(token)
            sampling.append(mixture.gather(-1, token[:, None]).squeeze(-1))
            previous = token
    return torch.stack(tokens, 1), torch.stack(sampling, 1)


def estimated_gradient(student, teacher, tokens, sampling, importance, long_term=True):
    """The training surrogate: weighted token-level reverse KL (the loop's loss) + the long-term PG term."""
    previous = torch.cat([torch.full((tokens.shape[0], 1), START), tokens[:, :-1]], 1)
    positions = torch.arange(LENGTH).expand_as(tokens)
    student_logits, teacher_logits = student[positions, previous], teacher[positions, previous]
    student_logprob = torch.log_softmax(student_logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    teacher_logprob = torch.log_softmax(teacher_logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    weights = importance_weights(student_logprob, sampling, mask, importance)
    loss = (weights * token_divergence(student_logits, teacher_logits, "reverse_kl")).sum()
    if long_term:
        loss = loss + long_term_surrogate(student_logprob, teacher_logprob, weights, mask, False).sum()
    return torch.autograd.grad(loss / tokens.shape[0], student)[0]


def _z_scores(teacher_mix, importance, long_term=True, chunks=40, per_chunk=1000):
    student, teacher = _tables(0)
    generator = torch.Generator().manual_seed(1)
    estimates = torch.stack([
        estimated_gradient(student, teacher, *_sample(student, teacher, per_chunk, teacher_mix, generator),
                           importance, long_term)
        for _ in range(chunks)
    ])
    standard_error = estimates.std(0) / chunks**0.5
    return ((estimates.mean(0) - analytic_gradient(student, teacher)).abs() / (standard_error + 1e-6)).max()


@pytest.mark.parametrize("teacher_mix, importance", [(0.0, "token"), (0.4, "sequence")])
def test_policy_gradient_is_unbiased_for_the_sequence_reverse_kl(teacher_mix, importance):
    assert _z_scores(teacher_mix, importance) < 4.5


def test_the_check_detects_biased_estimators():
    """The same check rejects the token-level reverse KL alone (not the sequence-level gradient) and the
    paper's per-token importance weights under teacher-mixed sampling (a documented approximation)."""
    assert _z_scores(0.0, "token", long_term=False) > 8
    assert _z_scores(0.4, "token") > 8


def test_token_importance_weights_are_one_for_pure_student_samples():
    log_q = torch.log_softmax(torch.randn(4, 5, 7), -1)
    chosen = log_q[..., 0]
    mask = torch.ones(4, 5, dtype=torch.bool)
    assert torch.allclose(importance_weights(chosen, mixture_log_probs(log_q, log_q * 2, 0.0)[..., 0], mask), torch.ones(4, 5))
    mixed = mixture_log_probs(log_q, torch.log_softmax(torch.randn(4, 5, 7), -1), 0.5)[..., 0]
    assert not torch.allclose(importance_weights(chosen, mixed, mask, "sequence"), torch.ones(4, 5))


def test_training_lowers_the_sequence_reverse_kl(tiny_setup, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alambic.config import DistillConfig
    from alambic.data.files import read_records
    from alambic.training.loop import run_distillation

    tokenizer = AutoTokenizer.from_pretrained(tiny_setup["tokenizer"])
    prompts = [[tokenizer.bos_token_id, *tokenizer(r["text"])["input_ids"][:12]] for r in read_records(str(tiny_setup["eval"]))[:24]]
    teacher = AutoModelForCausalLM.from_pretrained(tiny_setup["teacher"])

    def measure(student):
        return estimate_sequence_reverse_kl(
            student, teacher, prompts, max_new_tokens=16, pad_id=tokenizer.pad_token_id,
            eos_id=tokenizer.eos_token_id, seed=123, vocab_size=len(tokenizer),
        )["reverse_kl_per_token"]

    before = measure(AutoModelForCausalLM.from_pretrained(tiny_setup["student_init"]))
    mapping = kd_config(tiny_setup, tmp_path / "run", max_steps=12, batch_size=8, eval_batches=1, lr=1e-2)
    mapping["loss"]["objective"] = "reverse_kl"
    mapping["rollout"] = {"policy": "minillm", "max_new_tokens": 16, "teacher_mix": 0.2}
    result = run_distillation(DistillConfig.model_validate(mapping), overwrite=True)
    after = measure(result.student.model)
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["loss.objective=forward_kl"], ["reverse_kl", "loss.objective"]),
        (["rollout.temperature=0.7"], ["temperature 1", "invalid config"]),
    ],
)
def test_bad_minillm_settings(capsys, tiny_setup, tmp_path, overrides, needles):
    mapping = kd_config(tiny_setup, tmp_path / "run", max_steps=2)
    mapping["loss"]["objective"] = "reverse_kl"
    mapping["rollout"] = {"policy": "minillm"}
    code, _, err = invoke(capsys, "distill", write_config(tmp_path / "c.yaml", mapping), *overrides)
    assert code == 2, err
    for needle in needles:
        assert needle in err
    assert not (tmp_path / "run").exists()
