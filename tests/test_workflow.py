"""peftkit train / eval / predict / merge / info on a tiny model: outputs, errors, methods."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from peftkit.cli import main
from peftkit.config import ConfigError
from peftkit.train.config import load

from workflow_helpers import intent_rows, tiny_model_dir, write_csv


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    return {
        "model": tiny_model_dir(root),
        "train": write_csv(root / "train.csv", intent_rows(60, seed=1)),
        "dev": write_csv(root / "dev.csv", intent_rows(15, seed=2)),
        "root": root,
    }


def train_args(files, out, *extra):
    return ["train", "--model", str(files["model"]), "--train_file", str(files["train"]), "--dev_file",
            str(files["dev"]), "--output_dir", str(out), "--epochs", "2", "--batch_size", "8", "--quiet", "true",
            "--max_length", "16", *extra]


# ------------------------------------------------------------------------------------------------ config
def test_unknown_key_wrong_type_and_combinations_are_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown config key 'learnig_rate'; did you mean 'learning_rate'"):
        load(None, ["--learnig_rate", "3e-4"])
    with pytest.raises(ConfigError, match=r"unknown config key 'lora.rank'.*valid keys: lora.r, "):
        load(None, ["--lora.rank", "4"])
    with pytest.raises(ConfigError, match=r"batch_size: .*integer"):
        load(None, ["--batch_size", "many"])
    with pytest.raises(ConfigError, match=r"lr_scheduler: .*'linear', 'cosine' or 'constant'"):
        load(None, ["--lr_scheduler", "step"])
    with pytest.raises(ConfigError, match=r"lora: settings given, but method is 'head'"):
        load(None, ["--method", "head", "--lora.r", "4"])
    with pytest.raises(ConfigError, match=r"method: 'lorra' is not a training method; choose one of .*lora"):
        load(None, ["--method", "lorra"])
    with pytest.raises(ConfigError, match="early_stopping_patience needs evaluations"):
        load(None, ["--early_stopping_patience", "2", "--eval_strategy", "no"])
    config_file = tmp_path / "c.yaml"
    config_file.write_text("method: lora\nlora:\n  r: 4\nlearning_rate: 0.001\n")
    config = load(config_file, ["--lora.r", "16", "--learning_rate", "3e-4"])
    assert config.lora.r == 16 and config.learning_rate == 3e-4
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_train_help_documents_every_key(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    from peftkit.train.config import RunConfig

    for key in RunConfig.model_fields:
        assert key in text
    assert "lora.r " in text and "lora.target_modules" in text


# -------------------------------------------------------------------------------------------------- runs
def test_lora_run_outputs_eval_predict_merge_info(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(files, out, "--lora.r", "4", "--learning_rate", "2e-2", "--epochs", "6", "--pooling", "mean")) == 0
    printed = capsys.readouterr().out
    assert "precision" in printed and "macro avg" in printed and "trainable parameters" in printed
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "labels.json", "config.yaml",
                 "report.json", "plots/loss.png", "plots/metrics.png", "plots/confusion_dev.png"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert list((out / "checkpoints").glob("step-*"))
    report = json.loads((out / "report.json").read_text())
    assert set(report["dev"]["per_class"]) == {"card", "hours", "refund"}
    assert {"accuracy", "macro_f1", "micro_f1", "weighted_f1", "confusion_matrix"} <= set(report["dev"])
    assert 0 < report["trainable_share"] < 0.5 and report["dev"]["accuracy"] > 0.6
    assert json.loads((out / "labels.json").read_text())["labels"] == ["card", "hours", "refund"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4

    assert main(["eval", "--run", str(out), "--data", str(files["dev"])]) == 0
    assert f"accuracy {report['dev']['accuracy']:.4f}" in capsys.readouterr().out

    assert main(["predict", "--run", str(out), "--text", "my card was stolen", "--text", "branch open hours on sunday"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["label"] for r in rows] == ["card", "hours"]
    assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-4
    assert main(["predict", "--run", str(out), "--data", str(files["dev"]), "--out", str(tmp_path / "p.csv")]) == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 16

    assert main(["merge", "--run", str(out), "--out", str(tmp_path / "merged")]) == 0
    assert main(["info", str(out)]) == 0
    assert "lora" in capsys.readouterr().out

    # the merged model (a plain transformers encoder + the linear head) reproduces the run's probabilities
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from peftkit.train.run import Run

    texts = ["my card was stolen", "refund my money please"]
    expected = Run(out).probabilities(texts)
    merged = tmp_path / "merged"
    assert json.loads((merged / "peftkit_head.json").read_text())["pooling"] == "mean"
    encoder = AutoModel.from_pretrained(merged).eval()
    head = load_file(str(merged / "classifier.safetensors"))
    batch = AutoTokenizer.from_pretrained(merged)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        probs = torch.softmax(pooled @ head["weight"].T + head["bias"], -1)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)


def test_pooler_run_merges_into_a_transformers_classifier_and_loads_in_peft(files, tmp_path):
    """With pooling 'pooler' the run is a plain ...ForSequenceClassification: its adapter is a PEFT adapter."""
    out = tmp_path / "run"
    assert main(train_args(files, out, "--pooling", "pooler", "--epochs", "1")) == 0
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftkit.train.run import Run

    texts = ["my card was stolen", "when do you open"]
    expected = Run(out).probabilities(texts)
    Run(out).merge(tmp_path / "merged")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    batch = AutoTokenizer.from_pretrained(tmp_path / "merged")(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(model(**batch).logits, -1), expected, atol=1e-5, rtol=1e-4)
    assert model.config.id2label == {0: "card", 1: "hours", 2: "refund"}
    import peft  # a test dependency: a missing peft fails here instead of skipping

    base = AutoModelForSequenceClassification.from_pretrained(files["model"], num_labels=3)
    theirs = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(theirs(**batch).logits, -1), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["full", "head"])
def test_full_and_head_methods(files, tmp_path, method):
    out = tmp_path / method
    assert main(train_args(files, out, "--method", method, "--pooling", "mean", "--learning_rate", "1e-2")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method
    if method == "head":
        assert report["trainable_parameters"] == 32 * 3 + 3  # the linear head only
        assert (out / "adapter" / "adapter_config.json").exists()
    else:
        assert report["trainable_share"] == 1.0 and (out / "model" / "model.safetensors").exists()
    from peftkit.train.run import Run

    run = Run(out)
    result = run.evaluate(files["dev"])
    assert result["accuracy"] == pytest.approx(report["dev"]["accuracy"])
    merged = run.merge(tmp_path / f"{method}-merged")
    assert (merged / "classifier.safetensors").exists() and (merged / "peftkit_head.json").exists()


def test_bad_data_exits_2_and_writes_nothing(files, tmp_path, capsys):
    bad_dev = write_csv(tmp_path / "dev.csv", [("a new kind of request", "complaint")])
    out = tmp_path / "never"
    args = train_args(files, out)
    args[args.index("--dev_file") + 1] = str(bad_dev)
    assert main(args) == 2
    assert "labels not seen in the training data: 'complaint' (line 2)" in capsys.readouterr().err
    assert not out.exists()
    assert main(train_args(files, out, "--text_column", "sentence")) == 2
    assert "no column 'sentence'" in capsys.readouterr().err
    assert main(["train", "--model", str(tmp_path / "nowhere"), "--output_dir", str(out)]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not out.exists()


def test_existing_run_is_not_overwritten(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(files, out, "--epochs", "1")) == 0
    assert main(train_args(files, out, "--epochs", "1")) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err


def test_metric_plot_keeps_values_above_one_in_view(tmp_path):
    """A causal-LM run's dev curve is perplexity (> 1): the metrics plot must not clip it to a 0-1 axis."""
    import matplotlib

    matplotlib.use("Agg")
    from unittest import mock

    import matplotlib.axes

    from peftkit.train.metrics import plot_history

    history = [{"step": 8, "dev_loss": 1.5, "dev_perplexity": 4.56}, {"step": 16, "dev_loss": 1.4, "dev_perplexity": 4.17}]
    limits = []
    original = matplotlib.axes.Axes.set_ylim
    with mock.patch.object(matplotlib.axes.Axes, "set_ylim", lambda self, *a, **k: limits.append(a) or original(self, *a, **k)):
        plot_history(history, tmp_path, curves=["perplexity"])
        assert (0, 1) not in limits
        plot_history([{"step": 1, "dev_loss": 1.0, "dev_accuracy": 0.8}], tmp_path, curves=["accuracy"])
        assert (0, 1) in limits
