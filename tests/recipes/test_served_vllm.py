"""The served teacher against a real `vllm serve` -- runs only when ALAMBIC_VLLM_URL is set (a GPU machine).

    vllm serve MODEL_DIR --served-model-name teacher --max-logprobs 20 --dtype float32 --port 8000 &
    ALAMBIC_VLLM_URL=http://127.0.0.1:8000/v1 ALAMBIC_VLLM_MODEL=teacher ALAMBIC_VLLM_PATH=MODEL_DIR \\
        python -m pytest tests/recipes/test_served_vllm.py -q

ALAMBIC_VLLM_PATH is the served model's folder (its tokenizer and, for the equivalence check, its
weights, loaded here with transformers); ALAMBIC_VLLM_MAX_LOGPROBS the server's --max-logprobs (20).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

URL = os.environ.get("ALAMBIC_VLLM_URL")
MODEL = os.environ.get("ALAMBIC_VLLM_MODEL", "teacher")
PATH = os.environ.get("ALAMBIC_VLLM_PATH")
LIMIT = int(os.environ.get("ALAMBIC_VLLM_MAX_LOGPROBS", "20"))
pytestmark = pytest.mark.skipif(not URL or not PATH, reason="set ALAMBIC_VLLM_URL and ALAMBIC_VLLM_PATH (real vLLM)")


def _client(top_k: int, model: str = MODEL):
    from alambic.generate.config import RetryConfig
    from alambic.teachers.served_client import PromptLogprobClient

    return PromptLogprobClient(URL, model, top_k, timeout_s=120, retry=RetryConfig(max_attempts=3, base_delay_s=0.5))


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(PATH)


def test_identity_checks_pass_and_refuse():
    from alambic.errors import ConfigError
    from alambic.teachers.served_identity import check_server

    tokenizer = _tokenizer()
    rows = [tokenizer.encode("def add(a, b):\n    return a + b\n")]
    entry = check_server(_client(LIMIT), tokenizer, len(tokenizer), rows, 128, 256)
    assert entry["id"] == MODEL
    with pytest.raises(ConfigError, match="refused prompt_logprobs|log-probabilities per position"):
        check_server(_client(LIMIT + 1), tokenizer, len(tokenizer), rows, 128, 0)
    with pytest.raises(ConfigError, match="not teacher.server_model"):
        check_server(_client(LIMIT, "not-" + MODEL), tokenizer, len(tokenizer), rows, 128, 0)


def test_signal_matches_the_same_model_run_locally():
    import torch
    from transformers import AutoModelForCausalLM

    from alambic.cache.writer import topk_signal

    tokenizer = _tokenizer()
    k = min(LIMIT, 20)
    rows = [tokenizer.encode(text) for text in ("The capital of France is Paris. The capital of Italy is",
                                                 "import numpy as np\nx = np.arange(10)\nprint(x.sum())")]
    signals = _client(k).score(rows)
    model = AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float32).eval()
    for row, signal in zip(rows, signals):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row])).logits[0]
        ids, logprobs, tail = topk_signal(logits, k, 1.0)
        agree, close = 0, []
        for position in range(len(row)):
            served = dict(zip(signal.ids[position].tolist(), signal.logprobs[position].tolist()))
            local = dict(zip(ids[position].tolist(), logprobs[position].tolist()))
            shared = set(served) & set(local)
            agree += len(shared)
            close += [abs(served[t] - local[t]) for t in shared]
        assert agree >= 0.9 * k * len(row), "the server's top-k differs from the local model's"
        assert np.median(close) < 0.02 and max(close) < 0.5, (np.median(close), max(close))


def test_a_short_run_trains_against_vllm(tmp_path):
    from alambic.config import DistillConfig
    from alambic.training.loop import run_distillation

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join('{"text": "%s"}' % f"Line {i}: the quick brown fox jumps over the lazy dog."
                              for i in range(32)) + "\n")
    config = DistillConfig.model_validate({
        "teacher": {"server": URL, "server_model": MODEL, "top_k": min(LIMIT, 20)},
        "student": {"model": PATH},
        "data": {"train": str(data), "max_length": 64},
        "loss": {"objective": "forward_kl", "alpha": 0.0},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 4, "progress": False},
    })
    result = run_distillation(config, overwrite=True)
    assert len(result.history) == 3 and all(np.isfinite(r["loss"]) for r in result.history)
