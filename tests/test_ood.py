"""Out-of-scope rejection (``ood:``): scores against hand-computed values, calibration on constructed score sets,
metrics, and the CLI on a tiny BERT: train -> labels.json rule -> predict/eval/server answer the out-of-scope label
exactly when the score is below the threshold; bad settings exit 2; a run without ``ood`` is unchanged."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from peftkit.cli import main
from peftkit.tasks import ood
from workflow_helpers import intent_rows, tiny_model_dir, write_csv

OOS_ROWS = [("what is the weather like today", "out_of_scope"), ("sing me a song please", "out_of_scope"),
            ("who won the football match", "chitchat")]  # 'chitchat': unseen in training, so out of scope too


# ------------------------------------------------------------------------------------------------ scores
def test_scores_equal_hand_computed_values():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 3.0, 0.5]])
    e = math.e
    msp = [e**2 / (e**2 + e + 1), 1 / 3, e**3 / (e**-1 + e**3 + e**0.5)]
    energy = [math.log(e**2 + e + 1), math.log(3), math.log(e**-1 + e**3 + e**0.5)]
    energy_t2 = [2 * math.log(e**1 + e**0.5 + 1), 2 * math.log(3), 2 * math.log(e**-0.5 + e**1.5 + e**0.25)]
    assert ood.score(logits, "msp").tolist() == pytest.approx(msp, abs=1e-6)
    assert ood.score(logits, "energy").tolist() == pytest.approx(energy, abs=1e-6)  # −E(x) = logsumexp at T=1
    assert ood.score(logits, "energy", temperature=2.0).tolist() == pytest.approx(energy_t2, abs=1e-6)
    assert ood.score(logits, "maxlogit").tolist() == [2.0, 0.0, 3.0]


# ------------------------------------------------------------------------------------------- calibration
def test_coverage_calibration_keeps_the_target_share_of_in_scope_rows():
    inside = [i / 100 for i in range(1, 101)]  # 0.01 ... 1.00
    assert ood.coverage_threshold(inside, 0.9) == pytest.approx(0.11)  # keeps 0.11..1.00: exactly 90
    assert sum(s >= ood.coverage_threshold(inside, 0.9) for s in inside) == 90
    assert ood.coverage_threshold(inside, 0.905) == pytest.approx(0.10)  # 90.5 rows: 91 kept, never fewer
    assert ood.coverage_threshold(inside, 1.0) == pytest.approx(0.01)
    rule = ood.OodRule("maxlogit")
    logits = torch.tensor([[s, 0.0] for s in inside] + [[0.5, 0.0]])
    mask = torch.tensor([True] * 100 + [False])
    result = ood.calibrate(rule, logits, mask, {"coverage": 0.8})
    assert rule.threshold == pytest.approx(0.21) and result["coverage"] == pytest.approx(0.8)


def test_precision_calibration_is_the_lowest_threshold_reaching_the_target():
    inside = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    outside = [0.75, 0.45, 0.35, 0.25, 0.1]
    # accepting >= 0.5: 5 in scope, 1 out: 0.833; >= 0.4: 6 of 8 = 0.75; >= 0.3: 7 of 10 = 0.7
    threshold, reached = ood.precision_threshold(inside, outside, 0.75)
    assert (threshold, reached) == (0.4, True)
    rule = ood.OodRule("maxlogit")
    logits = torch.tensor([[s, -5.0] for s in inside + outside])
    mask = torch.tensor([True] * len(inside) + [False] * len(outside))
    result = ood.calibrate(rule, logits, mask, {"in_scope_precision": 0.8})
    assert rule.threshold == pytest.approx(0.5) and result["in_scope_precision"] >= 0.8 and result["reached"]
    # lowering the threshold to the next score would break the target
    assert ood.precision_threshold(inside, outside, 0.84) == (0.8, True)  # 0.8: 2 of 2; 0.75 would give 2 of 3
    # not reachable: the best precision, flagged
    assert ood.precision_threshold([0.1], [0.9, 0.8], 0.99) == (0.1, False)


def test_metrics_of_a_file_with_out_of_scope_rows():
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0], [0.2, 0.0], [0.0, 0.1], [2.5, 0.0]])
    targets = [0, 1, 1, 0, -1, -1]  # row 2: wrong; row 3: right but rejected; row 4 rejected oos; row 5 accepted oos
    rule = ood.OodRule("maxlogit", threshold=1.0)
    result = ood.metrics(logits, targets, rule)
    assert result["in_scope_accuracy"] == pytest.approx(2 / 4)
    assert result["closed_set_accuracy"] == pytest.approx(3 / 4)
    assert result["coverage"] == pytest.approx(3 / 4)
    assert result["out_of_scope_recall"] == pytest.approx(1 / 2)
    assert result["out_of_scope_precision"] == pytest.approx(1 / 2)  # rejected: rows 3 (in scope) and 4
    assert result["overall_accuracy"] == pytest.approx(3 / 6)
    from sklearn.metrics import roc_auc_score

    assert result["auroc"] == pytest.approx(roc_auc_score([1, 1, 1, 1, 0, 0], [3.0, 3.0, 3.0, 0.2, 0.1, 2.5]))


# ------------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ood")
    test_rows = intent_rows(12, 1) + OOS_ROWS
    calib_rows = intent_rows(12, 2) + OOS_ROWS[:2]
    return {"root": root, "model": tiny_model_dir(root), "train": write_csv(root / "train.csv", intent_rows(60, 0)),
            "test": write_csv(root / "test.csv", test_rows), "calib": write_csv(root / "calib.csv", calib_rows),
            "test_rows": test_rows}


def _args(data, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(data["model"]), "--train_file", str(data["train"]), "--output_dir", str(out),
            "--epochs", "2", "--batch_size", "16", "--max_length", "32", "--pooling", "mean", "--quiet", "true",
            "--seed", "3", *extra]


@pytest.fixture(scope="module")
def ood_run(data):
    out = data["root"] / "ood-run"
    assert main(_args(data, out, "--test_file", str(data["test"]), "--ood.method", "energy",
                      "--ood.coverage", "0.9")) == 0
    return out


def test_training_calibrates_and_reports(ood_run, data):
    labels = json.loads((ood_run / "labels.json").read_text())
    assert labels["labels"] == ["card", "hours", "refund"]
    rule = labels["ood"]
    assert rule["method"] == "energy" and rule["label"] == "out_of_scope" and isinstance(rule["threshold"], float)
    report = json.loads((ood_run / "report.json").read_text())
    assert report["calibration"]["target"] == "coverage" and report["calibration"]["coverage"] >= 0.9
    assert report["calibration"]["threshold"] == rule["threshold"]
    test = report["test"]["ood"]
    assert (test["in_scope_rows"], test["out_of_scope_rows"]) == (12, 3)
    assert set(test) >= {"in_scope_accuracy", "out_of_scope_recall", "out_of_scope_precision", "auroc", "threshold"}
    assert test["threshold"] == rule["threshold"]
    assert report["test"]["confusion_matrix"] and sum(map(sum, report["test"]["confusion_matrix"])) == 12


def test_predict_and_eval_answer_the_label_exactly_below_the_threshold(ood_run, data, tmp_path, capsys):
    from peftkit.train.run import Run

    run_dir = tmp_path / "run"
    shutil.copytree(ood_run, run_dir)
    texts = [text for text, _ in data["test_rows"]]
    scores = ood.score(Run(run_dir).logits(Run(run_dir).task.inputs(texts)), "energy")
    middle = float(scores.sort().values[len(texts) // 2])  # half the texts fall below it
    labels = json.loads((run_dir / "labels.json").read_text())
    labels["ood"]["threshold"] = middle
    (run_dir / "labels.json").write_text(json.dumps(labels))
    capsys.readouterr()
    assert main(["predict", "--run", str(run_dir), *[a for t in texts for a in ("--text", t)]]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == len(texts)
    for row, value in zip(rows, scores.tolist()):
        assert row["ood_score"] == pytest.approx(value, abs=1e-5)
        rejected = value < middle
        assert (row["label"] == "out_of_scope") == rejected
        if not rejected:
            assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
    assert sum(row["label"] == "out_of_scope" for row in rows) == len(texts) // 2
    # a CSV of predictions carries the score column
    assert main(["predict", "--run", str(run_dir), "--data", str(data["test"]), "--out", str(tmp_path / "p.csv")]) == 0
    assert "ood_score" in (tmp_path / "p.csv").read_text().splitlines()[0].split(",")
    # eval: the metrics at that threshold, printed
    capsys.readouterr()
    assert main(["eval", "--run", str(run_dir), "--data", str(data["test"])]) == 0
    printed = capsys.readouterr().out
    assert f"threshold {middle:.4f}" in printed and "OOS recall" in printed and "AUROC" in printed
    result = Run(run_dir).evaluate(data["test"])["ood"]
    inside = torch.tensor([label in ("card", "hours", "refund") for _, label in data["test_rows"]])
    rejected = scores < middle
    assert result["out_of_scope_recall"] == pytest.approx(float(rejected[~inside].double().mean()))
    assert result["coverage"] == pytest.approx(float((~rejected[inside]).double().mean()))


def test_the_server_answers_the_label_with_the_score(ood_run, data, tmp_path):
    from fastapi.testclient import TestClient

    from peftkit.serve.app import create_app
    from peftkit.serve.model import ServedModel
    from peftkit.train.run import Run

    adapters = tmp_path / "adapters"
    shutil.copytree(ood_run, adapters / "intents")
    texts = [text for text, _ in data["test_rows"]]
    expected = Run(adapters / "intents").predict(Run(adapters / "intents").task.inputs(texts))
    served = ServedModel(data["model"], adapters, pooling="mean", max_length=32)
    assert not served.discover()
    with TestClient(create_app(served)) as client:
        answer = client.post("/v1/classify", json={"adapter": "intents", "texts": texts})
        assert answer.status_code == 200, answer.text
        threshold = json.loads((ood_run / "labels.json").read_text())["ood"]["threshold"]
        for got, want in zip(answer.json()["predictions"], expected):
            assert got["label"] == want["label"] and got["threshold"] == threshold
            assert got["ood_score"] == pytest.approx(want["ood_score"], abs=1e-5)
            assert (got["label"] == "out_of_scope") == (got["ood_score"] < threshold)


def test_precision_target_calibrates_on_the_ood_dev_file(data):
    out = data["root"] / "precision-run"
    assert main(_args(data, out, "--ood.in_scope_precision", "0.8", "--ood_dev_file", str(data["calib"]))) == 0
    calibration = json.loads((out / "report.json").read_text())["calibration"]
    assert calibration["file"] == str(data["calib"]) and calibration["out_of_scope_rows"] == 2
    assert calibration["in_scope_rows"] == 12
    assert calibration["in_scope_precision"] >= 0.8 or not calibration["reached"]


@pytest.mark.parametrize("extra, message", [
    (["--ood.method", "entropy"], "ood.method"),
    (["--ood.coverage", "0.9", "--ood.threshold", "0.5"], "give one target, not coverage and threshold"),
    (["--ood.coverage", "1.5"], "ood.coverage"),
    (["--ood.in_scope_precision", "0.9"], "ood.in_scope_precision needs out-of-scope examples"),
    (["--ood_dev_file", "x.csv"], "ood_dev_file: set ood"),
    (["--ood.cover", "0.9"], "unknown config key 'ood.cover'"),
])
def test_bad_ood_settings_exit_2(data, tmp_path, capsys, extra, message):
    assert main(_args(data, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_bad_ood_data_exit_2(data, tmp_path, capsys):
    with_oos = write_csv(tmp_path / "train_oos.csv", intent_rows(30, 0) + OOS_ROWS[:1])
    assert main(_args(data, tmp_path / "a", "--ood.coverage", "0.9", "--train_file", str(with_oos))) == 2
    assert "rows labelled 'out_of_scope', the out-of-scope label" in capsys.readouterr().err
    no_oos = write_csv(tmp_path / "calib.csv", intent_rows(12, 2))
    assert main(_args(data, tmp_path / "b", "--ood.in_scope_precision", "0.9", "--ood_dev_file", str(no_oos))) == 2
    assert f"{no_oos}: no out-of-scope rows" in capsys.readouterr().err


def test_a_run_without_ood_is_unchanged(data, tmp_path, capsys):
    out = tmp_path / "plain"
    assert main(_args(data, out, "--test_file", str(write_csv(tmp_path / "t.csv", intent_rows(9, 1))))) == 0
    assert json.loads((out / "labels.json").read_text()) == {"labels": ["card", "hours", "refund"]}
    report = json.loads((out / "report.json").read_text())
    assert "calibration" not in report and "ood" not in report["test"]
    capsys.readouterr()
    assert main(["predict", "--run", str(out), "--text", "my card was stolen"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(row) == {"text", "label", "probability", "probabilities"}
    # a label unseen in training stays an error without ood
    assert main(["eval", "--run", str(out), "--data", str(data["test"])]) == 2
    assert "labels not seen in the training data" in capsys.readouterr().err
