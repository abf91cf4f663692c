"""The share of a baseline student's gap to the teacher that a distilled student closes.

With a baseline (e.g. the same student trained on gold labels alone), a
distilled student's figure is read against both: 0% = no better than the
baseline, 100% = as good as the teacher. Accuracy for classifiers, bits per
byte for language models.

    alambic eval runs/demo-bbc                                   # the demo names its baseline (gold_only)
    alambic eval teacher/ --student kd/final --baseline ce/final --data test.jsonl
"""

from __future__ import annotations

from alambic.errors import ConfigError
from alambic.evaluate.metrics import gap_closed

QUALITY = {"sequence_classification": ("accuracy", True), "causal_lm": ("bits_per_byte", False)}


def gap_closed_shares(report: dict, baseline: str) -> dict[str, float | None]:
    """{student: share of the baseline's gap to the teacher it closes} on the task's quality metric."""
    models = report["models"]
    if baseline not in models:
        raise ConfigError(f"the baseline {baseline!r} is not among the evaluated models ({', '.join(models)})",
                          "pass --baseline with a model folder or the name of an evaluated student")
    key, higher_is_better = QUALITY[report["task"]]
    teacher = next(name for name, entry in models.items() if entry["role"] == "teacher")
    sign = -1.0 if higher_is_better else 1.0  # gap_closed expects lower-is-better values

    def value(name: str) -> float:
        return sign * models[name]["metrics"][key]

    return {name: gap_closed(value(name), value(baseline), value(teacher))
            for name, entry in models.items() if name not in (teacher, baseline)}


def describe_gaps(report: dict) -> list[str]:
    shares = report.get("gap_closed") or {}
    key = QUALITY[report["task"]][0]
    return [f"{name} closes {share:.0%} of {report['baseline']}'s {key.replace('_', ' ')} gap to the teacher"
            if share is not None else f"{name}: {report['baseline']} already matches the teacher (no gap to close)"
            for name, share in shares.items()]
