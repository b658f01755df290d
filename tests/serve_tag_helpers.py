"""Token-classification run folders with random (non-zero) adapters and heads, for the serving tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

import peftkit

from conftest import randomize

TAGS = ["O", "B-location", "I-location", "B-person", "I-person"]


def make_tag_run(folder: Path, model_dir: Path, seed: int, config=None, tags: list[str] | None = None,
                 max_length: int = 16) -> Path:
    """A token-classification run folder as `peftkit train` writes it (LoRA dropout on, as in training)."""
    from transformers import AutoModelForTokenClassification

    tags = tags or TAGS
    torch.manual_seed(seed)
    base = AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=len(tags))
    model = peftkit.adapt(base, config or peftkit.LoraConfig(r=4, target_modules="all-linear", dropout=0.1))
    randomize(model, seed=seed, scale=0.5)
    folder.mkdir(parents=True)
    model.save_adapter(folder / "adapter")
    (folder / "tags.json").write_text(json.dumps({"tags": tags, "scheme": "IOB2", "strict": True}))
    values = {"task": "token-classification", "model": str(model_dir), "method": "lora", "max_length": max_length}
    (folder / "config.yaml").write_text(yaml.safe_dump(values))
    return folder


def predict_rows(folder: Path, texts: list[str], max_length: int) -> list[dict]:
    """What `peftkit predict --run FOLDER --text ...` prints for these texts, at the server's max_length."""
    from peftkit.train.run import Run

    run = Run(folder)
    run.config.max_length = max_length
    return run.predict(run.task.inputs(texts))


def same_rows(served: list[dict], predicted: list[dict], tolerance: float = 1e-4) -> None:
    """Entity spans, words and tags equal; scores (rounded to 6 digits) within ``tolerance`` (a mixed batch of
    several methods takes the per-row path, a few float32 ulps away from `peftkit predict` per layer)."""
    assert len(served) == len(predicted)
    for got, want in zip(served, predicted):
        assert {k: got[k] for k in ("text", "tokens", "tags")} == {k: want[k] for k in ("text", "tokens", "tags")}
        strip = lambda spans: [{k: v for k, v in s.items() if k != "score"} for s in spans]  # noqa: E731
        assert strip(got["entities"]) == strip(want["entities"])
        for a, b in zip(got["entities"], want["entities"]):
            assert abs(a["score"] - b["score"]) <= tolerance, (a, b)
