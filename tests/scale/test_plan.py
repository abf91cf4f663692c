"""`alambic plan`: per-process memory from model configs only."""

import json

from alambic.config import DistillConfig
from alambic.plan.cli import plan
from helpers import invoke, kd_config, write_config


def test_plan_counts_the_real_parameters_and_splits_them_under_fsdp(tiny_setup, tmp_path):
    from transformers import AutoModelForCausalLM

    config = DistillConfig.model_validate(kd_config(tiny_setup, tmp_path / "run"))
    result = plan(config, processes=2, device_gb=None, k=16)
    student = AutoModelForCausalLM.from_pretrained(tiny_setup["student_init"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_setup["teacher"])
    assert result["student_parameters"] == sum(p.numel() for p in student.parameters())
    assert result["teacher_parameters"] == sum(p.numel() for p in teacher.parameters())
    by_name = {(e["strategy"], e["teacher"]): e for e in result["estimates"]}
    ddp, fsdp = by_name[("ddp", "co-located")]["parts"], by_name[("fsdp", "sharded")]["parts"]
    for part in ("student parameters", "student gradients", "optimizer state (AdamW)"):
        assert fsdp[part] * 2 == ddp[part]
    assert by_name[("fsdp", "sharded")]["parts"]["teacher parameters"] * 2 == ddp["teacher parameters"]
    assert "teacher parameters" not in by_name[("ddp", "cache")]["parts"]
    assert result["cache_tokens"] > 0 and result["cache_bytes"] > result["cache_tokens"]


def test_plan_command_prints_fits_and_a_recommendation(tiny_setup, tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", kd_config(tiny_setup, tmp_path / "run"))
    code, out, _ = invoke(capsys, "plan", path, "--processes", "2", "--device-memory", "0.002", "--json")
    assert code == 0
    result = json.loads(out)
    fits = {(e["strategy"], e["teacher"]): e["fits"] for e in result["estimates"]}
    assert fits[("ddp", "co-located")] is False  # 2 MB is too little for a replica of everything
    code, out, _ = invoke(capsys, "plan", path, "--processes", "2", "--device-memory", "80")
    assert code == 0 and "recommended: train.strategy=ddp" in out and "peak per process" in out
    assert not (tmp_path / "run").exists()  # plan writes nothing


def test_attention_probabilities_count_only_when_attention_transfer_forces_eager(tiny_setup, tmp_path):
    # SDPA (the default) keeps no [heads, L, L] probabilities for backward; attention transfer
    # switches the models to eager, which does, so the same batch needs more activation memory.
    mapping = kd_config(tiny_setup, tmp_path / "run")
    plain = plan(DistillConfig.model_validate(mapping), processes=1, device_gb=None, k=16, with_cache_size=False)
    mapping["representation"] = {"attention": {"weight": 1.0}}
    eager = plan(DistillConfig.model_validate(mapping), processes=1, device_gb=None, k=16, with_cache_size=False)
    config = DistillConfig.model_validate(mapping)
    student = next(e for e in plain["estimates"] if e["strategy"] == "ddp")
    forced = next(e for e in eager["estimates"] if e["strategy"] == "ddp")
    from transformers import AutoConfig

    shape = AutoConfig.from_pretrained(tiny_setup["student_init"])
    layers, heads = shape.num_hidden_layers, shape.num_attention_heads
    length, batch = config.data.max_length, config.train.batch_size
    extra = forced["parts"]["activations"] - student["parts"]["activations"]
    assert extra == 4 * layers * 2 * batch * heads * length * length
