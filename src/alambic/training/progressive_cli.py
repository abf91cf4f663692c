"""`alambic progressive`: a chain of distillation stages from one config."""

from __future__ import annotations

import json
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def progressive(
        config: str = typer.Argument(..., help="YAML config (schema: alambic.training.progressive:ProgressiveConfig)"),
        overrides: Optional[List[str]] = typer.Argument(None, help="dotted key=value overrides, e.g. run.train.max_steps=20"),
        overwrite: bool = typer.Option(False, "--overwrite", help="delete output_dir and train every stage again"),
    ) -> None:
        """Distil teacher -> intermediate -> ... -> student; each stage's student teaches the next."""
        from alambic.config import load_config
        from alambic.training.progressive import ProgressiveConfig, run_progressive

        resolved = load_config(config, overrides or [], ProgressiveConfig)
        summary = run_progressive(resolved, overwrite=overwrite)
        for entry in summary["stages"]:
            metrics = entry["eval"]
            shown = {k: round(metrics[k], 4) for k in ("eval_ce", "eval_kl") if k in metrics}
            typer.echo(f"{entry['name']}: {metrics['parameters']:,} parameters, {json.dumps(shown)} ({entry['status']})")
        typer.echo(f"summary: {resolved.output_dir}/summary.json")
