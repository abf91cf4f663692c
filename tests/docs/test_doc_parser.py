"""The marker convention of the doc test (docs/doc-tests.md), on small made-up files."""

import socket

from doc_commands import Background, header_chain, markdown_chains, short_run_args, split_background


def test_header_commands_continuations_and_markers(tmp_path):
    config = tmp_path / "x.yaml"
    config.write_text(
        "# Prose with one space is not a command:  alambic distill nothing.yaml\n"
        "#   alambic distill configs/tiny_kd.yaml \\\n"
        "#       train.output_dir=runs/a   # a comment\n"
        "#   alambic distill configs/chat_jsd.yaml   # needs: a GPU\n"
        "#   alambic distill configs/bad.yaml   # refused: exit 2\n"
        "task: causal_lm\n"
        "#   alambic not-in-the-header\n"
    )
    commands = header_chain(config).commands
    assert [c.text for c in commands] == ["alambic distill configs/tiny_kd.yaml train.output_dir=runs/a",
                                          "alambic distill configs/chat_jsd.yaml", "alambic distill configs/bad.yaml"]
    assert [c.needs for c in commands] == [None, "a GPU", None]
    assert [c.expect for c in commands] == [0, 0, 2]
    assert commands[0].where.endswith("x.yaml:2")


def test_markdown_blocks_and_block_skip(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "text\n\n```bash\n# a comment line\nalambic validate configs/tiny_kd.yaml\n"
        "python -m some.server --port 8123 &   # started in the background\n```\n\n"
        "<!-- doc-test: skip needs the whole internet -->\n```bash\nmake everything\n```\n\n"
        "```\nalambic not-a-bash-block\n```\n"
    )
    (chain,) = markdown_chains(doc)  # one chain per file, blocks in order
    assert chain.name.endswith("doc.md")
    assert [c.text for c in chain.commands] == ["alambic validate configs/tiny_kd.yaml",
                                                "python -m some.server --port 8123 &", "make everything"]
    assert split_background(chain.commands[1].text) == ("python -m some.server --port 8123", True)
    assert split_background("a && b") == ("a && b", False)
    assert [c.needs for c in chain.commands] == [None, None, "needs the whole internet"]


def test_short_run_keys_follow_the_schema(monkeypatch):
    from helpers import REPO

    monkeypatch.chdir(REPO)
    distill = short_run_args(["distill", "configs/tiny_kd.yaml"])
    assert "train.max_steps=2" in distill and "data.limit=8" in distill
    assert not any(word.startswith("input.") for word in distill)  # generate keys are not distill keys
    generate = short_run_args(["generate", "configs/selfinstruct_seed.yaml"])
    assert "recipe.rounds=1" in generate and "input.limit=3" not in generate  # self-instruct has no input
    assert short_run_args(["eval", "configs/tiny_kd.yaml"]) == ["--limit", "2", "--no-speed"]


def test_background_server_is_waited_for_and_stopped(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    background = Background(tmp_path)
    code, output = background.start(["python", "-m", "http.server", "--bind", "127.0.0.1", str(port)], {})
    assert code == 0  # no --port flag: started without waiting
    background.stop()
    code, output = background.start(
        ["python", "-m", "alambic.generate.testing.scripted_server", "--port", str(port)], {})
    assert code == 0, output
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    process = background.processes[0][0]
    background.stop()
    assert process.poll() is not None
