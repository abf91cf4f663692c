"""Word-level text similarity: ROUGE-L and n-gram overlap, for near-duplicate and contamination checks."""

from __future__ import annotations

import re
from collections import Counter

WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def lcs_length(first: list[str], second: list[str]) -> int:
    if len(first) < len(second):
        first, second = second, first
    previous = [0] * (len(second) + 1)
    for token in first:
        current = [0]
        for j, other in enumerate(second, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(candidate: list[str], reference: list[str]) -> float:
    """ROUGE-L F1 between two token lists (Lin, 2004), symmetric."""
    if not candidate or not reference:
        return 0.0
    common = lcs_length(candidate, reference)
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def ngram_containment(candidate: list[str], reference: list[str], n: int) -> float:
    """Share of the candidate's n-grams that also occur in the reference."""
    grams = ngrams(candidate, n)
    if not grams:
        return 0.0
    return len(grams & ngrams(reference, n)) / len(grams)


class NearDuplicateIndex:
    """Known texts; `closest` finds the most similar one, skipping those that cannot pass the threshold."""

    def __init__(self, measure: str = "rouge_l", n: int = 3):
        if measure not in ("rouge_l", "ngram"):
            raise ValueError(f"unknown similarity {measure!r}")
        self.measure = measure
        self.n = n
        self.entries: list[tuple[str, list[str], Counter]] = []

    def add(self, text: str) -> None:
        tokens = words(text)
        self.entries.append((text, tokens, Counter(tokens)))

    def similarity(self, first: list[str], second: list[str]) -> float:
        if self.measure == "rouge_l":
            return rouge_l(first, second)
        return ngram_containment(first, second, self.n)

    def closest(self, text: str, threshold: float) -> tuple[float, str | None]:
        """The highest similarity at or above `threshold` and its text, else (best bound seen, None)."""
        tokens = words(text)
        counts = Counter(tokens)
        best, best_text = 0.0, None
        for known_text, known_tokens, known_counts in self.entries:
            if self.measure == "rouge_l":
                # The LCS is at most the multiset overlap, which bounds F1 cheaply.
                overlap = sum((counts & known_counts).values())
                if not tokens or 2 * overlap / (len(tokens) + len(known_tokens)) < threshold:
                    continue
            score = self.similarity(tokens, known_tokens)
            if score > best:
                best, best_text = score, known_text
        return (best, best_text) if best >= threshold else (best, None)


class NgramIndex:
    """Hashed word n-grams of reference texts (evaluation sets) for contamination checks."""

    def __init__(self, n: int):
        self.n = n
        self.grams: set[int] = set()

    def add(self, text: str) -> None:
        self.grams.update(hash(gram) for gram in ngrams(words(text), self.n))

    def overlap(self, text: str) -> tuple[float, int]:
        """(share of the text's n-grams found in the index, count found)."""
        grams = {hash(gram) for gram in ngrams(words(text), self.n)}
        if not grams:
            return 0.0, 0
        found = len(grams & self.grams)
        return found / len(grams), found
