"""`alambic reward-distill`: distil the teacher's judgement of student samples into a reward model."""

from __future__ import annotations

from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("reward-distill")
    def reward_distill(
        config: str = typer.Argument(..., help="YAML config (schema: alambic.reward.distill:RewardConfig)"),
        overrides: Optional[List[str]] = typer.Argument(None, help="dotted key=value overrides, e.g. train.steps=50"),
    ) -> None:
        """Judge student samples with the teacher, train a reward model on the preferences, test best-of-n."""
        from alambic.config import load_config
        from alambic.reward.distill import RewardConfig, run_reward_distillation

        resolved = load_config(config, overrides or [], RewardConfig)
        metrics = run_reward_distillation(resolved)
        held_out = metrics["held_out"]
        typer.echo(
            f"held-out pairwise accuracy {held_out['pairwise_accuracy']:.3f} ({held_out['pairs']} pairs); "
            f"best-of-{resolved.sampling.samples_per_prompt} judge score {held_out['best_of_n_judge_score']:.3f} "
            f"vs random {held_out['random_sample_judge_score']:.3f} (oracle {held_out['oracle_best_judge_score']:.3f})"
        )
        typer.echo(f"reward model: {resolved.output_dir}/reward_model")
