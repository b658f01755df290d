"""A tiny search setup: the 2-layer BERT of the workflow tests, small keyword-intent files, and a base config whose
trials train in a few seconds (48 rows, batches of 16, an evaluation every 3 steps)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from workflow_helpers import intent_rows, tiny_model_dir, write_csv

ROOT = Path(__file__).resolve().parents[1]


def search_setup(root: Path, space: dict, **config) -> tuple[Path, Path]:
    """(config file, space file) under ``root``; the search writes to root/out."""
    model = tiny_model_dir(root)
    values = {"model": str(model), "train_file": str(write_csv(root / "train.csv", intent_rows(48, 1))),
              "dev_file": str(write_csv(root / "dev.csv", intent_rows(30, 2))), "method": "lora", "pooling": "mean",
              "epochs": 3, "batch_size": 16, "max_length": 16, "eval_strategy": "steps", "eval_steps": 3,
              "num_threads": 1, "output_dir": str(root / "out"), **config}
    config_file = root / "base.yaml"
    config_file.write_text(yaml.safe_dump(values), encoding="utf-8")
    space_file = root / "space.yaml"
    space_file.write_text(yaml.safe_dump(space, sort_keys=False), encoding="utf-8")
    return config_file, space_file


def search_command(config: Path, space: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "peftkit.cli", "search", str(config), "--space", str(space), *args]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")


def run_search(config: Path, space: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(search_command(config, space, *args), capture_output=True, text=True, env=env(),
                          timeout=timeout)


def load_study(root: Path, name: str = "search"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'out' / 'study.db'}")


def processes_running(fragment: str) -> list[int]:
    """Pids whose command line contains ``fragment`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if fragment in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found
