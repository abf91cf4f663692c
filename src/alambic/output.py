"""Quiet by default: what alambic prints, and the library noise it turns off unless `--verbose`.

`alambic [--verbose] <command> ...` (the flag may also follow the command). Quiet
means: no transformers / hub progress bars ("Loading weights", "Writing model
shards"), library warnings at error level, and a resolved config shown as one
summary line (the full config is always saved in the run folder).

    python -c "from alambic.output import format_money as f; print(f(8.85e-05, 'USD'), f(12.5, 'USD'))"
    # 0.000088 USD 12.50 USD
"""

from __future__ import annotations

import logging
import os
import re
import warnings


VERBOSE_ENV = "ALAMBIC_VERBOSE"
VERBOSE_FLAG = "--verbose"


def pop_verbose(argv: list[str]) -> bool:
    """Remove `--verbose` from the command line (anywhere before a `--`); True when it was there."""
    end = argv.index("--") if "--" in argv else len(argv)
    found = VERBOSE_FLAG in argv[:end]
    if found:
        argv[:] = [word for index, word in enumerate(argv) if not (index < end and word == VERBOSE_FLAG)]
    return found


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def configure(verbose: bool) -> None:
    """Set the output level for this process and the processes it starts (e.g. under accelerate)."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if verbose:
        return
    # Read by huggingface_hub and transformers when they are imported; set before any import of theirs.
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("ACCELERATE_LOG_LEVEL", "error")
    for name in ("accelerate", "transformers", "huggingface_hub", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"accelerate(\..*)?")
    silence_loaded_libraries()


def silence_loaded_libraries() -> None:
    """Progress bars of libraries imported before `configure` ran (tests, notebooks)."""
    import sys

    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def format_money(amount: float | None, currency: str) -> str:
    """Costs for people, never in exponent notation: 8.85e-05 -> '0.000088 USD'; 0.0123 -> '0.012 USD';
    12.5 -> '12.50 USD'; below a millionth of a unit -> '<0.000001 USD'."""
    import math

    if amount is None:
        return "n/a"
    if amount == 0:
        return f"0 {currency}"
    if amount < 1e-6:
        return f"<0.000001 {currency}"
    if amount < 1:
        decimals = max(2, 1 - math.floor(math.log10(amount)))  # two significant digits
        return f"{amount:.{decimals}f} {currency}"
    return f"{amount:,.2f} {currency}"


def _model_of(section) -> str:
    if section is None:
        return "-"
    if getattr(section, "server", None):
        server = re.sub(r"//[^/@]*@", "//***@", section.server)  # never a key from the URL
        return f"served {section.server_model or section.model or ''} at {server}".replace("  ", " ")
    return section.model or (f"cache {section.cache}" if getattr(section, "cache", None) else "from the teacher")


def config_summary(config) -> str:
    """One line for a distill config: who teaches whom, on what, with which loss, how long, where to."""
    if config.teachers:
        teacher = "teachers " + ", ".join(t.name or _model_of(t) for t in config.teachers)
    elif config.teacher is not None:
        teacher = _model_of(config.teacher)
    elif config.data.logprobs_column:
        teacher = f"stored logprobs ({config.data.logprobs_column})"
    else:
        teacher = "no teacher"
    modes = [name for name in ("representation", "self_distill", "co_distill", "cross_tokenizer", "ensemble")
             if getattr(config, name, None) is not None]
    if config.rollout.policy != "off_policy":
        modes.append(f"rollout {config.rollout.policy}")
    loss = config.loss
    train = config.train
    parts = [
        f"{teacher} -> {_model_of(config.student)}",
        f"data {config.data.train} ({config.data.format})",
        f"{loss.objective} T={loss.temperature:g} alpha={loss.alpha:g}" + (f" top_k={loss.top_k}" if loss.top_k else ""),
        f"{train.max_steps} steps x {train.batch_size}" + (f" x {train.grad_accum} accum" if train.grad_accum > 1 else ""),
    ]
    if modes:
        parts.append("modes: " + ", ".join(modes))
    return " | ".join(parts) + f" -> {train.output_dir} (full config: config.yaml there, or --verbose)"


def full_config_text(config) -> str:
    """The resolved config as YAML, as config.yaml saves it: keys spelled as in configs, URL credentials masked."""
    from alambic.config import dump_config

    return dump_config(config)


def describe_config(config) -> str:
    return full_config_text(config) if is_verbose() else config_summary(config)
