"""Extract the commands that configs and docs print, and run them as a user would.

The convention (also in docs/doc-tests.md; keep the two in step):

* Config headers: in the leading comment block of configs/*.yaml, every line
  `#   <command>` (a hash, exactly three spaces, then text) is a command. A line
  ending in `\\` continues on the next comment line. Prose lines use one space.
  The commands of one file form one chain, run in order.
* Markdown (README.md, docs/*.md): the non-comment lines of every ```bash
  fenced block are commands; the blocks of one file form one chain, in order.
  Put `<!-- doc-test: skip REASON -->` on the line just before a fence to leave
  that block out (say why).
* A command's trailing comment may hold `needs: WHAT` (a GPU, a hub download, a
  server, an API key...): the line is shown as skipped with that reason and the
  chain goes on. Lines after it that use its output need their own `needs:`.
  `exit N` in the trailing comment is the exit code the line must give
  (default 0).
* Each chain runs in a fresh folder laid out like the repository root
  (configs/ and data/ linked, runs/tiny = a copy of the tiny setup built once
  per session), so `python -m alambic.testing runs/tiny` is satisfied by that
  copy rather than rebuilt. `alambic` commands run in this process with the
  short-run overrides of SHORT_RUN appended (only those the config's schema
  accepts); `python -m MODULE` runs in this process too; `accelerate launch` /
  `torchrun` run as subprocesses (see LAUNCH_ENV). A line ending in ` &` (a
  server the next lines talk to) starts in the background: the chain waits
  until its `--port N` accepts connections and stops it at the end. Anything
  else is an error: mark it with `needs:`.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Appended to every `alambic <command>` line of a chain: a few steps on a few records. A key is kept only
# when the config (after the line's own overrides) still validates with it, so one list serves every recipe.
SHORT_RUN = {
    "distill": ["train.max_steps=2", "train.batch_size=2", "train.eval_batches=1", "data.limit=8",
                "train.progress=false", "rollout.max_new_tokens=8"],
    "validate": [],
    "cache-logits": ["data.limit=8", "--no-progress"],
    "generate": ["input.limit=3", "sampling.max_tokens=8", "progress=false", "recipe.rounds=1",
                 "recipe.proposals_per_round=1"],
    "train-classifier": [],
    "init-student": ["data.calibration_samples=4", "data.eval_samples=4", "data.max_length=64", "progress=false"],
    "progressive": ["run.train.max_steps=2", "run.train.batch_size=2", "run.train.eval_batches=1",
                    "run.data.limit=8", "run.train.progress=false"]
    + [f"stages.{index}.overrides.train.max_steps=2" for index in range(4)],
    "reward-distill": ["train.steps=2", "train.batch_size=4", "train.progress=false", "data.limit=8", "sampling.samples_per_prompt=2",
                       "sampling.max_new_tokens=6"],
    "eval": ["--limit", "2", "--no-speed"],
    "report": [],
}
# A command not listed above gets every key below that its config accepts (so a new command's header runs
# short from the start); give it its own entry when it needs other keys or options.
DEFAULT_SHORT_RUN = sorted({*SHORT_RUN["distill"], *SHORT_RUN["reward-distill"], "max_steps=2", "steps=2",
                            "limit=8", "progress=false", "input.limit=3", "sampling.max_tokens=8"})
# Options (not key=value overrides): appended as they are.
OPTION_WORDS = {"--no-progress", "--no-speed", "--limit", "2"}
LAUNCHERS = ("accelerate", "torchrun")
LAUNCH_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Command:
    text: str
    where: str  # file:line
    needs: str | None = None
    expect: int = 0


@dataclass
class Chain:
    name: str
    commands: list[Command] = field(default_factory=list)


def split_comment(line: str) -> tuple[str, str]:
    """`cmd args  # comment` -> (cmd args, comment); a # inside quotes or a word is not a comment."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip(), line[index + 1 :].strip()
    return line.rstrip(), ""


def make_command(text: str, where: str) -> Command:
    command, comment = split_comment(text)
    needs = re.search(r"needs:\s*(.+)", comment)
    expect = re.search(r"(?:^|[\s(;,])exit (\d+)\b", comment)
    return Command(command, where, needs.group(1).strip() if needs else None, int(expect.group(1)) if expect else 0)


def _join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    joined: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, text in lines:
        if pending is not None:
            number, text = pending[0], pending[1] + " " + text.strip()
        body, _ = split_comment(text)
        if body.endswith("\\"):
            pending = (number, body[:-1].rstrip())
            continue
        pending = None
        joined.append((number, text))
    return joined


def header_chain(path: Path) -> Chain:
    """The `#   <command>` lines of a config's leading comment block."""
    chain = Chain(f"{path.parent.name}/{path.name}")
    raw: list[tuple[int, str]] = []
    continuing = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.startswith("#"):
            break
        if continuing or re.match(r"#   \S", line):
            raw.append((number, line[1:].strip()))
            continuing = split_comment(line[1:])[0].endswith("\\")
    for number, text in _join_continuations(raw):
        chain.commands.append(make_command(text, f"{chain.name}:{number}"))
    return chain


def markdown_chains(path: Path) -> list[Chain]:
    """The ```bash blocks of one doc, in order, as one chain (a doc is read top to bottom, so a block
    may use what an earlier one made). `<!-- doc-test: skip REASON -->` just before a fence leaves
    that block out: its lines are listed as skipped with REASON."""
    lines = path.read_text(encoding="utf-8").splitlines()
    name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name
    chain, index = Chain(name), 0
    while index < len(lines):
        if lines[index].strip() != "```bash":
            index += 1
            continue
        back = index - 1
        while back >= 0 and not lines[back].strip():
            back -= 1
        marker = re.match(r"<!--\s*doc-test:\s*skip\s*(.*?)\s*-->", lines[back].strip()) if back >= 0 else None
        body = []
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            stripped = lines[index].strip()
            if stripped and not stripped.startswith("#"):
                body.append((index + 1, stripped))
            index += 1
        for number, text in _join_continuations(body):
            command = make_command(text, f"{name}:{number}")
            if marker:
                command.needs = command.needs or marker.group(1) or "a block marked doc-test: skip"
            chain.commands.append(command)
        index += 1
    return [chain] if chain.commands else []


def all_chains(repo: Path = REPO) -> list[Chain]:
    chains = [header_chain(path) for path in sorted((repo / "configs").glob("*.yaml"))]
    chains = [chain for chain in chains if chain.commands]
    for path in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]:
        chains += [chain for chain in markdown_chains(path) if chain.commands]
    return chains


# ----------------------------------------------------------------------------- running


def make_workspace(folder: Path, tiny_setup_root: Path) -> Path:
    """A folder laid out like the repository root: configs/, data/ (linked), runs/tiny (a private copy)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("configs", "data", "benchmarks"):
        if (REPO / name).exists():
            (folder / name).symlink_to(REPO / name)
    shutil.copytree(tiny_setup_root, folder / "runs" / "tiny", symlinks=True)
    return folder


def _accepted_overrides(config_path: str, given: list[str], candidates: list[str]) -> list[str]:
    """The short-run overrides this config's schema accepts, on top of the line's own."""
    from alambic.config import config_model_for, load_config
    from alambic.errors import AlambicError

    if not Path(config_path).is_file():
        return []
    schema = config_model_for(config_path)
    kept: list[str] = []
    for candidate in candidates:
        try:
            load_config(config_path, [*given, *kept, candidate], schema)
        except (AlambicError, ValueError):
            continue
        kept.append(candidate)
    return kept


def _takes_overrides(command: str) -> bool:
    """Whether `alambic COMMAND` accepts key=value overrides (an `overrides` argument)."""
    import inspect

    from alambic.cli import app

    for info in app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        if name == command:
            return "overrides" in inspect.signature(info.callback).parameters
    return False


def short_run_args(argv: list[str]) -> list[str]:
    """The words appended to `alambic <command> ...` for a short run."""
    command = argv[0] if argv else ""
    extra = SHORT_RUN.get(command, DEFAULT_SHORT_RUN)
    options = [word for word in extra if word in OPTION_WORDS]
    keyed = [word for word in extra if word not in OPTION_WORDS] if _takes_overrides(command) else []
    positional = [word for word in argv[1:] if not word.startswith("-")]
    if not keyed or not positional:
        return options
    given = [word for word in positional[1:] if "=" in word]
    return _accepted_overrides(positional[0], given, keyed) + options


def _env_prefix(words: list[str]) -> tuple[dict, list[str]]:
    env = {}
    while words and re.match(r"[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


@contextlib.contextmanager
def _patched_env(values: dict):
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _in_process(target, argv: list[str]) -> tuple[int, str]:
    """Run `target()` with sys.argv = argv; returns (exit code, output)."""
    out = io.StringIO()
    old_argv = sys.argv
    sys.argv = argv
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            target()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except Exception as err:  # a traceback: report it like a crashed process would
        import traceback

        out.write(traceback.format_exc())
        code = 1 if not hasattr(err, "exit_code") else err.exit_code
    finally:
        sys.argv = old_argv
    return code, out.getvalue()


def _run_module(module: str) -> None:
    import warnings

    with warnings.catch_warnings():  # "found in sys.modules": the module was imported by an earlier test
        warnings.simplefilter("ignore", RuntimeWarning)
        runpy.run_module(module, run_name="__main__", alter_sys=True)


def run_one(words: list[str], workspace: Path, tiny_setup_root: Path, env: dict) -> tuple[int, str]:
    """Run one simple command (no `&&`) in `workspace`; returns (exit code, output)."""
    extra_env, words = _env_prefix(list(words))
    if not words:
        env.update(extra_env)
        return 0, ""
    program, args = words[0], words[1:]
    if program == "export":
        for word in args:
            key, _, value = word.partition("=")
            env[key] = value
        return 0, ""
    if program in (".", "source"):
        return 0, ""  # activating the virtual environment: this process already runs in it
    if program in LAUNCHERS:
        full_env = {**os.environ, **env, **LAUNCH_ENV, **extra_env, "PYTHONPATH": str(REPO / "src")}
        argv = [str(Path(sys.executable).with_name(program)), *args]
        if "alambic.cli" in args:
            argv += short_run_args(args[args.index("alambic.cli") + 1 :])
        done = subprocess.run(argv, cwd=workspace, env=full_env, capture_output=True, text=True, timeout=300)
        return done.returncode, done.stdout + done.stderr
    with _patched_env({**env, **extra_env}):
        if program == "alambic":
            from alambic.cli import main

            return _in_process(main, ["alambic", *args, *short_run_args(args)])
        if program in ("python", "python3") and args[:1] == ["-m"] and len(args) > 1:
            module, rest = args[1], args[2:]
            if module == "alambic.testing":
                target = workspace / (rest[0] if rest else "runs/tiny")
                if not target.exists():
                    shutil.copytree(tiny_setup_root, target, symlinks=True)
                return 0, f"(tiny setup provided by the test session at {target})"
            return _in_process(lambda: _run_module(module), [module, *rest])
    raise ValueError(f"don't know how to run {' '.join(words)!r}: mark the line with `# needs: <why>` "
                     "or teach tests/docs/doc_commands.py")


class Background:
    """Servers started by ` &` lines of one chain; stopped when the chain ends."""

    def __init__(self, workspace: Path):
        self.workspace = workspace
        self.processes: list[tuple[subprocess.Popen, Path]] = []

    def start(self, words: list[str], env: dict) -> tuple[int, str]:
        import socket
        import time

        extra_env, words = _env_prefix(list(words))
        program, args = words[0], words[1:]
        if program == "alambic":
            argv = [sys.executable, "-m", "alambic.cli", *args]
        elif program in ("python", "python3"):
            argv = [sys.executable, *args]
        else:
            argv = [str(Path(sys.executable).with_name(program)), *args]
        log = self.workspace / f"background-{len(self.processes)}.log"
        full_env = {**os.environ, **env, **LAUNCH_ENV, **extra_env, "PYTHONPATH": str(REPO / "src")}
        with open(log, "wb") as handle:
            process = subprocess.Popen(argv, cwd=self.workspace, env=full_env, stdout=handle, stderr=subprocess.STDOUT)
        self.processes.append((process, log))
        port = int(args[args.index("--port") + 1]) if "--port" in args[:-1] else None
        deadline = time.monotonic() + 90
        while port is not None and time.monotonic() < deadline:
            if process.poll() is not None:
                return process.returncode or 1, log.read_text(errors="replace")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
                time.sleep(0.3)  # a server that could not bind (port taken by another process) exits now
                if process.poll() is not None:
                    return process.returncode or 1, f"port {port} is taken:\n" + log.read_text(errors="replace")
                return 0, ""
            except OSError:
                time.sleep(0.3)
        if port is not None:
            return 1, f"nothing listens on port {port} after 90 s:\n" + log.read_text(errors="replace")
        return 0, ""

    def stop(self) -> None:
        for process, _ in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
        self.processes.clear()


def split_background(text: str) -> tuple[str, bool]:
    """`cmd args &` -> (`cmd args`, True)."""
    stripped = text.rstrip()
    if stripped.endswith("&") and not stripped.endswith("&&"):
        return stripped[:-1].rstrip(), True
    return text, False


def split_and(text: str) -> list[list[str]]:
    words = shlex.split(text)
    parts, current = [], []
    for word in words:
        if word == "&&":
            parts.append(current)
            current = []
        else:
            current.append(word)
    parts.append(current)
    return [part for part in parts if part]
