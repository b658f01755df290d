"""Training options that change what a run does: max_steps, early stopping, metric_for_best_model,
keep_checkpoints, eval_steps, test_file and text_pair_column, each checked on the behaviour it promises."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit.cli import main
from peftkit.train.run import Run
from peftkit.train.trainer import Trainer

from workflow_helpers import (WORDS, Probe, dev_history, intent_rows, read_texts, tiny_model_dir, train_history,
                              write_csv)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    return {"model": tiny_model_dir(root), "train": write_csv(root / "train.csv", intent_rows(48, seed=1)),
            "dev": write_csv(root / "dev.csv", intent_rows(12, seed=2)),
            "test": write_csv(root / "test.csv", intent_rows(9, seed=3)), "root": root}


def args(files, out, *extra):  # 48 examples / batch 8: 6 optimizer steps per epoch
    return ["train", "--model", str(files["model"]), "--train_file", str(files["train"]), "--dev_file", str(files["dev"]),
            "--output_dir", str(out), "--batch_size", "8", "--quiet", "true", "--max_length", "16",
            "--pooling", "mean", "--learning_rate", "1e-2", "--lora.r", "4", *extra]


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def script_dev_metrics(monkeypatch, rows: list[dict]) -> None:
    """Dev evaluations inside the training loop return these metrics in turn (the final report is left real),
    so that improvement, ties and regressions happen exactly where a test wants them."""
    evaluate, finish, queue = Trainer.evaluate, Trainer._finish, list(rows)

    def scripted(trainer, split):
        result = evaluate(trainer, split)
        if split == "dev" and not getattr(trainer, "_finishing", False):
            assert queue, "more evaluations than scripted"
            result.update(queue.pop(0))
        return result

    def finishing(trainer):
        trainer._finishing = True
        return finish(trainer)

    monkeypatch.setattr(Trainer, "evaluate", scripted)
    monkeypatch.setattr(Trainer, "_finish", finishing)


def assert_saved_model_is(out: Path, snapshot, dev: Path) -> None:
    torch.testing.assert_close(Run(out).probabilities(read_texts(dev)), snapshot.probabilities, atol=1e-5, rtol=1e-4)


def test_max_steps_counts_optimizer_steps_and_overrides_epochs(files, tmp_path):
    out = tmp_path / "run"
    # batch 4 x 2 accumulated: 12 micro-batches, 6 optimizer steps per epoch; 9 steps end half-way into epoch 2
    assert main(args(files, out, "--max_steps", "9", "--epochs", "5", "--eval_strategy", "no", "--batch_size", "4",
                     "--gradient_accumulation_steps", "2")) == 0
    report = report_of(out)
    history = train_history(report)
    assert report["steps"] == 9 and [h["step"] for h in history] == list(range(1, 10))
    assert history[-1]["epoch"] == pytest.approx(1.5)
    # the schedule runs over 9 steps, not over 5 epochs: the linear decay reaches 0 at the last step
    assert history[-1]["learning_rate"] == 0 and history[-2]["learning_rate"] > 0
    assert [h["step"] for h in dev_history(report)] == [9]


def test_early_stopping_stops_at_the_evaluation_that_exhausts_the_patience(files, tmp_path, monkeypatch):
    probe = Probe(monkeypatch)
    # best at eval 2; eval 4 only ties it (not an improvement); the patience of 3 runs out at eval 5
    accuracies = [0.3, 0.5, 0.4, 0.5, 0.45] + [0.9] * 7
    script_dev_metrics(monkeypatch, [{"accuracy": a} for a in accuracies])
    out = tmp_path / "run"
    assert main(args(files, out, "--max_steps", "12", "--eval_strategy", "steps", "--eval_steps", "1",
                     "--early_stopping_patience", "3")) == 0
    report = report_of(out)
    assert report["steps"] == 5 and len(train_history(report)) == 5
    assert [h["dev_accuracy"] for h in dev_history(report)] == accuracies[:5]
    assert report["best_step"] == 2 and [s.step for s in probe.best] == [1, 2]
    assert_saved_model_is(out, probe.best[-1], files["dev"])


@pytest.mark.parametrize("metric,best_step", [("accuracy", 1), ("macro_f1", 2), ("loss", 3)])
def test_the_best_model_is_picked_by_the_named_metric(files, tmp_path, monkeypatch, metric, best_step):
    probe = Probe(monkeypatch)
    script_dev_metrics(monkeypatch, [  # each metric is best at another evaluation
        {"accuracy": 0.9, "macro_f1": 0.1, "loss": 5.0},
        {"accuracy": 0.1, "macro_f1": 0.9, "loss": 5.0},
        {"accuracy": 0.1, "macro_f1": 0.1, "loss": 0.5},
        {"accuracy": 0.2, "macro_f1": 0.2, "loss": 4.0},
    ])
    out = tmp_path / "run"
    assert main(args(files, out, "--max_steps", "4", "--eval_strategy", "steps", "--eval_steps", "1",
                     "--metric_for_best_model", metric)) == 0
    report = report_of(out)
    assert report["metric_for_best_model"] == metric and report["best_step"] == best_step
    assert probe.best[-1].step == best_step
    assert_saved_model_is(out, probe.best[-1], files["dev"])  # the run's adapter is the model of that step
    final = load_file(str(out / "checkpoints" / "step-000000004" / "tensors.safetensors"))
    assert any(not torch.equal(final[f"param.{n}"], v) for n, v in probe.best[-1].state.items())  # not the last step


def test_keep_checkpoints_keeps_exactly_the_last_n(files, tmp_path, monkeypatch):
    probe = Probe(monkeypatch)
    out = tmp_path / "run"
    assert main(args(files, out, "--max_steps", "7", "--save_steps", "1", "--keep_checkpoints", "3",
                     "--eval_strategy", "no")) == 0
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000000005", "step-000000006", "step-000000007"]
    for step in (5, 6, 7):
        assert json.loads((root / f"step-{step:09d}" / "state.json").read_text())["step"] == step
    # the last checkpoint holds the weights the trainer had in memory at that step
    final = probe.best[-1]
    assert final.step == 7
    tensors = load_file(str(root / "step-000000007" / "tensors.safetensors"))
    for name, value in final.state.items():
        assert torch.equal(tensors[f"param.{name}"], value), name


def test_eval_steps_evaluates_every_n_steps_and_at_the_end(files, tmp_path):
    out = tmp_path / "run"
    assert main(args(files, out, "--max_steps", "10", "--eval_strategy", "steps", "--eval_steps", "4")) == 0
    report = report_of(out)
    assert [h["step"] for h in dev_history(report)] == [4, 8, 10]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000000008", "step-000000010"]


def test_test_file_is_evaluated_with_the_best_model_and_reported(files, tmp_path, monkeypatch):
    probe = Probe(monkeypatch)
    out = tmp_path / "run"
    assert main(args(files, out, "--epochs", "2", "--test_file", str(files["test"]))) == 0
    report = report_of(out)
    assert "test" in report and (out / "plots" / "confusion_test.png").exists()
    assert sum(map(sum, report["test"]["confusion_matrix"])) == 9  # the 9 test rows, not the 12 dev rows
    best = probe.best[-1]
    targets = probe.trainer.targets["test"]
    predicted = best.test_probabilities.argmax(-1).tolist()
    assert report["test"]["accuracy"] == pytest.approx(sum(p == t for p, t in zip(predicted, targets)) / 9)
    loss = torch.nn.functional.nll_loss(best.test_probabilities.log(), torch.tensor(targets)).item()
    assert report["test"]["loss"] == pytest.approx(loss, abs=1e-5)


def _pair_rows(count: int, seed: int) -> list[tuple[str, str, str]]:
    """(premise, hypothesis, label): 'same' when both speak of one topic. Only the pair decides the label."""
    rng, topics = random.Random(seed), list(WORDS)
    rows = []
    for i in range(count):
        first = topics[i % 3]
        second = first if i % 2 == 0 else topics[(i + 1 + rng.randrange(2)) % 3]
        rows.append((" ".join(rng.sample(WORDS[first], 3)), " ".join(rng.sample(WORDS[second], 3)),
                     "same" if first == second else "different"))
    return rows


def _write_pairs(path: Path, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["premise", "hypothesis", "label"])
        writer.writerows(rows)
    return path


def test_text_pair_column_is_read_as_sentence_pairs(files, tmp_path, monkeypatch):
    probe = Probe(monkeypatch)
    train = _write_pairs(tmp_path / "train.csv", _pair_rows(32, seed=1))
    dev_rows = _pair_rows(10, seed=2)
    dev = _write_pairs(tmp_path / "dev.csv", dev_rows)
    out = tmp_path / "run"
    assert main(["train", "--model", str(files["model"]), "--train_file", str(train), "--dev_file", str(dev),
                 "--output_dir", str(out), "--epochs", "1", "--batch_size", "8", "--quiet", "true", "--max_length", "32",
                 "--pooling", "mean", "--text_column", "premise", "--text_pair_column", "hypothesis"]) == 0
    trainer = probe.trainer
    premise, hypothesis = dev_rows[0][0], dev_rows[0][1]
    expected = trainer.tokenizer(premise, hypothesis, truncation=True, max_length=32)
    feature = trainer.features["dev"][0]
    assert feature["input_ids"] == expected["input_ids"]  # [CLS] premise [SEP] hypothesis [SEP]
    assert feature["input_ids"].count(trainer.tokenizer.sep_token_id) == 2 and 1 in feature["token_type_ids"]
    # the run folder reads the pairs back the same way, and the second text matters
    run = Run(out)
    texts, pairs = [r[0] for r in dev_rows], [r[1] for r in dev_rows]
    torch.testing.assert_close(run.probabilities(texts, pairs), probe.best[-1].probabilities, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(run.probabilities(texts), probe.best[-1].probabilities, atol=1e-4)
    assert run.evaluate(dev)["loss"] == pytest.approx(report_of(out)["dev"]["loss"], abs=1e-5)
