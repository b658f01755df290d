"""`peftkit merge` folders: read back by predict/eval/serve, and by plain transformers where a class exists."""

from __future__ import annotations

import json

import pytest
import torch

from peftkit.cli import main

from workflow_helpers import intent_rows, tiny_model_dir, write_csv

POOLINGS = ["pooler", "cls", "mean"]
TEXTS = ["my card was stolen", "when do you open on sunday please", "refund", "i need my money back for the broken item"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One short LoRA run per pooling (trained through the CLI), each with its merged folder."""
    root = tmp_path_factory.mktemp("merged")
    model = tiny_model_dir(root)
    train = write_csv(root / "train.csv", intent_rows(48, seed=1))
    dev = write_csv(root / "dev.csv", intent_rows(12, seed=2))
    out = {"dev": dev}
    for pooling in POOLINGS:
        run = root / f"run-{pooling}"
        assert main(["train", "--model", str(model), "--train_file", str(train), "--dev_file", str(dev),
                     "--output_dir", str(run), "--epochs", "1", "--batch_size", "8", "--quiet", "true",
                     "--max_length", "16", "--pooling", pooling, "--lora.r", "4", "--learning_rate", "2e-2"]) == 0
        assert main(["merge", "--run", str(run), "--out", str(root / f"merged-{pooling}")]) == 0
        out[pooling] = (run, root / f"merged-{pooling}")
    return out


def predict(capsys, folder) -> list[dict]:
    capsys.readouterr()
    assert main(["predict", "--run", str(folder), *[a for t in TEXTS for a in ("--text", t)]]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]


@pytest.mark.parametrize("pooling", POOLINGS)
def test_predict_and_eval_read_a_merged_folder_like_the_run(runs, pooling, capsys):
    from peftkit.train.run import Run

    run, merged = runs[pooling]
    ours, theirs = predict(capsys, run), predict(capsys, merged)
    assert [r["label"] for r in theirs] == [r["label"] for r in ours]
    for a, b in zip(ours, theirs):
        assert list(a["probabilities"]) == list(b["probabilities"]) == ["card", "hours", "refund"]
        torch.testing.assert_close(torch.tensor(list(b["probabilities"].values())),
                                   torch.tensor(list(a["probabilities"].values())), atol=1e-5, rtol=0)
    # unrounded: the merged folder against the unmerged adapter model in memory
    torch.testing.assert_close(Run(merged).probabilities(TEXTS), Run(run).probabilities(TEXTS), atol=1e-5, rtol=0)

    assert main(["eval", "--run", str(run), "--data", str(runs["dev"])]) == 0
    expected = capsys.readouterr().out.splitlines()[-1].split("loss")[0]
    assert main(["eval", "--run", str(merged), "--data", str(runs["dev"])]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split("loss")[0] == expected
    assert main(["info", str(merged)]) == 0
    assert str(run) in capsys.readouterr().out


@pytest.mark.parametrize("pooling", POOLINGS)
def test_the_folder_says_what_it_holds(runs, pooling):
    _, merged = runs[pooling]
    marker = json.loads((merged / "peftkit_head.json").read_text())
    readme = (merged / "README.md").read_text()
    assert marker["pooling"] == pooling and marker["labels"] == ["card", "hours", "refund"] and marker["max_length"] == 16
    config = json.loads((merged / "config.json").read_text())
    assert config["id2label"] == {"0": "card", "1": "hours", "2": "refund"}
    if pooling == "pooler":
        assert config["architectures"] == ["BertForSequenceClassification"]
        assert not (merged / "classifier.safetensors").exists() and not (merged / "1_Pooling").exists()
        assert "AutoModelForSequenceClassification.from_pretrained" in readme
    else:
        assert config["architectures"] == ["BertModel"]
        assert json.loads((merged / "1_Pooling" / "config.json").read_text())[f"pooling_mode_{pooling}_token" + (
            "s" if pooling == "mean" else "")] is True
        assert "classifier.safetensors" in readme and "weight` [3, 32]" in readme and "1_Pooling/config.json" in readme


def test_pooler_folder_loads_with_plain_transformers(runs):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftkit.train.run import Run

    run, merged = runs["pooler"]
    expected = Run(run).probabilities(TEXTS)
    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    batch = AutoTokenizer.from_pretrained(merged)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(model(**batch).logits, -1), expected, atol=1e-5, rtol=0)
    assert model.config.id2label == {0: "card", 1: "hours", 2: "refund"}


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pooled_folder_recipe_from_its_readme(runs, pooling):
    """AutoModel + the pooling named in 1_Pooling/config.json + classifier.safetensors: the run's probabilities."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from peftkit.train.run import Run

    run, merged = runs[pooling]
    expected = Run(run).probabilities(TEXTS)
    encoder = AutoModel.from_pretrained(merged).eval()
    head = load_file(str(merged / "classifier.safetensors"))
    mode = json.loads((merged / "1_Pooling" / "config.json").read_text())
    batch = AutoTokenizer.from_pretrained(merged)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1) if mode["pooling_mode_mean_tokens"] else hidden[:, 0]
        probs = torch.softmax(pooled @ head["weight"].T + head["bias"], -1)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_serve_uses_a_merged_folder_as_base(runs, pooling, tmp_path):
    from peftkit.serve.model import ServedModel
    from peftkit.train.run import Run

    run, merged = runs[pooling]
    (tmp_path / "adapters").mkdir()
    served = ServedModel(merged, tmp_path / "adapters")  # pooling auto: read from the folder
    assert served.pooling == pooling
    assert served.labels_of("base") == ["card", "hours", "refund"]
    got = torch.stack(served.infer([("base", text, None) for text in TEXTS]))
    torch.testing.assert_close(got, Run(run).probabilities(TEXTS), atol=1e-5, rtol=0)


def test_merging_a_merged_folder_or_reading_a_stranger_is_refused(runs, tmp_path, capsys):
    _, merged = runs["mean"]
    assert main(["merge", "--run", str(merged), "--out", str(tmp_path / "again")]) == 2
    assert "already a merged model" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
    assert main(["predict", "--run", str(tmp_path), "--text", "hello"]) == 2
    assert "nor a folder written by `peftkit merge`" in capsys.readouterr().err
