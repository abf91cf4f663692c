"""A student's figure next to the teacher's, as a ratio a person reads.

"3.1x faster", "0.19x the parameters", "97.9% of the teacher's accuracy" — never
"retention 145%" for a figure where lower is better.

    python -c "from alambic.evaluate.ratios import versus_teacher as v; print(v('latency_ms', 2.0, 6.2))"
"""

from __future__ import annotations

SPEED_HIGHER = frozenset({"throughput_per_s", "tokens_per_s_batch1", "tokens_per_s_batch8"})
SPEED_LOWER = frozenset({"latency_ms", "ttft_ms_batch1", "ttft_ms_batch8"})
SIZES = {"num_parameters": "parameters", "disk_mb": "size on disk", "peak_memory_mb": "memory"}
QUALITY_HIGHER = frozenset({"accuracy", "macro_f1", "agreement", "top1_agreement"})
QUALITY_LOWER = frozenset({"ece", "perplexity", "bits_per_byte", "kl_to_teacher"})


def _times_faster(ratio: float) -> str:
    return f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"


def versus_teacher(key: str, value, teacher_value) -> str | None:
    """The student's `value` of metric `key` against the teacher's, or None when there is no sensible ratio."""
    if not isinstance(value, (int, float)) or not isinstance(teacher_value, (int, float)) or not teacher_value:
        return None
    if key in SPEED_HIGHER:
        return _times_faster(value / teacher_value)
    if key in SPEED_LOWER:
        return _times_faster(teacher_value / value) if value else None
    if key in SIZES:
        return f"{value / teacher_value:.2f}x the {SIZES[key]}"
    if key in QUALITY_HIGHER:
        return f"{value / teacher_value:.1%} of the teacher's"
    if key in QUALITY_LOWER:
        return f"{value / teacher_value:.2f}x the teacher's (lower is better)"
    return None
