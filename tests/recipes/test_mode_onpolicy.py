"""On-policy (GKD) and sequence-level KD: the batches the loss sees really are model samples."""

import importlib.util
import json

import pytest
import torch

from helpers import expect_exit_2, kd_config, write_config

from alambic.config import DistillConfig
from alambic.data import IGNORE
from alambic.training.modes import rollouts
from alambic.training.sampling import (
    hf_generate, prompt_lengths, rollout_seed, samples_at, split_prompts,
)


def _rollout_config(tiny_setup, tmp_path, policy, steps=2, train=None, **rollout):
    mapping = kd_config(tiny_setup, tmp_path / "run", max_steps=steps, batch_size=4, eval_batches=1, **(train or {}))
    mapping["rollout"] = {"policy": policy, "max_new_tokens": 12, **rollout}
    return mapping


def _spy(monkeypatch):
    """Record (step, batch in, batch out) of every rollout call."""
    calls = []
    original = rollouts.PromptRollout.__call__

    def spy(self, batch, step):
        before = {k: v.clone() for k, v in batch.items()}
        after = original(self, batch, step)
        calls.append((step, before, after))
        return after

    monkeypatch.setattr(rollouts.PromptRollout, "__call__", spy)
    return calls


def _completion(batch, row):
    """Tokens that carry a label in row `row` (the completion of a rollout batch)."""
    labels = batch["labels"][row]
    return batch["input_ids"][row][labels != IGNORE].tolist()


def test_on_policy_batches_are_student_samples_scored_by_the_teacher(tiny_setup, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alambic.teachers.live import LiveTeacher
    from alambic.training.loop import run_distillation
    from alambic.models.module import StudentModule
    from alambic.training.step_loss import loss_sums

    calls = _spy(monkeypatch)
    config = DistillConfig.model_validate(_rollout_config(tiny_setup, tmp_path, "on_policy", **{"lambda": 1.0}))
    result = run_distillation(config, overwrite=True)
    assert [step for step, _, _ in calls] == [1, 2]

    step, before, after = calls[0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_setup["student_init"])
    student = AutoModelForCausalLM.from_pretrained(tiny_setup["student_init"])  # the weights step 1 sampled with
    prompts = split_prompts(before, prompt_lengths(before, False, 0.5))
    expected = hf_generate(student, prompts, config.rollout, pad_id=tokenizer.pad_token_id,
                           eos_id=tokenizer.eos_token_id, seed=rollout_seed(0, step, before), vocab_size=len(tokenizer))
    for row, prompt in enumerate(prompts):
        assert after["input_ids"][row][: len(prompt)].tolist() == prompt
        assert (after["labels"][row][: len(prompt)] == IGNORE).all(), "the prompt must carry no loss"
        assert _completion(after, row) == expected[row]
        dataset_continuation = before["input_ids"][row][len(prompt) : len(prompt) + len(expected[row])].tolist()
        assert expected[row] != dataset_continuation
    padding = after["attention_mask"] == 0
    assert (after["labels"][padding] == IGNORE).all()

    # The loss of step 1 is the teacher-scored KD loss of exactly that sampled batch.
    teacher = LiveTeacher(AutoModelForCausalLM.from_pretrained(tiny_setup["teacher"]).eval(), len(tokenizer))
    sums = loss_sums(StudentModule(student, len(tokenizer)), after, teacher, config.loss, config.task)
    count = int((after["labels"][:, 1:] != IGNORE).sum())
    assert result.history[0]["loss"] == pytest.approx(float(sums["loss"].detach()) / count, rel=1e-4)


def test_lambda_zero_never_samples(tiny_setup, tmp_path, monkeypatch):
    from transformers.generation.utils import GenerationMixin

    from alambic.training.loop import run_distillation

    def refuse(*args, **kwargs):
        raise AssertionError("lambda = 0 must not sample")

    monkeypatch.setattr(GenerationMixin, "generate", refuse)
    calls = _spy(monkeypatch)
    run_distillation(DistillConfig.model_validate(_rollout_config(tiny_setup, tmp_path, "on_policy", steps=3)), overwrite=True)
    assert len(calls) == 3
    for _, before, after in calls:
        assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)


def test_lambda_is_the_fraction_of_sampled_steps_and_fixed_per_step():
    for fraction in (0.0, 0.3, 0.5, 1.0):
        chosen = [samples_at(7, step, fraction) for step in range(1, 4001)]
        assert abs(sum(chosen) / len(chosen) - fraction) < 0.03
        assert chosen == [samples_at(7, step, fraction) for step in range(1, 4001)], "a resumed run must flip the same coins"
    assert [samples_at(7, s, 0.5) for s in range(50)] != [samples_at(8, s, 0.5) for s in range(50)]


def test_on_policy_run_resumes_with_the_same_coins_and_samples(tiny_setup, tmp_path):
    from alambic.training.loop import run_distillation

    def config(folder, steps):
        mapping = _rollout_config(tiny_setup, folder, "on_policy", steps=steps,
                                  train={"scheduler": "constant", "save_every": 2}, **{"lambda": 0.5})
        return DistillConfig.model_validate(mapping)

    straight = run_distillation(config(tmp_path / "straight", 4), overwrite=True).history
    run_distillation(config(tmp_path / "resumed", 2), overwrite=True)
    resumed = run_distillation(config(tmp_path / "resumed", 4)).history
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=1e-5)


def test_prompt_comes_from_unlabelled_positions_or_the_leading_fraction():
    batch = {
        "input_ids": torch.tensor([[1, 5, 6, 7, 8, 2], [1, 9, 10, 2, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
        "labels": torch.tensor([[IGNORE, IGNORE, IGNORE, 7, 8, 2], [IGNORE, 9, 10, 2, IGNORE, IGNORE]]),
    }
    assert prompt_lengths(batch, True, 0.5) == [3, 1]
    assert prompt_lengths(batch, False, 0.5) == [3, 2]
    assert split_prompts(batch, [3, 1]) == [[1, 5, 6], [1]]


def test_sequence_level_trains_on_the_teachers_greedy_completions(tiny_setup, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.utils import GenerationMixin

    from alambic.training.loop import run_distillation

    generated = []
    original_generate = GenerationMixin.generate

    def counting_generate(self, *args, **kwargs):
        output = original_generate(self, *args, **kwargs)
        generated.append(output.shape[0])
        return output

    monkeypatch.setattr(GenerationMixin, "generate", counting_generate)
    calls = _spy(monkeypatch)
    mapping = _rollout_config(tiny_setup, tmp_path, "sequence_level", steps=2, greedy=True)
    mapping["data"]["limit"] = 4  # one batch per epoch: step 2 reuses step 1's rows
    mapping["loss"]["alpha"] = 1.0
    run_distillation(DistillConfig.model_validate(mapping), overwrite=True)
    assert generated == [4], "greedy teacher completions are generated once per row, then reused"

    tokenizer = AutoTokenizer.from_pretrained(tiny_setup["teacher"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_setup["teacher"])
    _, before, after = calls[0]
    prompts = split_prompts(before, prompt_lengths(before, False, 0.5))
    config = DistillConfig.model_validate(mapping)
    expected = hf_generate(teacher, prompts, config.rollout, pad_id=tokenizer.pad_token_id,
                           eos_id=tokenizer.eos_token_id, seed=0, vocab_size=len(tokenizer))
    assert [_completion(after, row) for row in range(len(prompts))] == expected

    def by_row(batch):
        return {int(r): _completion(batch, i) for i, r in enumerate(batch["row_index"])}

    assert by_row(calls[1][2]) == by_row(after)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "override, needle",
    [("rollout.lambda=1.5", "rollout.lambda"), ("rollout.lambda=-0.1", "rollout.lambda"),
     ("rollout.policy=off_policy", "applies to policy 'on_policy' only")],
)
def test_bad_lambda(capsys, tiny_setup, tmp_path, override, needle):
    mapping = _rollout_config(tiny_setup, tmp_path, "on_policy", **{"lambda": 0.5})
    expect_exit_2(capsys, tmp_path, mapping, needle, "invalid config", extra=[override])


def test_on_policy_with_a_logit_cache_is_refused(capsys, tiny_setup, tmp_path):
    from alambic.cache.cli import cache_logits

    base = kd_config(tiny_setup, tmp_path / "unused")
    base["data"]["limit"] = 4
    cache_logits(str(write_config(tmp_path / "base.yaml", base)), [], 8, str(tmp_path / "cache"), 64, 4,
                 "auto", 250, False, False, "cpu", False)
    mapping = _rollout_config(tiny_setup, tmp_path, "on_policy", **{"lambda": 0.5})
    mapping["data"]["limit"] = 4
    mapping["teacher"] = {"cache": str(tmp_path / "cache")}
    expect_exit_2(capsys, tmp_path, mapping, "offline logit cache", "teacher.model")
    mapping["rollout"] = {"policy": "minillm"}
    mapping["loss"]["objective"] = "reverse_kl"
    expect_exit_2(capsys, tmp_path, mapping, "minillm", "no live teacher model", "teacher.model")


def test_sequence_level_without_a_teacher_model_is_refused(capsys, tiny_setup, tmp_path):
    mapping = _rollout_config(tiny_setup, tmp_path, "sequence_level")
    mapping.pop("teacher")
    expect_exit_2(capsys, tmp_path, mapping, "sequence_level", "no live teacher model", "write the completions")


def test_rollouts_with_a_classifier_are_refused(capsys, tiny_setup, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_setup["tokenizer"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=2, pad_token_id=tokenizer.pad_token_id)
    for name in ("teacher_cls", "student_cls"):
        LlamaForSequenceClassification(config).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i}", "label": i % 2}) + "\n" for i in range(8)))
    mapping = _rollout_config(tiny_setup, tmp_path, "on_policy", **{"lambda": 1.0})
    mapping.update(task="sequence_classification")
    mapping["teacher"]["model"], mapping["student"]["model"] = str(tmp_path / "teacher_cls"), str(tmp_path / "student_cls")
    mapping["data"] = {"train": str(data), "format": "classification"}
    expect_exit_2(capsys, tmp_path, mapping, "sequence_classification", "off_policy")


def test_vllm_engine_errors(capsys, tiny_setup, tmp_path):
    mapping = _rollout_config(tiny_setup, tmp_path, "on_policy", engine="vllm", **{"lambda": 0.5})
    expect_exit_2(capsys, tmp_path, mapping, "vllm", "sequence_level")
    if importlib.util.find_spec("vllm") is None:  # vLLM itself is never needed: only its absence is tested
        mapping["rollout"] = {"policy": "sequence_level", "engine": "vllm"}
        expect_exit_2(capsys, tmp_path, mapping, "vllm package is not installed", "pip install vllm")
