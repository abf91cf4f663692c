"""Co-distillation / online distillation (`co_distill:`): models that teach each other as they train.

The student and the `peers` train together in one loop with one optimizer: the
peers live in `student.auxiliary`. Every model's teacher is the mixture of the
other models' current predictions at the loss temperature, detached (deep
mutual learning, Zhang et al. 2018; codistillation, Anil et al. 2018), and its
loss is the run's loss (objective, temperature, alpha = hard-label CE weight):

- the student: through the loop's logit loss, with `CoDistillTeacher` as source;
- each peer: through `PeerTerm`, scaled by co_distill.weight.

At the end of the run each peer is saved next to the student:
run_dir/peers/peer-<k>/ (safetensors + tokenizer).

    alambic distill configs/co_distill.yaml
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from alambic.config import ModelConfig
from alambic.data import IGNORE
from alambic.durable import atomic_dir
from alambic.errors import ConfigError
from alambic.losses.options import LossOptions
from alambic.models import check_tokenizers_compatible, load_model, load_tokenizer
from alambic.models.module import StudentModule
from alambic.teachers.base import SignalRequest, TeacherSignal
from alambic.teachers.ensemble import mixture_logits
from alambic.training.modes.base import TeacherChoice

PEERS_KEY = "peers"


def mean_mixture(logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Detached logits whose softmax at T is the mean of these models' distributions."""
    logprobs = torch.stack([torch.log_softmax(one.detach().float() / temperature, -1) for one in logits])
    weights = torch.full(logprobs.shape[:-1], 1.0 / len(logits), device=logprobs.device)
    return mixture_logits(logprobs, weights, temperature)


def others_mixture(logits: list[torch.Tensor], index: int, temperature: float) -> torch.Tensor:
    """The target of model `index`: the mean distribution of all the other models, detached."""
    return mean_mixture([model_logits for k, model_logits in enumerate(logits) if k != index], temperature)


@dataclass
class PeerSignal(TeacherSignal):
    """The student's target (`logits`: the peers' detached mixture) and each peer's own logits, with
    gradients: the peers' loss (PeerTerm) reads them from the step instead of running the peers again."""

    peer_logits: tuple[torch.Tensor, ...] = ()


class CoDistillTeacher:
    """The student's signal source: runs every peer (with gradients, for the peers' own loss)
    and hands the student the peers' detached mixture."""

    name = "co-distillation peers"

    def __init__(self, student: StudentModule, options: LossOptions):
        self.student = student
        self.options = options

    def __call__(self, batch: dict, request: SignalRequest | None = None) -> PeerSignal:
        peers = self.student.auxiliary[PEERS_KEY]
        inputs = (batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
        logits = tuple(peer(*inputs)["logits"] for peer in peers)
        return PeerSignal(logits=mean_mixture(list(logits), self.options.temperature), peer_logits=logits)


def _student_logits(module: StudentModule, outputs: dict) -> torch.Tensor:
    """The student's logits for the peers' targets; the fused path only built hidden states."""
    if outputs.get("logits") is not None:
        return outputs["logits"].detach()
    with torch.no_grad():
        weight, bias = module.head_parameters()
        # What the model's forward() returns: its own transformation after the head (e.g. Gemma soft-capping).
        return module.logit_transform().apply(torch.nn.functional.linear(outputs["hidden"], weight, bias))


class PeerTerm:
    """Each peer's loss against the mixture of all other models (the student included)."""

    name = "peer_loss"

    def __init__(self, task: str, weight: float, options: LossOptions):
        self.task, self.weight, self.options = task, weight, options

    def __call__(self, step) -> dict:
        from alambic.losses import per_token_distillation_loss

        batch, options = step.batch, self.options.kwargs()
        models = [_student_logits(step.module, step.outputs)] + list(step.signal.peer_logits)
        total = 0.0
        for index in range(1, len(models)):
            target = others_mixture(models, index, self.options.temperature)
            if self.task == "sequence_classification":
                per = per_token_distillation_loss(models[index], target, batch["labels"], **options)
                total = total + per["loss"].sum()
            else:
                labels = batch["labels"][:, 1:]
                mask = labels != IGNORE
                per = per_token_distillation_loss(models[index][:, :-1], target[:, :-1], labels, **options)
                total = total + (per["loss"] * mask).sum()
        scaled = self.weight * total
        return {"loss": scaled, "peer_loss": scaled}


class SavePeers:
    """after_train hook: each peer's model and the tokenizer in run_dir/peers/peer-<k>, written atomically."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, student_module_, run_dir) -> None:
        root = Path(run_dir) / "peers"
        for index, peer in enumerate(student_module_.auxiliary[PEERS_KEY]):
            with atomic_dir(root / f"peer-{index}") as temporary:
                peer.model.save_pretrained(temporary, safe_serialization=True)
                self.tokenizer.save_pretrained(temporary)


def _load_peer(path: str, index: int, setup, config) -> StudentModule:
    role = f"co_distill.peers[{index}]"
    peer_cfg = ModelConfig(model=path, num_labels=config.student.num_labels)
    model = load_model(peer_cfg, config.task, role=role)
    if config.task == "causal_lm":
        check_tokenizers_compatible(load_tokenizer(peer_cfg, role=role), setup.tokenizer, model, setup.student.model)
    elif model.config.num_labels != setup.student.model.config.num_labels:
        raise ConfigError(
            f"{role} classifies into {model.config.num_labels} classes and the student into "
            f"{setup.student.model.config.num_labels}",
            "every peer must predict the student's classes",
        )
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return StudentModule(model.train(), setup.vocab_size)


def teacher(setup, config) -> TeacherChoice | None:
    """The peers, loaded beside the student; their mixture teaches the student."""
    co_cfg = config.co_distill
    if co_cfg is None:
        return None
    peers = nn.ModuleList(_load_peer(path, k, setup, config) for k, path in enumerate(co_cfg.peers))
    setup.student.auxiliary[PEERS_KEY] = peers
    name = f"co-distillation with {len(peers)} peer(s): {', '.join(co_cfg.peers)}"
    # The peers change every step: held-out KL to them means little.
    return TeacherChoice(CoDistillTeacher(setup.student, LossOptions.from_config(config.loss)), name, evaluable=False)


def configure(setup, config) -> None:
    co_cfg = config.co_distill
    if co_cfg is None:
        return
    setup.extra_terms.append(PeerTerm(config.task, co_cfg.weight, LossOptions.from_config(config.loss)))
    setup.after_train.append(SavePeers(setup.tokenizer))
