"""Split a demo seed's transfer articles into windows the teacher can read whole (issue 13 experiment).

The demo keeps the first `max_length` tokens of each article, so most unlabelled text
never reaches the teacher. This writes SEED_DIR/data/transfer_windows.jsonl (consecutive
windows of at most --tokens teacher tokens, words kept whole; a window under 20 words
after the first is dropped) and SEED_DIR/cache_windows.yaml (the soft arm's config with
the windows as its unlabelled pool and the fine-tuned teacher live), then the teacher
labels them and both arms rerun on them (benchmarks/RESULTS.md, "Session 7"):

    python benchmarks/demo_windows.py /tmp/seeds6/seed0
    alambic cache-logits /tmp/seeds6/seed0/cache_windows.yaml --out /tmp/seeds6/seed0/teacher_logits_windows \
        --batch-size 32 train.progress=false
    python benchmarks/demo_arms.py --root /tmp/seeds6 --seeds 0 --jobs 2 --variant windows=data.unlabelled=\
/tmp/seeds6/seed0/data/transfer_windows.jsonl,teacher.cache=/tmp/seeds6/seed0/teacher_logits_windows
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def windows(words: list[str], lengths: list[int], budget: int, min_words: int = 20) -> list[str]:
    """Consecutive runs of whole words whose token counts sum to <= budget (a longer word stands alone)."""
    out, start = [], 0
    while start < len(words):
        total, end = 0, start
        while end < len(words) and total + lengths[end] <= budget:
            total, end = total + lengths[end], end + 1
        end = max(end, start + 1)
        if not out or end - start >= min_words:
            out.append(" ".join(words[start:end]))
        start = end
    return out


def main() -> None:
    import yaml
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seed_dir", type=Path, help="a finished demo run (alambic demo or demo_seeds.py)")
    parser.add_argument("--tokens", type=int, default=120, help="teacher tokens per window, [CLS]/[SEP] excluded")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.seed_dir / "teacher" / "final")
    articles = [json.loads(line)["text"] for line in (args.seed_dir / "data" / "transfer.jsonl").read_text().splitlines()]
    rows = []
    for text in articles:
        words = text.split()
        rows += windows(words, [len(tokenizer.tokenize(w)) for w in words], args.tokens)
    path = args.seed_dir / "data" / "transfer_windows.jsonl"
    path.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    raw = yaml.safe_load((args.seed_dir / "soft_targets" / "config.yaml").read_text())
    raw["data"]["unlabelled"] = str(path)
    raw["teacher"] = {"model": str(args.seed_dir / "teacher" / "final")}
    raw["train"]["output_dir"] = str(args.seed_dir / "unused_windows")
    (args.seed_dir / "cache_windows.yaml").write_text(yaml.safe_dump(raw))
    print(f"{len(articles)} articles -> {len(rows)} windows in {path}")


if __name__ == "__main__":
    main()
