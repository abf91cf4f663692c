"""Consoles for tables: never cut a table when the output is piped or written to a file.

Rich sizes a console to the terminal, or to 80 columns when there is none, and
then squeezes or truncates wide tables. Figures people compare must not be cut.
"""

from __future__ import annotations

from rich.console import Console


def table_console() -> Console:
    """A terminal's own width (at least 120 columns); 200 columns when piped or redirected."""
    console = Console()
    return Console(width=max(console.width, 120)) if console.is_terminal else Console(width=200, soft_wrap=True)
