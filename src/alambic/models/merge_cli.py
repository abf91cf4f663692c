"""`alambic merge`: one model from several students of one recipe (models/merge.py).

    alambic merge runs/seed0 runs/seed1 runs/seed2 --method linear --output runs/merged
    alambic merge --config configs/merge.yaml
"""

from __future__ import annotations

from typing import List, Optional

import typer

from alambic.config import read_yaml, validate_mapping


def register(app: typer.Typer) -> None:
    @app.command("merge")
    def merge_command(
        models: Optional[List[str]] = typer.Argument(None, help="model folders or run folders (their final/ is used)"),
        method: Optional[str] = typer.Option(None, help="linear | slerp | ties (default linear)"),
        output: Optional[str] = typer.Option(None, help="folder to write (default runs/merged)"),
        base: Optional[str] = typer.Option(None, help="ties: the common starting model; slerp: the model at t=0"),
        weight: Optional[List[float]] = typer.Option(None, help="one per model, repeated (default equal)"),
        t: Optional[float] = typer.Option(None, help="slerp position, 0..1 (default 0.5)"),
        density: Optional[float] = typer.Option(None, help="ties: share of each model's changes kept (default 0.5)"),
        config: Optional[str] = typer.Option(None, help="YAML (schema: alambic.models.merge:MergeConfig); "
                                             "options given here override it"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace the output folder if it exists"),
    ) -> None:
        """Merge students (seeds / hyperparameters of one recipe) with mergekit: linear, slerp or TIES."""
        from alambic.models.merge import MergeConfig, merge_models

        raw = read_yaml(config) if config else {}
        given = {"models": models or None, "method": method, "output": output, "base": base,
                 "weights": weight or None, "t": t, "density": density}
        raw.update({key: value for key, value in given.items() if value is not None})
        resolved = validate_mapping(raw, MergeConfig, config or "alambic merge")
        folder = merge_models(resolved, overwrite=overwrite)
        typer.echo(f"merged {len(resolved.models)} models ({resolved.method}) into {folder}")
