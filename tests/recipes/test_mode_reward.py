"""Reward distillation: a reward model learns the teacher's preferences between student samples."""

import json

import pytest

from helpers import invoke, kd_config, write_config

TEMPERATURES = [0.5, 0.7, 0.9, 1.1, 1.3, 1.5, 1.7, 2.0]


@pytest.fixture(scope="module")
def policy(tiny_setup, tmp_path_factory):
    """A briefly distilled student: its samples range from plausible (cold) to noise (hot)."""
    from alambic.config import DistillConfig
    from alambic.training.loop import run_distillation

    mapping = kd_config(tiny_setup, tmp_path_factory.mktemp("policy") / "run", max_steps=25)
    return run_distillation(DistillConfig.model_validate(mapping), overwrite=True).output_dir / "final"


def _reward_mapping(tiny_setup, policy, output_dir):
    return {
        "output_dir": str(output_dir),
        "policy": {"model": str(policy)},
        "teacher": {"model": str(tiny_setup["teacher"])},
        "data": {"prompts": str(tiny_setup["train"]), "limit": 64, "prompt_tokens": 16},
        "sampling": {"samples_per_prompt": 8, "temperatures": TEMPERATURES, "max_new_tokens": 24, "batch_size": 128},
        "train": {"steps": 120, "batch_size": 16, "lr": 1e-3, "progress": False},
    }


def test_reward_model_learns_teacher_preferences_and_improves_best_of_n(capsys, tiny_setup, policy, tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from alambic.reward import distill as reward

    out = tmp_path / "reward"
    config = write_config(tmp_path / "reward.yaml", _reward_mapping(tiny_setup, policy, out))
    code, stdout, err = invoke(capsys, "reward-distill", config)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    held_out, before = metrics["held_out"], metrics["held_out_before_training"]

    assert metrics["prompts"] == {"train": 48, "held_out": 16}
    assert held_out["pairs"] > 300
    assert held_out["pairwise_accuracy"] > 0.65, held_out
    assert held_out["pairwise_accuracy"] > before["pairwise_accuracy"] + 0.1
    # Best-of-8 with the reward model beats a random sample, as judged by the teacher.
    assert held_out["best_of_n_judge_score"] > held_out["random_sample_judge_score"] + 0.2, held_out
    assert "held-out pairwise accuracy" in stdout

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 64 * 8
    # Colder samples are preferred by the judge on average: the preferences carry a real signal.
    by_temperature = [[s["judge_score"] for s in samples if s["sample"] == k] for k in (0, 7)]
    assert sum(by_temperature[0]) > sum(by_temperature[1])
    model = AutoModelForSequenceClassification.from_pretrained(out / "reward_model")
    assert model.config.num_labels == 1

    # A second run reuses the judged samples instead of sampling again.
    def refuse(*args, **kwargs):
        raise AssertionError("the saved samples should have been reused")

    monkeypatch.setattr(reward, "sample_completions", refuse)
    code, _, err = invoke(capsys, "reward-distill", config, "train.steps=5")
    assert code == 0, err


def test_judge_score_is_the_teachers_mean_token_logprob(tiny_setup):
    import torch
    from transformers import AutoModelForCausalLM

    from alambic.reward.distill import judge_scores

    teacher = AutoModelForCausalLM.from_pretrained(tiny_setup["teacher"]).eval()
    prompt, completion = [1, 40, 41], [42, 43, 2]
    [score] = judge_scores(teacher, [prompt], [completion], 0, 4, 384)
    with torch.no_grad():
        logprobs = torch.log_softmax(teacher(torch.tensor([prompt + completion])).logits[0], -1)
    expected = sum(float(logprobs[len(prompt) - 1 + i, token]) for i, token in enumerate(completion)) / len(completion)
    assert score == pytest.approx(expected, rel=1e-5)
    # Prompt tokens do not count: a different completion gives a different score.
    [other] = judge_scores(teacher, [prompt], [[300, 301, 2]], 0, 4, 384)
    assert other != pytest.approx(score)


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda m: m["sampling"].update(temperatures=[1.0, 1.2]), "sampling.temperatures needs 8"),
        (lambda m: m["data"].update(prompts="/no/such/prompts.jsonl"), "does not exist"),
        (lambda m: m["data"].update(text_column="body"), "no column 'body'"),
        (lambda m: m["train"].update(steps=0), "train.steps"),
    ],
)
def test_bad_reward_configs(capsys, tiny_setup, tmp_path, change, needle):
    mapping = _reward_mapping(tiny_setup, tiny_setup["student_init"], tmp_path / "reward")
    change(mapping)
    code, _, err = invoke(capsys, "reward-distill", write_config(tmp_path / "r.yaml", mapping))
    assert code == 2, err
    assert needle in err
