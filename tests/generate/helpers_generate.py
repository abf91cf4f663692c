"""Running the CLI in-process and reading a run folder, for the generate tests."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from unittest import mock

from alambic.cli import main


def invoke_cli(*args: str) -> int:
    """`alambic ARGS` in this process; returns the exit code (a subprocess instead: helpers.run_cli_subprocess)."""
    with mock.patch.object(sys, "argv", ["alambic", *map(str, args)]):
        try:
            main()
        except SystemExit as done:
            return done.code or 0
    return 0


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def summary_of(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
