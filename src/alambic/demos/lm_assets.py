"""The LM demo's shipped teacher and its corpus: where it lies, its manifest, which stdlib modules it saw.

Shared by the demo (`alambic demo --task lm`, which reads them) and the script
that trains the teacher (`python -m alambic.demos.lm_teacher`, which writes them).

    python -c "from alambic.demos.lm_assets import load_manifest; print(load_manifest()['steps'])"
"""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "lm_teacher"
MANIFEST = "manifest.json"
RESERVED_VALIDATION, RESERVED_HELDOUT = 8, 40


def stdlib_split(seed: int) -> dict[str, list[str]]:
    """Module paths (relative to the stdlib root), shuffled with `seed`: validation, held-out, train."""
    from alambic.data.stdlib_corpus import stdlib_files

    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [str(p.relative_to(root)) for p in stdlib_files(skip_generated=True)]
    random.Random(seed).shuffle(paths)
    reserved = RESERVED_VALIDATION + RESERVED_HELDOUT
    return {"validation": paths[:RESERVED_VALIDATION], "heldout": paths[RESERVED_VALIDATION:reserved],
            "train": paths[reserved:]}


def read_modules(relative_paths: list[str]) -> list[str]:
    """Texts of the listed modules that exist in this interpreter (another Python version may lack a few)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(root / p).read_text(encoding="utf-8", errors="replace") for p in relative_paths if (root / p).is_file()]


def load_manifest(folder: Path = SHIPPED) -> dict | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


