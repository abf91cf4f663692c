"""Recipes: what the teacher is asked for each input record, and what the student learns from the answer.

- answer: the teacher's answer is the completion.
- label: the answer must name one allowed label; anything else is rejected as unparseable, never guessed.
- step_by_step: rationale and answer become two tasks with prefixes and weights (Hsieh et al., 2023).
- context: the teacher sees the engineered system prompt and few-shot examples;
  the student gets only the bare prompt and the teacher's final answer.

`parse` returns the student records for one answer, or a `Rejection` saying why there are none.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from alambic.errors import ConfigError, DataError
from alambic.generate.config import GenerateConfig, LabelRecipe, StepByStepRecipe


@dataclass
class Rejection:
    reason: str
    detail: str


def render(template: str, record: dict, prompt_column: str, where: str) -> str:
    """Fill `{column}` fields from the record; `{prompt}` is the prompt column whatever its name."""
    fields = {**record, "prompt": record.get(prompt_column, record.get("prompt"))}
    try:
        return template.format_map(fields)
    except KeyError as err:
        raise DataError(
            f"{where} uses the field {{{err.args[0]}}} but the record has no such column "
            f"(columns: {', '.join(sorted(record))})",
            "use a column of the input file, or double the braces ({{ }}) for a literal brace",
        ) from None
    except (ValueError, IndexError) as err:
        raise ConfigError(f"{where} is not a valid template: {err}",
                          "write fields as {column}, literal braces as {{ }}") from None


def compile_pattern(pattern: str, where: str) -> re.Pattern:
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{where} is not a valid regular expression: {err}", "fix the pattern") from None
    if compiled.groups < 1:
        raise ConfigError(f"{where} needs a capture group around the part to keep", "e.g. 'Answer:\\s*(.+)'")
    return compiled


class LabelParser:
    """Maps a free-text answer to exactly one allowed label, or explains why it cannot."""

    def __init__(self, labels: list[str], pattern: str | None, case_sensitive: bool, where: str):
        self.labels = labels
        self.case_sensitive = case_sensitive
        self.pattern = compile_pattern(pattern, where) if pattern else None
        self._lookup = {self._normal(label): label for label in labels}

    def _normal(self, text: str) -> str:
        text = " ".join(text.split()).strip(string.punctuation + " \"'`*")
        return text if self.case_sensitive else text.lower()

    def parse(self, text: str) -> tuple[str | None, str]:
        candidate = text
        if self.pattern is not None:
            match = self.pattern.search(text)
            if match is None:
                return None, "the label pattern did not match"
            candidate = match.group(1)
        label = self._lookup.get(self._normal(candidate))
        if label is None:
            return None, f"{candidate.strip()[:80]!r} is not one of {', '.join(self.labels)}"
        return label, ""


class Recipe:
    """The answer recipe; the others change the prompt the student sees or how the answer is parsed."""

    keeps_raw_completion = True

    def __init__(self, config: GenerateConfig):
        self.config = config
        self.prompt = config.prompt
        self.prompt_column = config.input.prompt_column if config.input else "prompt"
        self.keep_columns = config.input.keep_columns if config.input else []
        self.student_template = self.prompt.student_template or self.prompt.template

    def teacher_messages(self, record: dict) -> list[dict]:
        messages = []
        if self.prompt.system:
            messages.append({"role": "system", "content": self.prompt.system})
        for shot in self.prompt.few_shot:
            messages += [{"role": "user", "content": shot.user}, {"role": "assistant", "content": shot.assistant}]
        messages.append({"role": "user", "content": render(self.prompt.template, record, self.prompt_column,
                                                           "prompt.template")})
        return messages

    def student_prompt(self, record: dict) -> str:
        return render(self.student_template, record, self.prompt_column, "prompt.student_template")

    def base_record(self, record: dict) -> dict:
        return {column: record.get(column) for column in self.keep_columns}

    def parse(self, record: dict, content: str) -> list[dict] | Rejection:
        return [{**self.base_record(record), "prompt": self.student_prompt(record), "completion": content.strip()}]


class Labelling(Recipe):
    keeps_raw_completion = False

    def __init__(self, config: GenerateConfig):
        super().__init__(config)
        recipe: LabelRecipe = config.recipe
        self.parser = LabelParser(recipe.labels, recipe.pattern, recipe.case_sensitive, "recipe.pattern")

    def parse(self, record: dict, content: str) -> list[dict] | Rejection:
        label, why = self.parser.parse(content)
        if label is None:
            return Rejection("unparseable", why)
        return [{**self.base_record(record), "prompt": self.student_prompt(record), "completion": label,
                 "text": record.get(self.prompt_column), "label": label}]


class StepByStep(Recipe):
    keeps_raw_completion = False

    def __init__(self, config: GenerateConfig):
        super().__init__(config)
        self.recipe: StepByStepRecipe = config.recipe
        self.rationale = compile_pattern(self.recipe.rationale_pattern, "recipe.rationale_pattern")
        self.answer = compile_pattern(self.recipe.answer_pattern, "recipe.answer_pattern")
        self.labels = (LabelParser(self.recipe.labels, None, False, "recipe.labels")
                       if self.recipe.labels else None)

    def parse(self, record: dict, content: str) -> list[dict] | Rejection:
        rationale = self.rationale.search(content)
        answer = self.answer.search(content)
        if rationale is None or not rationale.group(1).strip():
            return Rejection("unparseable", "no rationale found")
        if answer is None or not answer.group(1).strip():
            return Rejection("unparseable", "no answer found")
        final = answer.group(1).strip()
        if self.labels is not None:
            final, why = self.labels.parse(final)
            if final is None:
                return Rejection("unparseable", why)
        prompt, base = self.student_prompt(record), self.base_record(record)
        return [
            {**base, "prompt": self.recipe.label_prefix + prompt, "completion": final,
             "weight": self.recipe.label_weight, "task": "label"},
            {**base, "prompt": self.recipe.rationale_prefix + prompt, "completion": rationale.group(1).strip(),
             "weight": self.recipe.rationale_weight, "task": "rationale"},
        ]


class ContextDistillation(Recipe):
    def __init__(self, config: GenerateConfig):
        super().__init__(config)
        # The point of context distillation: the student sees the bare prompt, not the engineered one.
        self.student_template = self.prompt.student_template or "{prompt}"
        pattern = config.recipe.final_answer_pattern
        self.final_answer = compile_pattern(pattern, "recipe.final_answer_pattern") if pattern else None
        self.keeps_raw_completion = self.final_answer is None

    def parse(self, record: dict, content: str) -> list[dict] | Rejection:
        final = content.strip()
        if self.final_answer is not None:
            match = self.final_answer.search(content)
            if match is None or not match.group(1).strip():
                return Rejection("unparseable", "the final-answer pattern did not match")
            final = match.group(1).strip()
        return [{**self.base_record(record), "prompt": self.student_prompt(record), "completion": final}]


def build_recipe(config: GenerateConfig) -> Recipe:
    kinds = {"answer": Recipe, "label": Labelling, "step_by_step": StepByStep,
             "context": ContextDistillation, "self_instruct": Recipe}
    return kinds[config.recipe.kind](config)
