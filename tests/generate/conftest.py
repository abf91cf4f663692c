"""Fixtures for `alambic generate` tests: a real `transformers serve` process and rule-based servers.

`transformers serve` takes ~10 s to import torch and start, so it is launched
as soon as collection shows a test needs it, while the other tests run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from generate_child import forkserver_context
from generate_tiny_model import build_tiny_chat_model
from helpers_generate import free_port

from alambic.generate.testing.scripted_server import ScriptedChatServer

REPO = Path(__file__).resolve().parents[2]
SERVER_START_TIMEOUT_S = 90


@dataclass
class ServeProcess:
    """`transformers serve` on 127.0.0.1, pinned to a tiny local model, offline."""

    model_dir: Path
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @classmethod
    def launch(cls, workdir: Path) -> "ServeProcess":
        model_dir = build_tiny_chat_model(workdir / "tiny-chat")
        port = free_port()
        executable = Path(sys.executable).with_name("transformers")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        log_path = workdir / "serve.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [str(executable), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                 "--device", "cpu", "--log-level", "warning"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir,
            )
        return cls(model_dir, port, process, log_path)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"transformers serve not ready in {SERVER_START_TIMEOUT_S} s:\n"
                           f"{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


_early: dict = {}


def _uses(item, fixture: str) -> bool:
    return fixture in getattr(item, "fixturenames", ())


def _late_order(item) -> int:
    """Server tests after the rest (the server starts meanwhile), then this folder's other slow tests
    (so they do not compete with the server's start-up for the two cores)."""
    if _uses(item, "transformers_server"):
        return 1
    here = Path(__file__).parent
    if item.get_closest_marker("slow") and Path(str(item.fspath)).parent == here:
        return 2
    return 0


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: start nothing for tests that will not run
def pytest_collection_modifyitems(session, config, items):
    """Start the slow things now and run the tests that need them last, so the rest overlaps the wait."""
    if any(_uses(item, "transformers_server") for item in items):
        workdir = Path(tempfile.mkdtemp(prefix="alambic-serve-"))
        _early["workdir"] = workdir
        _early["server"] = ServeProcess.launch(workdir)
        items.sort(key=_late_order)
    if any(_uses(item, "generate_forkserver") for item in items):
        import multiprocessing.forkserver

        _early["forkserver"] = forkserver_context()
        multiprocessing.forkserver.ensure_running()  # returns at once; the imports happen in the server


def pytest_sessionfinish(session, exitstatus):
    server = _early.pop("server", None)
    if server is not None:
        server.stop()
    workdir = _early.pop("workdir", None)
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def transformers_server() -> ServeProcess:
    server = _early.get("server")
    if server is None:  # collected without the hook (e.g. a plugin reordered things)
        _early["workdir"] = Path(tempfile.mkdtemp(prefix="alambic-serve-"))
        server = _early["server"] = ServeProcess.launch(_early["workdir"])
    server.wait_ready()
    return server


@pytest.fixture(scope="session")
def generate_forkserver():
    """A multiprocessing context whose processes fork from a server that has imported alambic already."""
    return _early.get("forkserver") or forkserver_context()


@pytest.fixture
def scripted_server():
    """Factory: `scripted_server(responder, delay_s=..., api_key=...)`, stopped after the test."""
    started = []

    def start(responder=None, **kwargs) -> ScriptedChatServer:
        server = ScriptedChatServer(responder, **kwargs) if responder else ScriptedChatServer(**kwargs)
        started.append(server.start_in_thread())
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def config_from(tmp_path):
    """Write a generate config from a repo config file with test values merged in; returns its path."""
    import yaml

    def build(name: str, **sections) -> Path:
        raw = yaml.safe_load((REPO / "configs" / name).read_text()) if name else {}
        for section, values in sections.items():
            if isinstance(values, dict) and isinstance(raw.get(section), dict):
                raw[section] = {**raw[section], **values}
            else:
                raw[section] = values
        raw.setdefault("output", {})["dir"] = str(tmp_path / "run")
        raw["progress"] = False
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return build
