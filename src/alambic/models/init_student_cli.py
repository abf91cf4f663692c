"""`alambic init-student`: the command; the work is in alambic.models.init_student.

    alambic init-student configs/init_student.yaml
"""

from __future__ import annotations

from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("init-student")
    def init_student_command(
        config: str = typer.Argument(..., help="YAML config (schema: alambic.models.init_student:InitStudentConfig)"),
        overrides: Optional[List[str]] = typer.Argument(None, help="dotted key=value overrides, e.g. num_layers=1"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace output_dir if it exists"),
    ) -> None:
        """Build a student from the teacher (layer selection, width pruning, averaging) and report it."""
        from alambic.config import load_config
        from alambic.models.encoder_init import print_encoder_report
        from alambic.models.init_student import InitStudentConfig, init_student, print_report

        resolved = load_config(config, overrides or [], InitStudentConfig)
        report = init_student(resolved, overwrite=overwrite)
        (print_encoder_report if report.get("task") == "sequence_classification" else print_report)(report)
        typer.echo(f"student saved to {report['output_dir']} (report: init_report.json)")
