"""Filters on parsed examples: length bounds, refusals, duplicates, and evaluation-set contamination.

An example is all student records made from one teacher answer (step-by-step
makes two); it is kept or rejected as a whole, and every rejection says why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from alambic.errors import ConfigError
from alambic.generate.config import ContaminationConfig, FilterConfig
from alambic.generate.inputs import read_table, require_columns
from alambic.generate.textsim import NgramIndex, words


@dataclass
class Example:
    source_id: object
    sample_index: int
    records: list[dict]
    meta: dict = field(default_factory=dict)

    def text(self) -> str:
        return "\n".join(f"{r['prompt']}\n{r['completion']}" for r in self.records)

    def completions(self) -> str:
        return "\n".join(r["completion"] for r in self.records)


def rejection(example: Example, reason: str, detail: str) -> dict:
    return {"id": example.source_id, "sample_index": example.sample_index, "reason": reason, "detail": detail,
            "records": example.records}


class ContaminationCheck:
    """n-gram overlap between generated examples and the evaluation sets named in the config."""

    def __init__(self, config: ContaminationConfig):
        self.config = config
        self.indexes: dict[str, NgramIndex] = {}
        for position, ref in enumerate(config.eval_sets):
            name = ref.name or Path(ref.path).stem or f"eval_{position}"
            rows = read_table(ref.path)
            require_columns(rows, ref.columns, f"evaluation set {ref.path!r}",
                            f"filters.contamination.eval_sets[{position}].columns")
            index = NgramIndex(config.ngram)
            for row in rows:
                for column in ref.columns:
                    index.add(str(row[column]))
            self.indexes[name] = index
        self.flagged: dict[str, list[dict]] = {name: [] for name in self.indexes}
        self.checked = 0

    def check(self, example: Example) -> list[str]:
        """Names of the evaluation sets this example overlaps with (recorded for the report)."""
        self.checked += 1
        text = example.text()
        hits = []
        for name, index in self.indexes.items():
            share, found = index.overlap(text)
            if share >= self.config.threshold:
                hits.append(name)
                self.flagged[name].append({"id": example.source_id, "sample_index": example.sample_index,
                                           "overlap": round(share, 4), "shared_ngrams": found})
        return hits

    def report(self) -> dict:
        return {
            "ngram": self.config.ngram, "threshold": self.config.threshold, "dropped": self.config.drop,
            "examples_checked": self.checked,
            "eval_sets": {name: {"flagged": len(items), "examples": items} for name, items in self.flagged.items()},
        }


class ExampleFilter:
    def __init__(self, config: FilterConfig):
        self.config = config
        try:
            self.refusals = [re.compile(p, re.IGNORECASE) for p in config.refusal_patterns]
        except re.error as err:
            raise ConfigError(f"filters.refusal_patterns holds an invalid regular expression: {err}",
                              "fix or remove that pattern") from None
        self.contamination = ContaminationCheck(config.contamination) if config.contamination else None
        self._seen: set[tuple] = set()

    def apply(self, examples: list[Example]) -> tuple[list[Example], list[dict]]:
        kept, rejected = [], []
        for example in examples:
            reason = self._reason_to_drop(example)
            if reason is None:
                kept.append(example)
            else:
                rejected.append(rejection(example, *reason))
        return kept, rejected

    def _reason_to_drop(self, example: Example) -> tuple[str, str] | None:
        # Checked in this order so the cheapest, most certain reason is the one reported.
        for record in example.records:
            length = len(record["completion"])
            if length < self.config.min_chars:
                return "too_short", f"{length} characters < filters.min_chars={self.config.min_chars}"
            if self.config.max_chars is not None and length > self.config.max_chars:
                return "too_long", f"{length} characters > filters.max_chars={self.config.max_chars}"
        if self.config.drop_refusals:
            for pattern in self.refusals:
                match = pattern.search(example.completions())
                if match:
                    return "refusal", f"matched {match.group(0)!r}"
        if self.contamination is not None:
            hits = self.contamination.check(example)
            if hits and self.contamination.config.drop:
                return "contaminated", f"n-gram overlap with {', '.join(hits)}"
        if self.config.dedupe:
            signature = tuple((" ".join(words(r["prompt"])), " ".join(words(r["completion"]))) for r in example.records)
            if signature in self._seen:
                return "duplicate", "same prompt and completion as an earlier example"
            self._seen.add(signature)
        return None
