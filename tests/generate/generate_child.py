"""Entry point of the `alambic generate` processes that the crash test kills with SIGKILL.

They are forked from a multiprocessing forkserver that has imported alambic
once, so each launch costs milliseconds instead of a torch import.
"""

from __future__ import annotations

import multiprocessing
import sys

PRELOAD = ["alambic.cli", "alambic.config", "alambic.generate.cli", "alambic.generate.pipeline",
           "alambic.generate.backends.openai_backend", "openai"]


def run_generate(config_path: str) -> None:
    sys.argv = ["alambic", "generate", config_path]
    from alambic.cli import main

    main()


def forkserver_context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context
