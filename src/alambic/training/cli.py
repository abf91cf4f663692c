"""`alambic distill` and `alambic validate`."""

from __future__ import annotations

import os
from typing import List, Optional

import typer

from alambic.compat import check_compatible
from alambic.config import DistillConfig, load_config


def register(app: typer.Typer) -> None:
    @app.command()
    def distill(
        config: str = typer.Argument(..., help="YAML config"),
        overrides: Optional[List[str]] = typer.Argument(None, help="dotted key=value overrides, e.g. train.lr=3e-4"),
        resume: bool = typer.Option(False, "--resume", help="continue the run in train.output_dir"),
        overwrite: bool = typer.Option(False, "--overwrite", help="delete train.output_dir and start again"),
    ) -> None:
        """Distil a teacher into a student (or train with no teacher) with one config."""
        from alambic.training.loop import run_distillation

        resolved = load_config(config, overrides or [], DistillConfig)
        result = run_distillation(resolved, overwrite=overwrite, resume=resume, print_config=True)
        if int(os.environ.get("RANK", "0")) == 0:
            typer.echo(f"student saved to {result.output_dir / 'final'}")

    @app.command()
    def validate(
        config: str = typer.Argument(..., help="YAML config"),
        overrides: Optional[List[str]] = typer.Argument(None, help="dotted key=value overrides"),
    ) -> None:
        """Check a config (keys, types, ranges) without running anything."""
        from alambic.config import config_model_for, read_yaml

        read_yaml(config)  # missing / unreadable file: a clear error before the schema lookup
        from alambic.output import config_summary, full_config_text, is_verbose

        resolved = load_config(config, overrides or [], config_model_for(config))
        if isinstance(resolved, DistillConfig):
            check_compatible(resolved)  # modes and features that cannot be combined, before anything loads
        if is_verbose():
            typer.echo(full_config_text(resolved))
        elif isinstance(resolved, DistillConfig):
            typer.echo(config_summary(resolved))
        typer.echo(f"{config}: valid ({type(resolved).__name__})")
