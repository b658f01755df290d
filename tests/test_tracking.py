"""report_to: MLflow gets the params, every scalar per step, the report, the plots and the adapter folder; live.json
follows a run for `peftkit ui`."""

from __future__ import annotations

import json

import pytest

from ui_helpers import report, train_run



def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_mlflow_default_store_in_the_run_folder_holds_params_steps_and_artifacts(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = train_run(tmp_path, "tracked", report_to=["tensorboard", "mlflow"], lora={"r": 4})
    stored = report(run)
    assert (run / "mlflow.db").is_file() and any((run / "tensorboard").iterdir())
    client = _client(f"sqlite:///{run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("peftkit")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED"
    assert found.data.params["method"] == "lora" and found.data.params["lora.r"] == "4"
    assert found.data.params["output_dir"] == str(run)
    # per step: exactly the history's train losses and dev evaluations
    losses = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "train/loss")}
    assert losses == pytest.approx({h["step"]: h["train_loss"] for h in stored["history"] if "train_loss" in h})
    dev = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "dev/accuracy")}
    assert dev == pytest.approx({h["step"]: h["dev_accuracy"] for h in stored["history"] if "dev_accuracy" in h})
    # artifacts: the report, the plots and the adapter folder, byte for byte
    names = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"report.json", "plots", "adapter"} <= names
    local = client.download_artifacts(found.info.run_id, "", str(tmp_path / "download"))
    from pathlib import Path

    local = Path(local)
    assert json.loads((local / "report.json").read_text()) == stored
    assert (local / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert {p.name for p in (local / "plots").iterdir()} == {p.name for p in (run / "plots").iterdir()}


def test_mlflow_tracking_uri_from_the_environment_and_no_tensorboard(tmp_path, monkeypatch):
    store = tmp_path / "shared.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.chdir(tmp_path)  # MLflow's own default for the artifacts of such a store: ./mlruns
    run = train_run(tmp_path, "elsewhere", report_to="mlflow")
    assert store.is_file() and not (run / "mlflow.db").exists()
    assert not (run / "tensorboard").exists()  # report_to without tensorboard writes no events
    client = _client(f"sqlite:///{store}")
    (found,) = client.search_runs([client.get_experiment_by_name("peftkit").experiment_id])
    assert "report.json" in {a.path for a in client.list_artifacts(found.info.run_id)}
    assert found.data.metrics["train/loss"] == pytest.approx(
        [h for h in report(run)["history"] if "train_loss" in h][-1]["train_loss"])


def test_live_json_follows_the_run_and_ends_finished(tmp_path):
    run = train_run(tmp_path, "live", report_to="none")
    live = json.loads((run / "live.json").read_text())
    assert live["state"] == "finished" and live["step"] == live["total_steps"] == report(run)["steps"]
    assert live["history"] == report(run)["history"]
    assert not (run / "tensorboard").exists() and not (run / "mlflow.db").exists()


def test_a_run_that_fails_is_marked_failed(tmp_path, monkeypatch):
    from peftkit.train.trainer import Trainer

    def boom(self):
        raise RuntimeError("stopped by the test")

    monkeypatch.setattr(Trainer, "_finish", boom)
    train_run(tmp_path, "broken", exit_code=1, report_to="none")  # 1: internal error
    assert json.loads((tmp_path / "runs" / "broken" / "live.json").read_text())["state"] == "failed"


def test_report_to_rejects_an_unknown_tracker():
    from pydantic import ValidationError

    from peftkit.train.config import RunConfig

    with pytest.raises(ValidationError, match="tensorboard"):
        RunConfig.model_validate({"train_file": "x.csv", "report_to": ["wandb"]})


def test_report_to_mlflow_without_mlflow_installed_says_how_to_install(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    train_run(tmp_path, "no-mlflow", exit_code=2, report_to="mlflow")
    assert "pip install 'peftkit[tracking]'" in capsys.readouterr().err
