"""Figures against the teacher read as ratios; tables are not cut when output is piped."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from alambic.evaluate.console import table_console
from alambic.evaluate.ratios import versus_teacher


def test_lower_is_better_figures_read_as_ratios():
    assert versus_teacher("latency_ms", 2.0, 6.2) == "3.1x faster"
    assert versus_teacher("throughput_per_s", 520.0, 100.0) == "5.2x faster"
    assert versus_teacher("throughput_per_s", 50.0, 100.0) == "2.0x slower"
    assert versus_teacher("num_parameters", 4.4e6, 22.7e6) == "0.19x the parameters"
    assert versus_teacher("disk_mb", 20.0, 80.0) == "0.25x the size on disk"
    assert versus_teacher("accuracy", 0.9, 0.95) == "94.7% of the teacher's"
    assert versus_teacher("ece", 0.05, 0.025) == "2.00x the teacher's (lower is better)"
    assert versus_teacher("accuracy", 0.9, None) is None and versus_teacher("num_examples", 3, 3) is None


def test_tables_are_not_cut_when_piped(monkeypatch):
    console = table_console()  # pytest captures stdout: not a terminal
    assert not Console().is_terminal and console.width == 200
    table = Table()
    for index in range(6):
        table.add_column(f"column title {index}")
    table.add_row(*[f"value {index} of width" for index in range(6)])

    def printed(width: int) -> str:
        buffer = io.StringIO()
        Console(file=buffer, width=width).print(table)
        return buffer.getvalue()

    assert "value 5 of width" in printed(console.width) and "…" not in printed(console.width)
    assert "value 5 of width" not in printed(80)  # rich's default width for a pipe squeezes the table


def test_classifier_progress_line_shows_accuracy_not_cross_entropy():
    from alambic.training.progress import progress_extra

    record = {"eval_ce": 0.31, "eval_ppl": 1.36, "eval_accuracy": 0.925, "eval_kl": 0.02, "eval_agreement": 0.95}
    assert progress_extra(record, "sequence_classification") == "eval accuracy 92.5%, agrees w/ teacher 95.0%"
    assert progress_extra(record, "causal_lm") == "eval KL 0.0200"
    assert progress_extra({"eval_ce": 2.5}, "causal_lm") == "eval CE 2.5000"
