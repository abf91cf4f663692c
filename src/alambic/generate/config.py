"""The `alambic generate` config: which teacher, how to sample, what to ask, where to write.

    alambic generate configs/generate_label.yaml sampling.n=2 teacher.max_in_flight=32
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from alambic.config_base import Strict

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

DEFAULT_REFUSALS = [
    r"\bI(?:'m| am) sorry\b",
    r"\bI apologi[sz]e\b",
    r"\bas an AI\b",
    r"\bI (?:cannot|can't|can not|won't) (?:help|assist|comply|provide)\b",
    r"\bI(?:'m| am) (?:not able|unable) to\b",
]


class RetryConfig(Strict):
    max_attempts: int = Field(8, ge=1, description="attempts per request, the first one included")
    base_delay_s: float = Field(0.5, gt=0.0, description="first backoff; doubles each attempt, with full jitter")
    max_delay_s: float = Field(60.0, gt=0.0, description="cap on one backoff wait")
    max_retry_after_s: float = Field(300.0, gt=0.0, description="cap on a server's Retry-After")


class PriceConfig(Strict):
    input_per_million: float = Field(ge=0.0, description="price of one million prompt tokens")
    output_per_million: float = Field(ge=0.0, description="price of one million completion tokens")
    currency: str = "USD"


class TeacherBackendConfig(Strict):
    backend: Literal["openai", "hf", "vllm"] = "openai"
    model: str = Field(description="model name on the server (openai) or hub id / local folder (hf, vllm)")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str | None = Field(None, description="NAME of the environment variable holding the API key")
    timeout_s: float = Field(120.0, gt=0.0, description="per attempt")
    max_in_flight: int = Field(16, ge=1, description="requests at once (openai); hf and vllm run one batch at a time")
    batch_size: int = Field(8, ge=1, description="prompts per generate call (hf, vllm)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("auto", description="hf: 'cpu', 'cuda', 'cuda:1' or 'auto'")
    trust_remote_code: bool = False
    extra_body: dict = Field(default_factory=dict, description="server-specific request fields (openai)")
    retry: RetryConfig = RetryConfig()
    prices: PriceConfig | None = None

    @field_validator("base_url")
    @classmethod
    def _url_shape(cls, value: str | None) -> str | None:
        from alambic.generate.url_check import check_base_url

        return check_base_url(value)


class SamplingConfig(Strict):
    n: int = Field(1, ge=1, description="samples per prompt; each is its own cached request")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1)
    stop: list[str] = []
    seed: int | None = Field(None, description="sample i is requested with seed + i where the server honours seeds")
    logprobs: bool = Field(False, description="store per-token logprobs for later soft-target training")
    top_logprobs: int = Field(0, ge=0, le=20, description="alternatives stored per token with logprobs")

    def request_params(self) -> dict:
        """The parameters that change a teacher's answer (n is not one: each sample is its own request)."""
        return self.model_dump(exclude={"n"})


class InputConfig(Strict):
    path: str
    format: Literal["auto", "jsonl", "parquet", "csv"] = "auto"
    prompt_column: str = "prompt"
    id_column: str | None = Field(None, description="kept as the record id; the row number otherwise")
    keep_columns: list[str] = Field(default_factory=list,
                                    description="copied into the student records, e.g. a gold label")
    limit: int | None = Field(None, ge=1)


class FewShot(Strict):
    user: str
    assistant: str


class PromptConfig(Strict):
    system: str | None = None
    template: str = Field("{prompt}", description="the teacher's user message; {column} is filled from the record")
    few_shot: list[FewShot] = []
    student_template: str | None = Field(None, description="what the student sees; defaults to the template")


class AnswerRecipe(Strict):
    kind: Literal["answer"] = "answer"


class LabelRecipe(Strict):
    kind: Literal["label"]
    labels: list[str]
    pattern: str | None = Field(None, description="regex whose first group holds the label, e.g. 'Label:\\s*(\\w+)'")
    case_sensitive: bool = False

    @field_validator("labels")
    @classmethod
    def _labels_given(cls, labels: list[str]) -> list[str]:
        cleaned = [label.strip() for label in labels]
        if not cleaned:
            raise ValueError("the label set is empty; list the allowed labels, e.g. [positive, negative]")
        if any(not label for label in cleaned):
            raise ValueError("a label is blank")
        if len(set(label.lower() for label in cleaned)) != len(cleaned):
            raise ValueError("labels repeat (compared case-insensitively)")
        return cleaned


class StepByStepRecipe(Strict):
    """Distilling step-by-step (Hsieh et al., 2023): rationale and answer become two student tasks."""

    kind: Literal["step_by_step"]
    rationale_pattern: str = r"(?is)rationale\s*:\s*(.+?)\s*(?:final\s+)?answer\s*:"
    answer_pattern: str = r"(?is)(?:final\s+)?answer\s*:\s*(.+?)\s*$"
    labels: list[str] | None = Field(None, description="when the answer is a label, the allowed set")
    label_prefix: str = "[label] "
    rationale_prefix: str = "[rationale] "
    label_weight: float = Field(1.0, ge=0.0)
    rationale_weight: float = Field(1.0, ge=0.0, description="lambda in L = L_label + lambda * L_rationale")

    @field_validator("labels")
    @classmethod
    def _labels_not_empty(cls, labels: list[str] | None) -> list[str] | None:
        if labels is not None and not [label for label in labels if label.strip()]:
            raise ValueError("the label set is empty; drop `labels` or list the allowed labels")
        return labels


class ContextRecipe(Strict):
    """Context distillation: the teacher gets the engineered context, the student only the bare prompt."""

    kind: Literal["context"]
    final_answer_pattern: str | None = Field(None, description="regex whose first group is the final answer")


class SeedTask(Strict):
    instruction: str
    output: str | None = None


class SelfInstructRecipe(Strict):
    kind: Literal["self_instruct"]
    seeds: list[SeedTask] | str = Field(description="seed tasks inline, or a JSONL file with an `instruction` column")
    rounds: int = Field(2, ge=1)
    proposals_per_round: int = Field(4, ge=1, description="proposal requests per round")
    demos_per_proposal: int = Field(3, ge=1, description="known instructions shown in each proposal request")
    max_new_per_proposal: int = Field(8, ge=1)
    similarity: Literal["rouge_l", "ngram"] = "rouge_l"
    similarity_threshold: float = Field(0.7, gt=0.0, le=1.0,
                                        description="drop a new instruction this close to a known one")
    ngram_n: int = Field(3, ge=1)
    min_words: int = Field(3, ge=1)
    max_words: int = Field(150, ge=1)
    proposal_template: str = (
        "Here are some example tasks:\n{demos}\n"
        "Write {count} new, diverse tasks of the same kind, one per line, numbered {start}., {start_next}., ..."
    )
    seed: int = 0


Recipe = Annotated[
    Union[AnswerRecipe, LabelRecipe, StepByStepRecipe, ContextRecipe, SelfInstructRecipe],
    Field(discriminator="kind"),
]


class EvalSetRef(Strict):
    path: str
    columns: list[str] = ["prompt"]
    name: str | None = None


class ContaminationConfig(Strict):
    eval_sets: list[EvalSetRef]
    ngram: int = Field(8, ge=1, description="words per n-gram")
    threshold: float = Field(0.5, gt=0.0, le=1.0,
                             description="flag a record when this share of its n-grams is in an eval set")
    drop: bool = False


class FilterConfig(Strict):
    min_chars: int = Field(1, ge=0, description="shortest teacher completion kept")
    max_chars: int | None = Field(None, ge=1)
    drop_refusals: bool = True
    refusal_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_REFUSALS))
    dedupe: bool = Field(True, description="drop repeated (prompt, completion) pairs, compared normalised")
    contamination: ContaminationConfig | None = None


class OutputConfig(Strict):
    dir: str = "runs/generate"
    format: Literal["jsonl", "parquet"] = "jsonl"
    student_format: Literal["prompt_completion", "messages"] = "prompt_completion"


class GenerateConfig(Strict):
    """A whole `alambic generate` run."""

    teacher: TeacherBackendConfig
    sampling: SamplingConfig = SamplingConfig()
    input: InputConfig | None = None
    prompt: PromptConfig = PromptConfig()
    recipe: Recipe = AnswerRecipe()
    filters: FilterConfig = FilterConfig()
    output: OutputConfig = OutputConfig()
    progress: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "GenerateConfig":
        if self.input is None and self.recipe.kind != "self_instruct":
            raise ValueError(f"recipe {self.recipe.kind!r} needs an `input` section (path and prompt_column)")
        if self.teacher.backend == "openai" and not self.teacher.base_url:
            raise ValueError("the openai backend needs teacher.base_url, e.g. https://api.openai.com/v1")
        if self.sampling.top_logprobs and not self.sampling.logprobs:
            raise ValueError("sampling.top_logprobs needs sampling.logprobs: true")
        return self
