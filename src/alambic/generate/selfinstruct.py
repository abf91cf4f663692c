"""Self-Instruct (Wang et al., 2023): grow a task pool from a few seeds, then have the teacher answer it.

Each round asks the teacher for new instructions, showing a few known ones
drawn with a seeded RNG; proposals too close to a known instruction (ROUGE-L
or n-gram overlap at or above the threshold) are dropped. Every proposal
request goes through the request cache, so a restarted run replays the same
rounds from stored answers without sending them again.
"""

from __future__ import annotations

import random
import re

from alambic.errors import DataError
from alambic.generate.config import SelfInstructRecipe
from alambic.generate.inputs import read_table, require_columns
from alambic.generate.textsim import NearDuplicateIndex, words

LIST_ITEM = re.compile(r"^\s*(?:\d+\s*[.):]|[-*•])\s*(.+?)\s*$")


def load_seeds(recipe: SelfInstructRecipe) -> list[str]:
    if isinstance(recipe.seeds, str):
        rows = read_table(recipe.seeds)
        require_columns(rows, ["instruction"], f"seed file {recipe.seeds!r}", "recipe.seeds")
        seeds = [str(row["instruction"]).strip() for row in rows]
    else:
        seeds = [seed.instruction.strip() for seed in recipe.seeds]
    seeds = [seed for seed in seeds if seed]
    if not seeds:
        raise DataError("recipe.seeds holds no instruction", "give at least one seed task")
    return seeds


def split_proposals(content: str) -> list[str]:
    """Numbered or bulleted lines; plain non-empty lines when the answer is not a list."""
    lines = [line for line in content.splitlines() if line.strip()]
    items = [match.group(1) for line in lines if (match := LIST_ITEM.match(line))]
    return items or [line.strip() for line in lines]


class InstructionPool:
    """Known instructions and the log of every proposal, accepted or not."""

    def __init__(self, recipe: SelfInstructRecipe, seeds: list[str]):
        self.recipe = recipe
        self.index = NearDuplicateIndex(recipe.similarity, recipe.ngram_n)
        self.known: list[str] = []
        self.generated: list[str] = []
        self.log: list[dict] = []
        for seed in seeds:
            self.index.add(seed)
            self.known.append(seed)

    def proposal_messages(self, round_index: int, proposal_index: int, system: str | None) -> list[dict]:
        rng = random.Random(f"{self.recipe.seed}:{round_index}:{proposal_index}")
        demos = rng.sample(self.known, min(self.recipe.demos_per_proposal, len(self.known)))
        count = self.recipe.max_new_per_proposal
        start = len(demos) + 1
        prompt = self.recipe.proposal_template.format(
            demos="\n".join(f"{i}. {demo}" for i, demo in enumerate(demos, start=1)),
            count=count, start=start, start_next=start + 1,
        )
        messages = [{"role": "system", "content": system}] if system else []
        return messages + [{"role": "user", "content": prompt}]

    def offer(self, content: str, round_index: int) -> None:
        for candidate in split_proposals(content)[: self.recipe.max_new_per_proposal]:
            verdict, detail = self._judge(candidate)
            self.log.append({"round": round_index, "instruction": candidate, "accepted": verdict is None,
                             "reason": verdict, "detail": detail})
            if verdict is None:
                self.index.add(candidate)
                self.known.append(candidate)
                self.generated.append(candidate)

    def _judge(self, candidate: str) -> tuple[str | None, str]:
        length = len(words(candidate))
        if length < self.recipe.min_words:
            return "too_short", f"{length} words < recipe.min_words={self.recipe.min_words}"
        if length > self.recipe.max_words:
            return "too_long", f"{length} words > recipe.max_words={self.recipe.max_words}"
        score, closest = self.index.closest(candidate, self.recipe.similarity_threshold)
        if closest is not None:
            return "near_duplicate", f"{self.recipe.similarity}={score:.2f} with {closest[:80]!r}"
        return None, ""

