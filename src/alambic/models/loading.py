"""Load teacher and student models and tokenizers from a hub id or a local folder.

`trust_remote_code` stays off unless the config turns it on; weights load
through transformers, which prefers safetensors. The teacher is frozen, in eval
mode, and never receives gradients.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from alambic.config import ModelConfig
from alambic.errors import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes")


def _looks_like_path(name: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else was meant as a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/")


def resolve_model_source(name: str, role: str) -> str:
    """Return a loadable name, or raise a clear error for a missing folder."""
    expanded = os.path.expanduser(name)
    if Path(expanded).is_file():
        raise ModelError(
            f"{role} model {name!r} is a file, not a model folder",
            f"set {role}.model to the folder that holds config.json and the weights (or a hub id like 'org/model')",
        )
    if Path(expanded).exists():
        return expanded
    parent = Path(expanded).parent
    if _looks_like_path(name) or (str(parent) not in ("", ".") and parent.is_dir()):
        raise ModelError(
            f"{role} model folder {name!r} does not exist",
            f"check {role}.model: give an existing local folder (with config.json) or a hub id like 'org/model'",
        )
    return name


def _hub_error(name: str, role: str, err: Exception) -> ModelError:
    if "Repo id must" in str(err) or type(err).__name__ == "HFValidationError":
        return ModelError(
            f"{role} model {name!r} is not an existing local folder, nor a valid hub id",
            f"check {role}.model: give an existing local folder (with config.json) or a hub id like 'org/model'",
        )
    if _is_offline():
        return ModelError(
            f"{role} model {name!r} is not a local folder and the hub is offline (HF_HUB_OFFLINE=1), "
            "and it is not in the local cache",
            f"download it on a machine with network (hf download {name} --local-dir DIR) "
            f"and set {role}.model to that folder",
        )
    return ModelError(
        f"cannot load {role} model {name!r}: not a local folder, and loading it from the hub failed ({err})",
        f"check the hub id, your network, or set {role}.model to a local folder",
    )


def quiet_transformers() -> None:
    """Silence transformers' per-load reports (weight-loading bars, newly initialised heads): alambic says what matters.

    `alambic --verbose` (or ALAMBIC_HF_VERBOSE=1) keeps them, for debugging a checkpoint.
    """
    from alambic.output import is_verbose

    if is_verbose() or os.environ.get("ALAMBIC_HF_VERBOSE", "0") in ("1", "true", "yes"):
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(model_cfg: ModelConfig, role: str = "student"):
    from transformers import AutoTokenizer

    source = resolve_model_source(model_cfg.model, role)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source,
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
            local_files_only=_is_offline(),
        )
    except (OSError, ValueError) as err:
        if Path(source).exists():
            raise ModelError(f"cannot load the {role} tokenizer from {source!r}: {err}") from None
        raise _hub_error(model_cfg.model, role, err) from None
    if tokenizer.pad_token_id is None:
        # Padding positions never carry a loss, so any existing token id works as pad.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(model_cfg: ModelConfig, task: str, role: str, empty: bool = False):
    """AutoModelForCausalLM / AutoModelForSequenceClassification from the config.

    `empty`: build the model on the meta device from its config.json only (shapes, no weights);
    sharded runs fill it from the main process (training/distributed.py).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quiet_transformers()
    source = resolve_model_source(model_cfg.model, role)
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    kwargs = {"dtype": DTYPES[model_cfg.dtype], "trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.revision:
        kwargs["revision"] = model_cfg.revision
    if task == "sequence_classification" and model_cfg.num_labels:
        kwargs["num_labels"] = model_cfg.num_labels
    if Path(source).is_dir():
        check_weight_files(Path(source), role, getattr(model_cfg, "allow_pickle_weights", False))
    try:
        if empty:
            return _empty_model(auto, source, kwargs)
        model = auto.from_pretrained(source, local_files_only=_is_offline(), **kwargs)
    except (OSError, ValueError, pickle.UnpicklingError) as err:
        if Path(source).exists():
            raise ModelError(f"cannot load the {role} model from {source!r}: {err}") from None
        raise _hub_error(model_cfg.model, role, err) from None
    return model


def _empty_model(auto, source, kwargs):
    from transformers import AutoConfig

    dtype = kwargs.pop("dtype")
    config = AutoConfig.from_pretrained(source, local_files_only=_is_offline(), **kwargs)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    with torch.device("meta"):
        return auto.from_config(config, dtype=dtype, trust_remote_code=kwargs.get("trust_remote_code", False))


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weight_files(folder: Path, role: str, allow_pickle: bool = False) -> None:
    """Before loading: safetensors files must be whole; pickle-only weights need an explicit opt-in.

    A pickle file can run code when it is loaded; transformers blocks that, but
    the raw error it shows suggests turning the protection off. Say it plainly.
    """
    from safetensors import safe_open

    safetensors = sorted(folder.glob("*.safetensors"))
    for path in safetensors:
        try:
            with safe_open(str(path), framework="pt"):  # reads and checks the header against the file size
                pass
        except Exception as err:  # SafetensorError, OSError: a truncated, empty or foreign file
            raise ModelError(
                f"{role} weights {str(path)!r} are damaged ({err})",
                "the file is truncated or not safetensors: copy or download the model folder again",
            ) from None
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not safetensors and pickles and not allow_pickle:
        raise ModelError(
            f"{role} model folder {str(folder)!r} holds only pickle weights ({', '.join(pickles)}), "
            "and alambic loads safetensors only (a pickle file can run code when loaded)",
            "convert it once where you trust it (AutoModel.from_pretrained(DIR).save_pretrained(DIR)), "
            f"or set {role}.allow_pickle_weights: true to load it with torch's weights-only unpickler",
        )


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def check_tokenizers_compatible(teacher_tokenizer, student_tokenizer, teacher_model=None, student_model=None) -> int:
    """Return the shared vocabulary size, or explain exactly what differs.

    Embedding matrices may have extra padding rows beyond the tokenizer (models
    round their vocab up for speed); those rows are ignored by the loss.
    """
    teacher_vocab = teacher_tokenizer.get_vocab()
    student_vocab = student_tokenizer.get_vocab()
    hint = (
        "use a student with the teacher's tokenizer, or cross-tokenizer distillation "
        "(a separate mode: loss.objective uld / token alignment)"
    )
    if len(teacher_vocab) != len(student_vocab):
        raise ModelError(
            f"teacher and student tokenizers differ in size: teacher {len(teacher_vocab)} tokens, "
            f"student {len(student_vocab)}",
            hint,
        )
    if teacher_vocab != student_vocab:
        differing = sorted(t for t in teacher_vocab if student_vocab.get(t) != teacher_vocab[t])[:5]
        raise ModelError(
            f"teacher and student tokenizers map tokens to different ids (e.g. {differing})", hint
        )
    vocab_size = len(student_vocab)
    for role, model in (("teacher", teacher_model), ("student", student_model)):
        rows = model.get_output_embeddings().weight.shape[0] if model is not None else vocab_size
        if rows < vocab_size:
            raise ModelError(
                f"the {role} model's output layer has {rows} rows but its tokenizer has {vocab_size} tokens",
                f"resize the {role}'s embeddings (model.resize_token_embeddings) or fix the tokenizer",
            )
    return vocab_size
