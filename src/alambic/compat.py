"""Which modes and features of a distillation run cannot be combined: ONE table, checked before anything loads.

`FEATURES` names each thing a config can turn on (a mode section, a loss
setting, a kind of teacher) with a predicate on the validated `DistillConfig`;
`INCOMPATIBLE` lists the pairs that do not work together, each with why and
how to fix it. `check_compatible(config)` is called by `alambic validate` and
at the start of every run (`run_distillation`), so a bad combination exits
with code 2 and the table's message before any model, tokenizer or data file
is opened.

To add a feature (a new mode, `train.strategy: fsdp`, ...): add one `Feature`
to FEATURES and its rows to INCOMPATIBLE; tests/unit/test_compat.py then asks
for an example config turning the feature on and checks every row through
`alambic validate`.

    alambic validate configs/co_distill.yaml teacher.model=runs/tiny/teacher
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from alambic.errors import ConfigError


@dataclass(frozen=True)
class Feature:
    """Something a config turns on; `label` is how messages name it, `shown` the setting's value in this config."""

    label: str
    present: Callable[[object], bool]
    shown: Callable[[object], str] | None = None

    def describe(self, config=None) -> str:
        if config is None or self.shown is None:
            return self.label
        return f"{self.label} ({self.shown(config)})"


@dataclass(frozen=True)
class Incompatible:
    """Features `a` and `b` cannot be used in one run."""

    a: str
    b: str
    why: str
    fix: str

    def message(self, config=None) -> str:
        """The error; with `config`, the settings' values in it are named too."""
        return f"{FEATURES[self.a].describe(config)} cannot be used with {FEATURES[self.b].describe(config)}: {self.why}"


def _teacher_model(c) -> bool:
    return c.teacher is not None and c.teacher.model is not None


def _record_logprobs(c) -> bool:
    return c.teacher is None and c.data.logprobs_column is not None


def _self_teacher(c) -> bool:
    return c.self_distill is not None and c.self_distill.teacher != "none"


def _ensemble(c) -> bool:
    return bool(c.teachers) or c.ensemble is not None


FEATURES: dict[str, Feature] = {
    # the task and the data
    "classification": Feature("task 'sequence_classification'", lambda c: c.task == "sequence_classification"),
    "packing": Feature("data.packing", lambda c: c.data.packing),
    "not_prompt_completion": Feature(
        "a data.format other than prompt_completion", lambda c: c.data.format != "prompt_completion",
        lambda c: f"data.format is {c.data.format!r}"),
    # the loss
    "top_k": Feature("loss.top_k", lambda c: c.loss.top_k is not None, lambda c: f"{c.loss.top_k}"),
    "logit_softcap": Feature("loss.logit_softcap", lambda c: getattr(c.loss, "logit_softcap", None) is not None,
                             lambda c: f"{c.loss.logit_softcap}"),
    "alpha_one": Feature("loss.alpha = 1", lambda c: c.loss.alpha >= 1.0),
    "cosine": Feature("loss.objective 'cosine'", lambda c: c.loss.objective == "cosine"),
    "temperature_not_1": Feature("a loss.temperature other than 1", lambda c: c.loss.temperature != 1.0,
                                 lambda c: f"loss.temperature is {c.loss.temperature}"),
    "not_reverse_kl_t1": Feature(
        "a loss other than reverse_kl at temperature 1",
        lambda c: c.loss.objective != "reverse_kl" or c.loss.temperature != 1.0,
        lambda c: f"loss.objective is {c.loss.objective!r} at temperature {c.loss.temperature}"),
    # where the teacher signal comes from
    "teacher": Feature("a `teacher:` section", lambda c: c.teacher is not None),
    "teacher_cache": Feature("teacher.cache", lambda c: c.teacher is not None and c.teacher.cache is not None),
    "cached_teacher": Feature(
        "an offline logit cache as the teacher (teacher.cache, no teacher.model)",
        lambda c: c.teacher is not None and c.teacher.cache is not None and c.teacher.model is None),
    "no_teacher_model": Feature("no teacher.model", lambda c: not _teacher_model(c)),
    "no_live_teacher_model": Feature(
        "no live teacher model (teacher.model or a self_distill teacher)",
        lambda c: not _teacher_model(c) and not _self_teacher(c)),
    "no_teacher_signal": Feature(
        "no teacher (teacher, teachers, self_distill or co_distill)",
        lambda c: c.teacher is None and not c.teachers and not _self_teacher(c) and c.co_distill is None
        and not _record_logprobs(c)),
    "served_teacher": Feature(
        "a served teacher (teacher.server)", lambda c: c.teacher is not None and c.teacher.server is not None,
        lambda c: f"teacher.server is {c.teacher.server}"),
    "served_member": Feature("a served teacher in `teachers:`", lambda c: any(t.server is not None for t in c.teachers)),
    "record_logprobs": Feature(
        "data.logprobs_column as the teacher (stored top-k logprobs)", _record_logprobs),
    "student_from_teacher": Feature("student.from_teacher", lambda c: c.student.from_teacher is not None),
    # modes
    "teachers": Feature("a `teachers:` list", lambda c: bool(c.teachers)),
    "ensemble": Feature("an `ensemble:` section", lambda c: c.ensemble is not None),
    "no_teachers": Feature("an empty `teachers:` list", lambda c: not c.teachers),
    "ensemble_route": Feature(
        "ensemble.method 'route'", lambda c: c.ensemble is not None and c.ensemble.method == "route"),
    "cached_member": Feature(
        "a logit cache in `teachers:`", lambda c: any(t.cache is not None and t.model is None for t in c.teachers)),
    "self_distill": Feature("self_distill", lambda c: c.self_distill is not None),
    "self_distill_teacher": Feature(
        "a self_distill teacher (self_distill.teacher other than none)", _self_teacher),
    "co_distill": Feature("co_distill", lambda c: c.co_distill is not None),
    "cross_tokenizer": Feature("cross_tokenizer", lambda c: c.cross_tokenizer is not None),
    "representation": Feature("representation", lambda c: c.representation is not None),
    "rollout": Feature("a rollout.policy other than off_policy", lambda c: c.rollout.policy != "off_policy"),
    "on_policy": Feature("rollout.policy 'on_policy'", lambda c: c.rollout.policy == "on_policy"),
    "sequence_level": Feature("rollout.policy 'sequence_level'", lambda c: c.rollout.policy == "sequence_level"),
    "minillm": Feature("rollout.policy 'minillm'", lambda c: c.rollout.policy == "minillm"),
    "vllm": Feature("rollout.engine 'vllm'", lambda c: c.rollout.engine == "vllm"),
    # how the run spreads over processes (training/distributed.py, docs/scale.md)
    "fsdp": Feature("train.strategy 'fsdp'", lambda c: c.train.strategy == "fsdp"),
    "ddp": Feature("train.strategy 'ddp'", lambda c: c.train.strategy == "ddp"),
    "teacher_offload": Feature("train.fsdp.teacher_offload", lambda c: c.train.fsdp.teacher_offload),
    "unsharded_teacher": Feature("train.fsdp.shard_teacher false", lambda c: not c.train.fsdp.shard_teacher),
    "cpu_run": Feature("train.cpu", lambda c: c.train.cpu),
    "fp16": Feature("train.mixed_precision 'fp16'", lambda c: c.train.mixed_precision == "fp16"),
    "interchange": Feature("interchange", lambda c: c.interchange is not None),
    "quantization": Feature("quantization", lambda c: c.quantization is not None),
    # transfer sets (data/transfer.py, losses/targets.py)
    "unlabelled_pool": Feature("data.unlabelled", lambda c: c.data.unlabelled is not None),
    "hard_targets": Feature("loss.teacher_targets 'hard'", lambda c: c.loss.teacher_targets == "hard"),
}

_ONE_TOKENIZATION = "it compares tensors position by position in one tokenization"
_CROSS_FIX = "remove it, or remove cross_tokenizer; see docs/modes.md#cross-tokenizer"
_SELF = "the student teaches itself (self_distill.teacher), so there is no room for another teacher"
_SELF_FIX = "remove it, or set self_distill.teacher: none to keep it and train only early exits"
_CO = "in co-distillation the student and its peers teach each other"
_RECORD = "the teacher is the logprobs stored in the data"
_RECORD_FIX = "remove it, or remove data.logprobs_column and give a teacher section"
_FSDP_FIX = "use train.strategy: ddp for this mode (see docs/scale.md#what-runs-under-fsdp)"
_FSDP_ONE_TEACHER = "only one live teacher is sharded; the others would be full copies on every process"
_SPARSE_TOP_K = "a sparse teacher already holds only its own top-k tokens; loss.top_k would be silently ignored"

INCOMPATIBLE: tuple[Incompatible, ...] = (
    # cross-tokenizer distillation: the signal lives in another vocabulary and tokenization
    Incompatible("cross_tokenizer", "classification", "classifiers share their classes, not tokens",
                 "remove cross_tokenizer"),
    Incompatible("cross_tokenizer", "no_teacher_model", "a live teacher model must run on its own tokens",
                 "set teacher.model (a logit cache holds teacher-vocabulary ids on the student's tokens)"),
    Incompatible("cross_tokenizer", "teacher_cache", "a logit cache is indexed by the student's tokens",
                 "remove teacher.cache"),
    Incompatible("cross_tokenizer", "student_from_teacher", "a student built from the teacher shares its tokenizer",
                 "give student.model with its own tokenizer, or remove cross_tokenizer"),
    Incompatible("cross_tokenizer", "alpha_one", "alpha is the CE weight, so the teacher would get no weight",
                 "set loss.alpha below 1 (e.g. 0.5)"),
    Incompatible("cross_tokenizer", "top_k", "it picks teacher token ids the student does not have",
                 "remove loss.top_k"),
    Incompatible("cross_tokenizer", "logit_softcap", "its ULD / projected-KL terms compare the two vocabularies' "
                 "own distributions and would not cap them", "remove loss.logit_softcap"),
    Incompatible("cross_tokenizer", "packing", "the text of each row must be recovered on its own",
                 "set data.packing: false"),
    Incompatible("cross_tokenizer", "rollout", "rollouts score samples in one vocabulary",
                 "use rollout.policy: off_policy"),
    Incompatible("cross_tokenizer", "teachers", _ONE_TOKENIZATION, _CROSS_FIX),
    Incompatible("cross_tokenizer", "ensemble", _ONE_TOKENIZATION, _CROSS_FIX),
    Incompatible("cross_tokenizer", "representation", _ONE_TOKENIZATION, _CROSS_FIX),
    Incompatible("cross_tokenizer", "self_distill", _ONE_TOKENIZATION, _CROSS_FIX),
    Incompatible("cross_tokenizer", "co_distill", _ONE_TOKENIZATION, _CROSS_FIX),
    # who the teacher is: exactly one source
    Incompatible("teacher", "teachers", "both `teacher:` and `teachers:` are set",
                 "put every teacher in the teachers: list (with weight and name), and remove teacher:"),
    Incompatible("ensemble", "no_teachers", "an ensemble combines the teachers of a `teachers:` list",
                 "list the teachers (each with model or cache), or remove the ensemble section"),
    Incompatible("self_distill_teacher", "teacher", _SELF, _SELF_FIX),
    Incompatible("self_distill_teacher", "teachers", _SELF, _SELF_FIX),
    Incompatible("self_distill_teacher", "co_distill", _SELF, _SELF_FIX),
    Incompatible("co_distill", "teacher", _CO, "remove the teacher section (or co_distill)"),
    Incompatible("co_distill", "teachers", _CO, "remove the teachers list (or co_distill)"),
    # multi-teacher routing
    Incompatible("ensemble_route", "rollout", "routing reads each row's teacher from the data, and a rollout "
                 "replaces the rows' completions", "use ensemble.method fixed or confidence with rollouts"),
    Incompatible("ensemble_route", "packing", "routing sends each data row to one teacher, and packing mixes "
                 "records in a row", "set data.packing: false"),
    # rollouts: sampling text, then scoring it with a teacher
    Incompatible("rollout", "classification", "rollouts sample text", "set rollout.policy: off_policy"),
    Incompatible("rollout", "packing", "a rollout needs one document per row to find its prompt",
                 "set data.packing: false"),
    Incompatible("vllm", "on_policy", "vLLM samples from a fixed model and the student changes every step",
                 "use rollout.engine: hf, or policy: sequence_level (the teacher writes the completions)"),
    Incompatible("vllm", "minillm", "vLLM samples from a fixed model and the student changes every step",
                 "use rollout.engine: hf"),
    Incompatible("on_policy", "no_teacher_signal", "the teacher must score the student's new samples",
                 "set teacher.model to a live teacher, or teacher.server to a served one"),
    Incompatible("on_policy", "cached_teacher", "the teacher must score the student's new samples, and a cache only "
                 "covers the rows it was computed on", "set teacher.model to a live teacher (and remove teacher.cache)"),
    Incompatible("on_policy", "cached_member", "every teacher must score the student's new samples, and a cache "
                 "only covers the rows it was computed on", "give each teacher a model instead of a cache"),
    Incompatible("on_policy", "co_distill", "the peers change every step and cannot be a fixed scorer",
                 "use rollout.policy: off_policy with co_distill"),
    Incompatible("sequence_level", "no_live_teacher_model", "a live teacher model must write the completions",
                 "set teacher.model to a model folder or hub id (and remove teacher.cache)"),
    Incompatible("minillm", "no_live_teacher_model", "a live teacher model must score and mix into the samples",
                 "set teacher.model to a model folder or hub id (and remove teacher.cache)"),
    Incompatible("minillm", "not_reverse_kl_t1", "its single-step term is the token-level reverse KL at "
                 "temperature 1", "set loss.objective: reverse_kl and loss.temperature: 1"),
    # representation transfer: hidden states of one live teacher
    Incompatible("representation", "no_live_teacher_model", "it needs the hidden states of one live teacher model",
                 "set teacher.model to a model folder (not teacher.cache, teachers: or co_distill)"),
    # sparse (top-k) teachers
    Incompatible("top_k", "cached_teacher", _SPARSE_TOP_K, "remove loss.top_k (the cache's k applies)"),
    Incompatible("top_k", "cached_member", _SPARSE_TOP_K, "remove loss.top_k (each cache's k applies)"),
    Incompatible("top_k", "record_logprobs", _SPARSE_TOP_K, "remove loss.top_k (the stored k applies)"),
    Incompatible("cosine", "cached_teacher", "cosine compares raw logits, and a logit cache holds only "
                 "log-probabilities", "use forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl or tvd"),
    # a served teacher: top-k log-probabilities at temperature 1 from a server, per unpacked row
    Incompatible("served_teacher", "classification", "a server returns next-token log-probabilities",
                 "set task: causal_lm"),
    Incompatible("served_teacher", "temperature_not_1", "the server returns log-probabilities at temperature 1 "
                 "and a top-k distribution cannot be re-tempered", "set loss.temperature: 1"),
    Incompatible("served_teacher", "cosine", "cosine compares raw logits, and a server returns top-k "
                 "log-probabilities", "use forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl or tvd"),
    Incompatible("served_teacher", "packing", "the server scores each row from position 0, and packed rows restart "
                 "positions mid-row", "set data.packing: false"),
    Incompatible("served_teacher", "top_k", _SPARSE_TOP_K, "remove loss.top_k (teacher.top_k applies)"),
    Incompatible("teachers", "served_member", "ensemble members are loaded models or caches; a served member is "
                 "not supported", "use one served teacher (teacher.server), or models and caches in teachers:"),
    # the teacher's logprobs stored in the data (alambic generate)
    Incompatible("record_logprobs", "not_prompt_completion", "the logprobs belong to a record's completion",
                 "write the generated data with output.student_format: prompt_completion"),
    Incompatible("record_logprobs", "packing", "each record's logprobs must stay on its own row",
                 "set data.packing: false"),
    Incompatible("record_logprobs", "temperature_not_1", "the stored teacher logprobs are at temperature 1 and "
                 "a top-k distribution cannot be re-tempered",
                 "set loss.temperature=1, or distil from a teacher model (teacher.model) instead"),
    Incompatible("record_logprobs", "cosine", "cosine needs the teacher's raw logits",
                 "use forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl or tvd"),
    Incompatible("record_logprobs", "teachers", _RECORD, _RECORD_FIX),
    Incompatible("record_logprobs", "self_distill", _RECORD, _RECORD_FIX),
    Incompatible("record_logprobs", "co_distill", _RECORD, _RECORD_FIX),
    Incompatible("record_logprobs", "cross_tokenizer", _RECORD, _RECORD_FIX),
    Incompatible("record_logprobs", "representation", _RECORD, _RECORD_FIX),
    Incompatible("record_logprobs", "rollout", "a rollout replaces the completions the logprobs belong to",
                 _RECORD_FIX),
    # FSDP (train.strategy: fsdp): what is sharded and tested is one student, one live teacher (or a
    # cache / stored logprobs / no teacher), the logit losses (fused or not, top-k) on causal LMs.
    Incompatible("fsdp", "rollout", "generating with a sharded student all-gathers every layer for every new "
                 "token (a full set of collectives per token), which makes rollouts impractically slow", _FSDP_FIX),
    Incompatible("fsdp", "teachers", _FSDP_ONE_TEACHER, _FSDP_FIX),
    Incompatible("fsdp", "ensemble", _FSDP_ONE_TEACHER, _FSDP_FIX),
    Incompatible("fsdp", "self_distill", "its EMA/frozen copy and early-exit heads read the student's full "
                 "weights, which no process holds", _FSDP_FIX),
    Incompatible("fsdp", "co_distill", "its peers are trained models outside the sharded student", _FSDP_FIX),
    Incompatible("fsdp", "cross_tokenizer", "it decodes and re-tokenizes with the teacher model outside the "
                 "sharded path", _FSDP_FIX),
    Incompatible("fsdp", "representation", "its layer outputs and projections are not sharded or tested under "
                 "FSDP", _FSDP_FIX),
    Incompatible("fsdp", "student_from_teacher", "the student would be cut from the sharded teacher's layers",
                 "build the student first (alambic init-student) and set student.model, or use train.strategy: ddp"),
    Incompatible("fsdp", "classification", "only causal LMs are sharded per decoder layer", _FSDP_FIX),
    Incompatible("fsdp", "interchange", "its forward hooks swap activations of whole blocks, which FSDP holds "
                 "only while a block runs; not sharded or tested under FSDP", _FSDP_FIX),
    Incompatible("fsdp", "quantization", "fake-quantized weights are not tested on sharded parameters", _FSDP_FIX),
    Incompatible("fsdp", "fp16", "fp16 needs a gradient scaler, which the FSDP path does not use",
                 "use train.mixed_precision: bf16 (or no)"),
    # teacher_offload moves the FSDP-sharded teacher's shards to CPU memory: refused where it would do nothing
    Incompatible("teacher_offload", "ddp", "only a teacher sharded by FSDP is offloaded; under DDP every process "
                 "holds the whole teacher on its device", "set train.strategy: fsdp, or remove train.fsdp.teacher_offload"),
    Incompatible("teacher_offload", "unsharded_teacher", "only the sharded teacher is offloaded",
                 "set train.fsdp.shard_teacher: true, or remove train.fsdp.teacher_offload"),
    Incompatible("teacher_offload", "cpu_run", "on a CPU run the teacher's shards are in CPU memory already: "
                 "there is nothing to offload", "remove train.fsdp.teacher_offload (it is for GPU runs)"),
    # interchange interventions: one live teacher run again with swapped activations
    Incompatible("interchange", "classification", "it trains next-token distributions under interventions",
                 "remove interchange, or set task: causal_lm"),
    Incompatible("interchange", "no_teacher_model", "it runs one live teacher model again with swapped activations",
                 "set teacher.model to a model folder (not teacher.cache, teachers:, self_distill or co_distill)"),
    Incompatible("interchange", "cross_tokenizer", _ONE_TOKENIZATION, _CROSS_FIX),
    # quantization-aware training: the compressed-tensors export
    Incompatible("quantization", "classification", "its export (compressed-tensors) is written and tested for "
                 "causal LMs only", "remove quantization, or set task: causal_lm"),
    # transfer sets: the teacher labels the unlabelled rows
    Incompatible("unlabelled_pool", "no_teacher_signal", "rows without gold labels learn only from a teacher",
                 "add a teacher section (teacher.model or teacher.cache), or remove data.unlabelled"),
    Incompatible("unlabelled_pool", "packing", "packed blocks would mix labelled and unlabelled rows",
                 "set data.packing: false"),
    Incompatible("hard_targets", "no_teacher_signal", "hard targets are the teacher's argmax",
                 "add a teacher section, or remove loss.teacher_targets"),
    Incompatible("hard_targets", "cross_tokenizer", "the teacher's argmax is a token of another vocabulary",
                 "use loss.teacher_targets: soft"),
)


def violations(config) -> list[Incompatible]:
    """Every row of the table that `config` breaks, in table order."""
    present = {name: bool(feature.present(config)) for name, feature in FEATURES.items()}
    return [row for row in INCOMPATIBLE if present[row.a] and present[row.b]]


def check_compatible(config) -> None:
    """Raise ConfigError (exit code 2) listing every incompatible pair in `config`; no file is touched."""
    broken = violations(config)
    if not broken:
        return
    if len(broken) == 1:
        raise ConfigError(broken[0].message(config), broken[0].fix)
    lines = "\n".join(f"  - {row.message(config)} (fix: {row.fix})" for row in broken)
    raise ConfigError(f"{len(broken)} pairs of settings in this config cannot be combined:\n{lines}",
                      "apply the fixes listed above")
