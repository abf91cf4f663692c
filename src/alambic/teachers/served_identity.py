"""Before training: is the server reachable, serving the configured model, with our tokenizer, and top_k?

Each refusal is a ConfigError (exit 2) raised before the run folder is written:

- unreachable server: GET /models fails for the whole retry budget;
- wrong model: `teacher.server_model` is not among the served models;
- no prompt log-probabilities: the probe's answer has no `prompt_logprobs`;
- k above the server's limit: the server refuses `prompt_logprobs: k` (vLLM: --max-logprobs) or
  returns fewer than k per position;
- another tokenizer: a returned id lies outside the student's vocabulary, a returned token's text
  differs from the student tokenizer's text for that id (`check_tokens` ids spread over the vocabulary
  are probed), or the server's /tokenize (vLLM) splits a probe text differently.
"""

from __future__ import annotations

import numpy as np

from alambic.errors import ConfigError
from alambic.generate.backends.base import FatalTeacherError, RejectedRequestError, TransientTeacherError
from alambic.teachers.served_client import MissingPromptLogprobs, TooFewLogprobs, check_status

PROBE_TEXT = "def distil(teacher, student):\n    return {'loss': 0.5}  # naïve café 42\n"
LAUNCH_HINT = "vllm serve MODEL --max-logprobs K (K >= teacher.top_k)"


def _first_answer(client, call, what: str):
    """Run `call` with the client's retry budget for transient errors; a ConfigError if it never answers."""
    last = None
    for attempt in range(1, client.retry.max_attempts + 1):
        try:
            return call()
        except (MissingPromptLogprobs, TooFewLogprobs):
            raise
        except TransientTeacherError as err:
            last = err
            if attempt < client.retry.max_attempts:
                client._sleep(min(client.retry.base_delay_s * 2 ** (attempt - 1), client.retry.max_delay_s))
    raise ConfigError(
        f"cannot {what} the teacher server at {client.url}: {client.retry.max_attempts} attempts failed "
        f"(last: {last.kind}: {last})",
        f"start the server ({LAUNCH_HINT}) or fix teacher.server",
    )


def check_served_model(client, max_length: int) -> dict:
    """The served model's entry from GET /models; refuses a server that does not list `client.model`."""

    def listing():
        status, headers, data = client.request("GET", client.prefix + "/models")
        check_status(status, headers, data, client.url, client.model)
        import json

        try:
            return json.loads(data)
        except ValueError:
            raise TransientTeacherError("invalid_response", "GET /models did not answer JSON") from None

    try:
        answer = _first_answer(client, listing, "reach")
    except FatalTeacherError as err:
        raise ConfigError(str(err.message), err.hint) from None
    entries = [e for e in (answer.get("data") or []) if isinstance(e, dict)] if isinstance(answer, dict) else []
    names = [str(e.get("id")) for e in entries]
    entry = next((e for e in entries if e.get("id") == client.model), None)
    if entry is None:
        raise ConfigError(
            f"the teacher server at {client.url} serves {', '.join(map(repr, names)) or 'no model'}, "
            f"not teacher.server_model {client.model!r}",
            "set teacher.server_model to the served model's name, or serve the configured model "
            "(vllm serve MODEL --served-model-name NAME)",
        )
    limit = entry.get("max_model_len")
    if isinstance(limit, int) and limit <= max_length:
        raise ConfigError(
            f"the served model takes at most {limit} tokens per request, data.max_length is {max_length} "
            "(one more position is generated per row)",
            f"set data.max_length below {limit}, or serve with --max-model-len > {max_length}",
        )
    return entry


def probe_rows(tokenizer, sample_rows: list[list[int]], check_tokens: int, vocab_size: int) -> list[list[int]]:
    """A row of ids spread over the vocabulary (each one's text is compared) and a short real row."""
    rows = [list(row[:48]) for row in sample_rows[:1] if len(row) >= 2]
    if check_tokens:
        spread = np.unique(np.linspace(0, vocab_size - 1, min(check_tokens, vocab_size)).astype(np.int64)).tolist()
        rows.append(spread if len(spread) >= 2 else spread * 2)
    return rows or [[0, 0]]


def check_prompt_logprobs(client, tokenizer, vocab_size: int, sample_rows: list[list[int]], check_tokens: int) -> None:
    rows = probe_rows(tokenizer, sample_rows, check_tokens, vocab_size)
    try:
        _, answer = _first_answer(client, lambda: client.score_once(rows), "score a probe with")
    except MissingPromptLogprobs:
        raise ConfigError(
            f"the teacher server at {client.url} answered without prompt_logprobs: it cannot score given tokens",
            f"serve the teacher with vLLM ({LAUNCH_HINT}), whose completions endpoint returns prompt_logprobs",
        ) from None
    except TooFewLogprobs as err:
        raise ConfigError(
            f"the teacher server at {client.url} returns {err.got} log-probabilities per position, "
            f"teacher.top_k is {client.top_k}", f"lower teacher.top_k to {err.got}, or serve with {LAUNCH_HINT}",
        ) from None
    except RejectedRequestError as err:
        if "logprob" in str(err).lower():
            raise ConfigError(
                f"the teacher server at {client.url} refused prompt_logprobs={client.top_k}: {err}",
                f"lower teacher.top_k, or start the server with a higher limit: {LAUNCH_HINT}",
            ) from None
        raise ConfigError(
            f"the teacher server at {client.url} refused the start-up probe (token ids 0..{vocab_size - 1} of the "
            f"student's vocabulary): {err}",
            "serve a teacher with the student's tokenizer, and check teacher.top_k and data.max_length",
        ) from None
    except FatalTeacherError as err:
        raise ConfigError(str(err.message), err.hint) from None
    check_token_texts(client.url, tokenizer, vocab_size, answer)


def _texts(tokenizer, token_id: int) -> set[str]:
    decoded = tokenizer.decode([token_id])
    piece = tokenizer.convert_ids_to_tokens(token_id)
    options = {decoded, decoded.strip(), f"token_id:{token_id}"}
    if isinstance(piece, str):
        options |= {piece, piece.strip(), tokenizer.convert_tokens_to_string([piece])}
    return options


def check_token_texts(url: str, tokenizer, vocab_size: int, answer: dict) -> None:
    """Every (id, decoded_token) the server returned must name an id of our vocabulary with the same text."""
    mismatches, compared = [], 0
    for choice in answer.get("choices", []):
        for entry in choice.get("prompt_logprobs") or []:
            for token, value in (entry or {}).items():
                token_id = int(token)
                if not 0 <= token_id < vocab_size:
                    raise _tokenizer_error(url, f"it returned token id {token_id}, outside the student's "
                                           f"{vocab_size}-token vocabulary")
                text = value.get("decoded_token") if isinstance(value, dict) else None
                if not text or "\ufffd" in text:  # no text, or part of a multi-byte character: uninformative
                    continue
                compared += 1
                if text not in _texts(tokenizer, token_id) and text.strip() not in _texts(tokenizer, token_id):
                    mismatches.append((token_id, text, tokenizer.decode([token_id])))
    if mismatches and len(mismatches) > compared // 100:  # tolerate a rare decoding convention difference
        shown = "; ".join(f"id {i}: server {s!r}, student {o!r}" for i, s, o in mismatches[:3])
        raise _tokenizer_error(url, f"{len(mismatches)} of {compared} returned tokens have another text ({shown})")


def check_tokenize_endpoint(client, tokenizer) -> None:
    """vLLM's POST /tokenize (at the server root): the probe text must split into our ids. Skipped if absent."""
    root = client.prefix[: -len("/v1")] if client.prefix.endswith("/v1") else client.prefix
    payload = {"model": client.model, "prompt": PROBE_TEXT, "add_special_tokens": False}
    try:
        status, _, data = client.request("POST", root + "/tokenize", payload)
    except TransientTeacherError:
        return
    import json

    try:
        tokens = json.loads(data).get("tokens") if status == 200 else None
    except (ValueError, AttributeError):
        tokens = None
    if not isinstance(tokens, list):
        return
    ours = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    if list(tokens) != list(ours):
        raise _tokenizer_error(client.url, f"its /tokenize splits a probe text into {tokens[:12]}..., "
                               f"the student's tokenizer into {ours[:12]}...")


def _tokenizer_error(url: str, detail: str) -> ConfigError:
    return ConfigError(
        f"the teacher server at {url} uses another tokenizer than the student: {detail}",
        "serve a teacher with the student's tokenizer (the token ids must mean the same tokens), "
        "or check teacher.server_model",
    )


def check_server(client, tokenizer, vocab_size: int, sample_rows: list[list[int]], max_length: int,
                 check_tokens: int) -> dict:
    """All start-up checks; returns the served model's /models entry."""
    entry = check_served_model(client, max_length)
    check_prompt_logprobs(client, tokenizer, vocab_size, sample_rows, check_tokens)
    if check_tokens:
        check_tokenize_endpoint(client, tokenizer)
    return entry
