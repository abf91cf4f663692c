"""Every command a config header or a doc prints runs as printed (on the tiny setup, shortened).

How commands are found, marked and shortened: see tests/docs/doc_commands.py
(module docstring) and docs/doc-tests.md. In short: `#   <command>` lines of
configs/*.yaml headers and ```bash blocks of README.md and docs/*.md; a trailing
`# needs: WHY` skips a line, `# ... exit N` expects exit code N,
`<!-- doc-test: skip WHY -->` before a fence skips a block.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from doc_commands import LAUNCHERS, REPO, Background, all_chains, make_workspace, run_one, split_and, split_background

CHAINS = all_chains()
# Multi-process launches cost ~40 s each on 2 loaded cores: they run (once per distinct command line) unless
# ALAMBIC_DOC_TEST_LAUNCH=0. DDP itself is tested in tests/recipes/test_ddp.py.
RUN_LAUNCHERS = os.environ.get("ALAMBIC_DOC_TEST_LAUNCH", "1") == "1"
_LAUNCHED: dict[str, str] = {}  # launch command (without env prefix) -> where it ran


@pytest.fixture(scope="module")
def tiny_root(tiny_setup, tmp_path_factory) -> Path:
    """runs/tiny as `python -m alambic.testing runs/tiny` leaves it: the shared LM setup plus its extras."""
    from alambic.testing import build_extras

    root = tmp_path_factory.mktemp("doc-tiny") / "tiny"
    shutil.copytree(Path(tiny_setup["train"]).parent.parent, root, symlinks=True)
    build_extras(root)
    return root


def test_every_config_header_has_a_command():
    """A config without a printed command cannot be followed (and would escape this test)."""
    with_commands = {chain.name.split(":")[0] for chain in CHAINS}
    missing = [path.name for path in sorted((REPO / "configs").glob("*.yaml"))
               if f"configs/{path.name}" not in with_commands]
    assert not missing, f"configs without a `#   <command>` header line: {missing}"


def test_skips_are_few_and_explained():
    """Each skipped line says why; the skip list stays short (raise the bound only with a reason)."""
    skipped = [(command.where, command.needs) for chain in CHAINS for command in chain.commands if command.needs]
    assert all(reason for _, reason in skipped)
    total = sum(len(chain.commands) for chain in CHAINS)
    assert len(skipped) <= total * 2 // 5, f"{len(skipped)} of {total} printed commands are skipped: {skipped}"


@pytest.mark.parametrize("chain", CHAINS, ids=[chain.name for chain in CHAINS])
def test_printed_commands_run(chain, tiny_root, tmp_path, monkeypatch):
    workspace = make_workspace(tmp_path / "repo", tiny_root)
    monkeypatch.chdir(workspace)
    background = Background(workspace)
    try:
        ran, skipped = _run_chain(chain, workspace, tiny_root, background)
    finally:
        background.stop()
    if not ran:
        pytest.skip("; ".join(skipped))


def _run_chain(chain, workspace: Path, tiny_root: Path, background: Background) -> tuple[int, list[str]]:
    env: dict = {}
    ran, skipped = 0, []
    for command in chain.commands:
        if command.needs:
            skipped.append(f"{command.where}: needs {command.needs}")
            continue
        text, in_background = split_background(command.text)
        parts = split_and(text)
        launch = next((" ".join(part[part.index(name):]) for part in parts for name in LAUNCHERS if name in part), None)
        if launch and not RUN_LAUNCHERS:
            skipped.append(f"{command.where}: multi-process launch (ALAMBIC_DOC_TEST_LAUNCH=0)")
            continue
        if launch and launch in _LAUNCHED:
            skipped.append(f"{command.where}: the same launch ran at {_LAUNCHED[launch]}")
            continue
        code, output = 0, ""
        for index, words in enumerate(parts):
            if in_background and index == len(parts) - 1:
                code, output = background.start(words, env)
            else:
                code, output = run_one(words, workspace, tiny_root, env)
            if code != 0:
                break
        assert code == command.expect, (
            f"{command.where}: `{command.text}` exited {code}, the doc expects {command.expect}\n"
            f"--- output (last 3000 chars) ---\n{output[-3000:]}"
        )
        ran += 1
        if launch:
            _LAUNCHED[launch] = command.where
    return ran, skipped
