"""Turn one record into token ids and labels, for each supported data format.

Labels follow the Hugging Face convention: same length as input_ids, not
shifted, -100 where no loss is computed (prompt tokens, non-assistant chat
turns, padding). The loop shifts them when it predicts the next token.
"""

from __future__ import annotations

from alambic.config import DataConfig
from alambic.data.soft_targets import soft_targets_for
from alambic.data.transfer import label_or_ignore
from alambic.errors import DataError

IGNORE = -100


def _require(record: dict, column: str, data_cfg: DataConfig, source: str, index: int):
    if column not in record:
        present = ", ".join(sorted(record)) or "(none)"
        raise DataError(
            f"{source}: record {index} has no column {column!r} needed by data.format={data_cfg.format!r} "
            f"(columns present: {present})",
            f"rename the column in the data or set the matching data.*_column option",
        )
    return record[column]


def _require_text(record: dict, column: str, data_cfg: DataConfig, source: str, index: int) -> str:
    """A text column: a string, never null (str(None) would train on the word "None")."""
    value = _require(record, column, data_cfg, source, index)
    if value is None or isinstance(value, (dict, list)):
        shown = "null" if value is None else f"a JSON {type(value).__name__}"
        raise DataError(
            f"{source}: record {index} column {column!r} is {shown}, not text",
            "give every record a text value in that column, or remove the record",
        )
    return str(value)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_text(record, tokenizer, data_cfg, source, index):
    text = _require_text(record, data_cfg.text_column, data_cfg, source, index)
    ids = _ids(tokenizer, text)
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    if tokenizer.eos_token_id is not None and not data_cfg.packing:
        ids = [*ids, tokenizer.eos_token_id]
    if not data_cfg.packing:
        ids = ids[: data_cfg.max_length]
    return {"input_ids": ids, "labels": list(ids)}


def encode_prompt_completion(record, tokenizer, data_cfg, source, index):
    prompt = _require_text(record, data_cfg.prompt_column, data_cfg, source, index)
    completion = _require_text(record, data_cfg.completion_column, data_cfg, source, index)
    prompt_ids = _ids(tokenizer, prompt)
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    completion_ids = _ids(tokenizer, completion)
    soft = None
    if data_cfg.logprobs_column is not None:  # the teacher's own tokens, each with its top-k
        soft = soft_targets_for(record, data_cfg.logprobs_column, completion, tokenizer, f"{source}: record {index}")
        completion_ids = soft.completion_ids if soft.usable else completion_ids
    if tokenizer.eos_token_id is not None and not (soft is not None and soft.ends_with_eos):
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    ids = (prompt_ids + completion_ids)[: data_cfg.max_length]
    prompt_labels = list(prompt_ids) if data_cfg.train_on_prompt else [IGNORE] * len(prompt_ids)
    labels = (prompt_labels + completion_ids)[: data_cfg.max_length]
    row = {"input_ids": ids, "labels": labels}
    return soft.attach(row, len(prompt_ids)) if soft is not None else row


def _assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render the chat and find the character span of each assistant turn.

    Rendering each prefix of the conversation and diffing lengths works for any
    template that renders earlier turns identically when more turns follow.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for turn, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:turn], tokenize=False) if turn else ""
        upto = tokenizer.apply_chat_template(messages[: turn + 1], tokenize=False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise DataError(
                "the chat template does not render earlier turns the same way when later turns follow",
                "use data.train_on_prompt: true (loss on every token) or a template with stable prefixes",
            )
        spans.append((len(before), len(upto)))
    return full, spans


def encode_messages(record, tokenizer, data_cfg, source, index):
    messages = _require(record, data_cfg.messages_column, data_cfg, source, index)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "data.format is 'messages' but the student's tokenizer has no chat template",
            "use a tokenizer with a chat_template (tokenizer_config.json), or convert the data to "
            "prompt/completion and set data.format: prompt_completion",
        )
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise DataError(
            f"{source}: record {index}: column {data_cfg.messages_column!r} must be a list of "
            '{"role": ..., "content": ...} objects',
        )
    text, spans = _assistant_char_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"][: data_cfg.max_length]
    offsets = encoded["offset_mapping"][: data_cfg.max_length]
    if data_cfg.train_on_prompt:
        return {"input_ids": ids, "labels": list(ids)}
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE
        for token, (begin, _) in zip(ids, offsets)
    ]
    return {"input_ids": ids, "labels": labels}


def encode_classification(record, tokenizer, data_cfg, source, index):
    text = _require(record, data_cfg.text_column, data_cfg, source, index)
    label = label_or_ignore(record, data_cfg.label_column)  # no label: the teacher's targets teach the row
    try:
        label = int(label)
    except (TypeError, ValueError):
        raise DataError(
            f"{source}: record {index}: label {label!r} in column {data_cfg.label_column!r} is not an integer class id",
            "map class names to ids 0..C-1 before training",
        ) from None
    ids = tokenizer(str(text), truncation=True, max_length=data_cfg.max_length)["input_ids"]
    return {"input_ids": ids, "label": label}


ENCODERS = {
    "text": encode_text,
    "prompt_completion": encode_prompt_completion,
    "messages": encode_messages,
    "classification": encode_classification,
}
