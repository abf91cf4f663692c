"""Commands `alambic generate` and `alambic train-classifier`.

    alambic generate configs/generate_label.yaml [key=value ...] [--retry-failed] [--new-cache]
    alambic train-classifier configs/generate_classifier.yaml [key=value ...]
"""

from __future__ import annotations

import json

import typer


def generate(
    config: str = typer.Argument(..., help="YAML config of the run"),
    overrides: list[str] = typer.Argument(None, help="dotted key=value overrides, e.g. sampling.n=4"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="send again the requests recorded as failed"),
    new_cache: bool = typer.Option(False, "--new-cache",
                                   help="when the run folder's cache was written by another config, move it aside"),
) -> None:
    """Ask the teacher (API server, local model or vLLM) and write the student's training data."""
    from alambic.config import load_config
    from alambic.generate.config import GenerateConfig
    from alambic.generate.pipeline import GenerateRun
    from alambic.generate.summary import print_summary

    from alambic.generate.checks import check_not_all_failed

    settings = load_config(config, overrides or [], model_cls=GenerateConfig)
    run = GenerateRun(settings, retry_failed=retry_failed, new_cache=new_cache)
    summary = run.execute()
    print_summary(summary)
    check_not_all_failed(run.stats, retry_failed)  # a run that got no answer at all never exits 0


def train_classifier(
    config: str = typer.Argument(..., help="YAML config (train, test, columns, model)"),
    overrides: list[str] = typer.Argument(None, help="dotted key=value overrides, e.g. model=mlp"),
) -> None:
    """Fit a TF-IDF + logistic regression (or MLP) student on teacher labels; compare with the teacher."""
    from alambic.config import load_config
    from alambic.generate.classifier import ClassifierConfig, train_classifier

    settings = load_config(config, overrides or [], model_cls=ClassifierConfig)
    report = train_classifier(settings)
    typer.echo(json.dumps({key: report[key] for key in ("model", "student", "teacher", "student_teacher_agreement")},
                          indent=2))


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    app.command("train-classifier")(train_classifier)
