"""The `alambic` command line: `alambic <command> CONFIG.yaml [key=value ...]`.

Each feature area registers its own commands (`register(app)` in its `cli`
module) so this file stays a table of contents. Errors caused by the user's
input are printed as one clear message and exit with code 2.

    alambic validate configs/tiny_kd.yaml
    alambic distill configs/tiny_kd.yaml train.max_steps=50 --overwrite
"""

from __future__ import annotations

import importlib
import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from alambic import output
from alambic.errors import AlambicError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Distil a large model (the teacher) into a small, fast one (the student). "
    "Output is quiet; add --verbose (anywhere) for library progress bars, warnings and the full resolved config.",
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)

# Feature areas that add commands. Every one must import: a module that fails is a bug, never skipped.
COMMAND_MODULES = (
    "alambic.training.cli",  # distill, validate
    "alambic.cache.cli",  # cache-logits
    "alambic.generate.cli",  # generate, train-classifier
    "alambic.evaluate.cli",  # eval, report
    "alambic.demos.cli",  # demo
    "alambic.models.init_student_cli",  # init-student
    "alambic.models.merge_cli",  # merge
    "alambic.training.progressive_cli",  # progressive
    "alambic.reward.cli",  # reward-distill
    "alambic.plan.cli",  # plan
)


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


_register_commands()


def main() -> None:
    """Console-script entry point: user errors become exit code 2 with a message."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    output.configure(output.pop_verbose(sys.argv))  # quiet unless --verbose, before any model library loads
    try:
        app(standalone_mode=False)
    except AlambicError as err:
        _report(err)
    except (typer.Exit, SystemExit) as done:
        code = getattr(done, "exit_code", getattr(done, "code", 0))
        sys.exit(code if code is not None else 0)
    except Exception as err:  # click usage errors carry their own exit code (2)
        click_errors, aborts = _click_classes()
        if isinstance(err, click_errors):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, aborts):
            sys.exit(130)
        from alambic.user_errors import translate

        user_error = translate(err)  # an input problem that escaped its own check (user_errors.py)
        if user_error is None:
            raise
        _report(user_error)


def _click_classes() -> tuple[tuple, tuple]:
    """Usage errors and aborts, from click and from the copy of click that typer >= 0.20 ships."""
    import click

    errors, aborts = [click.ClickException], [click.exceptions.Abort]
    try:
        from typer._click.exceptions import ClickException
        from typer.exceptions import Abort
    except ImportError:
        pass
    else:
        errors.append(ClickException)
        aborts.append(Abort)
    return tuple(errors), tuple(aborts)


def _report(err: AlambicError) -> None:
    from alambic.redact import redact_text

    err_console.print(f"[bold red]error:[/] {escape(redact_text(err.message))}", highlight=False, soft_wrap=True)
    if err.hint:
        err_console.print(f"[yellow]fix:[/] {escape(redact_text(err.hint))}", highlight=False, soft_wrap=True)
    sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
