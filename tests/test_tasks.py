"""Tasks are entries: a toy task registered from this file is trained, evaluated, predicted and served by the
unchanged trainer, CLI and server, which reach everything task-specific through it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from peftkit.cli import main
from peftkit.tasks import available_tasks, get_task, register_task
from peftkit.tasks import data as D
from peftkit.tasks.classification import Classification

from workflow_helpers import intent_rows, tiny_model_dir


class PipeTask(Classification):
    """Classification from another file format: ``label | text`` lines in a .txt file, the vocabulary in
    ``tags.json``, predictions as ``input, tag, score`` rows and a summary of its own."""

    name = "pipe-toy"
    vocabulary_file = "tags.json"
    column_keys = ()
    curve_metrics = ("accuracy",)

    def read(self, path, config, labelled=True):
        path = Path(path)
        examples = []
        for line, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if labelled:
                if " | " not in raw:
                    raise D.DataError(f"{path}, line {line}: expected 'label | text'")
                label, text = raw.split(" | ", 1)
            else:
                label, text = None, raw.split(" | ", 1)[-1]
            examples.append(D.Example(text, None, label, line))
        return examples

    def vocabulary_to_dict(self, vocabulary):
        return {"tags": vocabulary.names}

    def vocabulary_from_dict(self, data):
        return D.LabelMap(data["tags"])

    def summary(self, result):
        return f"pipe-accuracy {result['accuracy']:.4f}"

    def prediction_rows(self, examples, outputs, vocabulary):
        return [{"input": e.text, "tag": vocabulary.names[int(o.argmax())], "score": round(float(o.max()), 3)}
                for e, o in zip(examples, outputs)]

    def write_predictions(self, path, rows, vocabulary):
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["input", "tag", "score"])
            writer.writeheader()
            writer.writerows(rows)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    register_task(PipeTask())
    root = tmp_path_factory.mktemp("tasks")
    files = {"model": tiny_model_dir(root), "root": root}
    for split, count, seed in (("train", 48, 1), ("dev", 12, 2)):
        files[split] = root / f"{split}.txt"
        files[split].write_text("".join(f"{label} | {text}\n" for text, label in intent_rows(count, seed)))
    return files


@pytest.fixture
def selects_toy(monkeypatch):
    """The CLI arguments that select the toy task: the config key ``task`` where RunConfig has it; before it
    does, the default task (which every run without the key gets)."""
    from peftkit.train.config import RunConfig

    if "task" in RunConfig.model_fields:
        return ["--task", PipeTask.name]
    monkeypatch.setattr("peftkit.tasks.DEFAULT_TASK", PipeTask.name)
    return []


def test_registry_lists_and_refuses(toy):
    from peftkit.config import ConfigError

    assert {"classification", PipeTask.name} <= set(available_tasks())
    assert get_task(PipeTask.name).vocabulary_file == "tags.json"
    with pytest.raises(ConfigError, match="'nope' is not a task; choose one of .*classification"):
        get_task("nope")


def test_a_registered_task_trains_evaluates_and_predicts_through_the_unchanged_workflow(toy, selects_toy, tmp_path,
                                                                                          capsys):
    from peftkit.train.run import Run

    out = tmp_path / "run"
    assert main(["train", "--model", str(toy["model"]), "--train_file", str(toy["train"]), "--dev_file",
                 str(toy["dev"]), "--output_dir", str(out), "--epochs", "2", "--batch_size", "8", "--quiet", "true",
                 "--max_length", "16", "--pooling", "mean", "--lora.r", "4", "--learning_rate", "2e-2",
                 *selects_toy]) == 0
    # the run folder holds the task's vocabulary file, not classification's
    assert json.loads((out / "tags.json").read_text()) == {"tags": ["card", "hours", "refund"]}
    assert not (out / "labels.json").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == ["card", "hours", "refund"]
    assert [set(h) for h in report["history"] if "dev_loss" in h][0] == {"step", "dev_loss", "dev_accuracy"}
    assert "pipe-accuracy" in capsys.readouterr().out  # the trainer printed the task's summary

    run = Run(out)
    assert run.task.name == PipeTask.name
    assert main(["eval", "--run", str(out), "--data", str(toy["dev"])]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("pipe-accuracy ")

    predictions = tmp_path / "predictions.csv"
    assert main(["predict", "--run", str(out), "--data", str(toy["dev"]), "--out", str(predictions)]) == 0
    with open(predictions, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["input", "tag", "score"] and len(rows) == 12
    probabilities = run.outputs(run.read_file(toy["dev"], labelled=False))
    assert [r["tag"] for r in rows] == [run.labels.names[int(i)] for i in probabilities.argmax(-1)]

    # a data error of the task's own format reaches the CLI as bad input (exit 2), naming file and line
    broken = tmp_path / "broken.txt"
    broken.write_text("card | lost my card\nno separator here\n")
    assert main(["eval", "--run", str(out), "--data", str(broken)]) == 2
    assert f"{broken}, line 2: expected 'label | text'" in capsys.readouterr().err


def test_the_server_answers_through_its_task(toy, tmp_path):
    """The server's route, request/response schema and per-row answer are the task's."""
    from fastapi.testclient import TestClient
    from pydantic import BaseModel

    from peftkit.serve.app import create_app
    from peftkit.serve.model import ServedModel
    from peftkit.tasks import ServeSchema
    from peftkit.tasks.schema import Text

    class EchoRequest(BaseModel):
        adapter: Text
        inputs: list[Text]

    class EchoResponse(BaseModel):
        adapter: str
        top: list[str]
        width: int

    class ServedToy(PipeTask):
        name = "served-toy"

        def serve_schema(self):
            return ServeSchema("/v1/echo", EchoRequest, EchoResponse, verb="echo")

        def request_rows(self, request):
            return [(text, None) for text in request.inputs]

        def request_problem(self, request, settings):
            return None

        def serve_row(self, logits, names, inputs, vocabulary=None):
            return logits[:len(names)].float()

        def response(self, adapter, outputs, names, vocabulary=None):
            return EchoResponse(adapter=adapter, top=[names[int(o.argmax())] for o in outputs], width=len(outputs[0]))

    register_task(ServedToy())
    from serve_helpers import make_run

    adapters = tmp_path / "adapters"
    run = make_run(adapters / "intents", toy["model"], ["card", "hours", "refund"], seed=3)
    (run / "labels.json").rename(run / "tags.json")
    (run / "tags.json").write_text(json.dumps({"tags": ["card", "hours", "refund"]}))
    config = run / "config.yaml"
    config.write_text(config.read_text() + "task: served-toy\n")
    served = ServedModel(toy["model"], adapters, task="served-toy", pooling="mean", max_length=32)
    assert not served.discover()
    texts = ["my card was stolen", "open on sunday"]
    with TestClient(create_app(served)) as client:
        answer = client.post("/v1/echo", json={"adapter": "intents", "inputs": texts})
        assert answer.status_code == 200, answer.text
        logits = torch.stack(served.infer([("intents", t, None) for t in texts]))
        assert answer.json() == {"adapter": "intents", "top": [["card", "hours", "refund"][int(i)] for i in
                                                               logits.argmax(-1)], "width": 3}
        assert client.post("/v1/echo", json={"adapter": "intents", "inputs": []}).json() == {
            "error": "nothing to echo: the list is empty"}
        assert client.post("/v1/classify", json={"adapter": "intents", "texts": texts}).status_code == 404
