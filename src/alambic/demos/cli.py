"""`alambic demo`: the end-to-end demos (BBC News classification, or --task lm for stdlib code)."""

from __future__ import annotations

from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides of the demo settings"),
        quick: bool = typer.Option(False, "--quick", help="a subset and few steps (under 2 minutes)"),
        task: str = typer.Option("classification", "--task", help="classification (BBC News) or lm (stdlib code)"),
        config: Optional[str] = typer.Option(None, "--config", help="YAML file of demo settings"),
    ) -> None:
        """Fine-tune a real teacher, distil it into a small student, compare with a baseline, write a report."""
        from alambic.errors import ConfigError

        if task == "classification":
            from alambic.demos.demo import demo_config, run_demo

            run_demo(demo_config(config, list(overrides or []), quick))
        elif task == "lm":
            from alambic.demos.lm_demo import lm_demo_config, run_lm_demo

            run_lm_demo(lm_demo_config(config, list(overrides or []), quick))
        else:
            raise ConfigError(f"unknown demo task {task!r}", "use --task classification or --task lm")
