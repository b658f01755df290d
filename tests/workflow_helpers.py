"""A tiny transformers model folder with a real tokenizer, and small labelled files, for workflow tests."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

WORDS = {
    "card": "card lost stolen block missing wallet freeze".split(),
    "refund": "refund money back return broken item price".split(),
    "hours": "open hours close weekend time sunday branch".split(),
}


def tiny_model_dir(root: Path, dropout: float = 0.0) -> Path:
    """A 2-layer BERT (hidden 32) saved with the packaged MiniLM tokenizer (same vocabulary)."""
    from transformers import BertConfig, BertModel

    from peftkit.tasks.demo import minilm_path

    target = root / "tiny-bert"
    if (target / "config.json").exists():
        return target
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        max_position_embeddings=128)
    BertModel(config).save_pretrained(target)
    source = minilm_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, target / name)
    return target


def intent_rows(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = list(WORDS)[i % len(WORDS)]
        words = rng.sample(WORDS[label], 3) + rng.sample(["please", "my", "the", "i", "need", "help", "now"], 2)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------------------------ in-process training
@dataclass
class Snapshot:
    """The in-memory model at the moment the trainer saved it as the best model."""

    step: int
    probabilities: torch.Tensor  # dev rows in file order, computed by the trainer itself
    state: dict[str, torch.Tensor]  # trainable parameters (copies)
    model: torch.nn.Module  # the training model itself (not a copy), to inspect its modules
    test_probabilities: torch.Tensor | None = None  # test rows, when the run has a test file


class Probe:
    """Runs ``peftkit train`` in this process (through ``cli.main``) and records the model the trainer held in
    memory each time it saved the best model, so that a test can compare the files with what was trained
    rather than with another reload of the same files."""

    def __init__(self, monkeypatch) -> None:
        from peftkit.train.trainer import Trainer

        self.trainers: list = []
        self.best: list[Snapshot] = []
        probe, save_model, train = self, Trainer._save_model, Trainer.train

        def recording_save(trainer, directory):
            if Path(directory).name == "best":
                probe.best.append(probe.snapshot(trainer))
            return save_model(trainer, directory)

        def recording_train(trainer):
            probe.trainers.append(trainer)
            return train(trainer)

        monkeypatch.setattr(Trainer, "_save_model", recording_save)
        monkeypatch.setattr(Trainer, "train", recording_train)

    @staticmethod
    def snapshot(trainer) -> Snapshot:
        logits, _ = trainer.predict("dev")
        test = torch.softmax(trainer.predict("test")[0], -1) if trainer.features["test"] else None
        state = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        return Snapshot(trainer.state["step"], torch.softmax(logits, -1), state, trainer.model, test)

    @property
    def trainer(self):
        assert len(self.trainers) == 1, "expected one training run"
        return self.trainers[0]


def read_texts(path: Path, column: str = "text") -> list[str]:
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        return [row[column] for row in csv.DictReader(handle)]


def train_history(report: dict) -> list[dict]:
    return [h for h in report["history"] if "train_loss" in h]


def dev_history(report: dict) -> list[dict]:
    return [h for h in report["history"] if "dev_loss" in h]
