"""What people read: costs without exponents, no "0 tok/s" where nothing counts tokens, current hints."""

import io

import pytest
from rich.console import Console

from alambic.output import format_money, pop_verbose


@pytest.mark.parametrize("amount, shown", [
    (8.85e-05, "0.000088 USD"), (0.0123, "0.012 USD"), (0.5, "0.50 USD"), (12.5, "12.50 USD"),
    (1234.5, "1,234.50 USD"), (0.0, "0 USD"), (3e-9, "<0.000001 USD"), (None, "n/a"),
])
def test_costs_are_formatted_for_people(amount, shown):
    assert format_money(amount, "USD") == shown


def test_generate_summary_prints_costs_without_exponents():
    from alambic.generate.summary import print_summary

    summary = {"output_dir": "runs/x", "requests": {"requested": 6, "from_cache": 0, "sent": 6, "answered": 6,
               "failed": 0, "failed_earlier_not_retried": 0, "errors_by_kind": {}},
               "teacher_records": {"total": 6, "ok": 6, "failed": 0},
               "student": {"records": 6, "examples": 6, "rejected_by_reason": {}},
               "tokens": {"this_run": {"prompt": 90, "completion": 40}, "dataset": {"prompt": 90, "completion": 40}},
               "cost": {"currency": "USD", "this_run": 8.85e-05, "dataset": 8.85e-05}, "files": {"train": "t"}}
    text = io.StringIO()
    print_summary(summary, Console(file=text, width=200))
    assert "0.000088 USD" in text.getvalue() and "e-05" not in text.getvalue()


def test_progress_without_token_counts_shows_no_rate():
    from alambic.training.progress import TrainingProgress

    bar = TrainingProgress(2, 0, enabled=True, description="reward model")
    bar.progress.console.file = io.StringIO()
    bar.update(1, {"loss": 0.7})
    assert bar.progress.tasks[0].fields["rate"] == ""
    bar.update(2, {"loss": 0.6, "tokens_per_s": 1234.0})
    assert bar.progress.tasks[0].fields["rate"] == "1,234 tok/s"
    bar.close()


def test_offline_hint_names_the_current_download_command(monkeypatch):
    from alambic.models.loading import _hub_error

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    error = _hub_error("org/model", "teacher", OSError("offline"))
    assert "hf download org/model" in error.hint and "huggingface-cli" not in error.hint


def test_verbose_flag_is_taken_anywhere_before_a_double_dash():
    argv = ["alambic", "distill", "c.yaml", "--verbose", "train.lr=1"]
    assert pop_verbose(argv) and argv == ["alambic", "distill", "c.yaml", "train.lr=1"]
    argv = ["alambic", "distill", "--", "--verbose"]
    assert not pop_verbose(argv) and argv[-1] == "--verbose"


def test_config_summary_names_each_kind_of_teacher():
    from helpers import REPO

    from alambic.config import load_config
    from alambic.output import config_summary

    tiny = config_summary(load_config(REPO / "configs" / "tiny_kd.yaml"))
    assert tiny.startswith("runs/tiny/teacher_run/final -> runs/tiny/student_init |") and "200 steps x 16" in tiny
    cached = config_summary(load_config(REPO / "configs" / "tiny_kd.yaml", ["teacher.model=null", "teacher.cache=c"]))
    assert cached.startswith("cache c ->")
    multi = config_summary(load_config(REPO / "configs" / "multi_teacher.yaml"))
    assert multi.startswith("teachers big, small ->") and "modes: ensemble" in multi
    served = load_config(REPO / "configs" / "served_teacher.yaml", ["teacher.server=http://u:SECRETKEY@host:8012/v1"])
    assert "served tiny-teacher at http://***@host:8012/v1" in config_summary(served)
