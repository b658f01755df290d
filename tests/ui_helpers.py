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


PEOPLE, PLACES = ["alice", "bob", "carol"], ["paris", "berlin", "new york"]


def write_conll(path: Path, count: int, seed: int) -> Path:
    """Sentences with a person and a place (IOB2), learnable by the tiny BERT in a few epochs."""
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(count):
            place = rng.choice(PLACES).split()
            words = ["yesterday", rng.choice(PEOPLE), "went", "to", *place, "."]
            tags = ["O", "B-person", "O", "O", "B-location", *["I-location"] * (len(place) - 1), "O"]
            handle.write("".join(f"{w}\t{t}\n" for w, t in zip(words, tags)) + "\n")
    return path


def train_ner_run(root: Path, out: Path) -> Path:
    """A token-classification LoRA run of the tiny BERT (``peftkit train``, in process), evaluated every 4 steps."""
    from peftkit.cli import main

    model = tiny_model_dir(root)
    train, dev = write_conll(root / "train.conll", 48, 0), write_conll(root / "dev.conll", 16, 1)
    assert main(["train", "--task", "token-classification", "--model", str(model), "--train_file", str(train),
                 "--dev_file", str(dev), "--output_dir", str(out), "--epochs", "6", "--batch_size", "8",
                 "--learning_rate", "5e-3", "--max_length", "16", "--eval_strategy", "steps", "--eval_steps", "12",
                 "--num_threads", "1", "--quiet", "true"]) == 0
    return out


def train_causal_run(root: Path, out: Path) -> Path:
    """A causal-lm LoRA run of the tiny chat LLaMA (ChatML tokenizer), with base-vs-adapted example generations."""
    from causal_helpers import chat_rows, tiny_chat_model, write_jsonl
    from peftkit.cli import main

    model = tiny_chat_model(root / "tiny-llama")
    write_jsonl(root / "chat.jsonl", chat_rows(30))
    assert main(["train", "--task", "causal-lm", "--model", str(model), "--train_file", str(root / "chat.jsonl"),
                 "--output_dir", str(out), "--max_steps", "30", "--batch_size", "8", "--learning_rate", "2e-2",
                 "--eval_strategy", "steps", "--eval_steps", "10", "--max_new_tokens", "4", "--eval_generations", "3",
                 "--seed", "1", "--num_threads", "1", "--quiet", "true"]) == 0
    return out
