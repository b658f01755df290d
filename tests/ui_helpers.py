"""Tiny finished runs (the 2-layer BERT of the workflow tests), trained in this process, for the ui and tracking tests."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from workflow_helpers import intent_rows, tiny_model_dir, write_csv


def train_run(root: Path, name: str, runs: str = "runs", exit_code: int = 0, **overrides) -> Path:
    """``peftkit train`` (in process) into ``root/runs/name``; returns the run folder."""
    from peftkit.cli import main

    model = tiny_model_dir(root)
    train = root / "train.csv"
    if not train.exists():
        write_csv(train, intent_rows(48, 1))
        write_csv(root / "dev.csv", intent_rows(30, 2))
    out = root / runs / name
    values = {"model": str(model), "train_file": str(train), "dev_file": str(root / "dev.csv"), "method": "lora",
              "pooling": "mean", "epochs": 2, "batch_size": 16, "max_length": 16, "eval_strategy": "steps",
              "eval_steps": 2, "num_threads": 1, "quiet": True, "output_dir": str(out), **overrides}
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump(values), encoding="utf-8")
    assert main(["train", str(config)]) == exit_code
    return out


def report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text(encoding="utf-8"))
