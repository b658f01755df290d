"""Where a run's numbers go while it trains (config key ``report_to``): TensorBoard, MLflow, and always ``live.json``.

``live.json`` is the run's progress for ``peftkit ui`` (state, pid, step of total, times, the history so far), rewritten
atomically at most every ``LIVE_EVERY`` seconds and after each evaluation, so that a page shows a training run's
curves before its report.json exists. MLflow gets the config as params, every scalar per step, and at the end the
report, the plots and the adapter folder as artifacts, in ``MLFLOW_TRACKING_URI`` (default: a SQLite store
``<run>/mlflow.db`` with its artifacts under ``<run>/mlartifacts``).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

from ..atomic import write_json
from .metrics import TensorBoard

LIVE_FILE = "live.json"
LIVE_EVERY = 2.0  # seconds between two writes of live.json (each evaluation writes at once)
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
MLFLOW_EXPERIMENT = "peftkit"


class Live:
    """``live.json``: what a page needs to show a run in progress."""

    def __init__(self, path: Path, history: Callable[[], list], total_steps: int) -> None:
        self.path, self.history, self.total_steps = path, history, total_steps
        self.started, self.written = time.time(), 0.0

    def write(self, state: str, step: int | None = None, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.written < LIVE_EVERY:
            return
        history = self.history()
        write_json(self.path, {"state": state, "pid": os.getpid(), "host": socket.gethostname(),
                               "step": step if step is not None else (history[-1]["step"] if history else 0),
                               "total_steps": self.total_steps, "started": self.started, "updated": now,
                               "seconds": now - self.started, "history": history})
        self.written = now


class MLflow:
    """One MLflow run per training run (the client API: no global active run is touched)."""

    def __init__(self, folder, config) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            from ..config import ConfigError

            raise ConfigError("report_to: mlflow needs MLflow: pip install 'peftkit[tracking]' (or drop mlflow from "
                              "report_to)") from None

        self.folder = folder
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(folder.path / MLFLOW_DB).resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        if experiment is None:
            location = None if os.environ.get("MLFLOW_TRACKING_URI") else \
                (folder.path / MLFLOW_ARTIFACTS).resolve().as_uri()
            experiment_id = self.client.create_experiment(MLFLOW_EXPERIMENT, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=folder.path.name,
                                             tags={"peftkit.run_folder": str(folder.path.resolve())}).info.run_id
        from mlflow.entities import Param

        params = [Param(key, str(value)[:6000]) for key, value in flatten_keys(config.model_dump(mode="json")).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def scalars(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(key, float(value), stamp, step) for key, value in values.items()
                   if isinstance(value, (int, float))]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, report: dict) -> None:
        from ..methods import artifact_dirs

        folder = self.folder
        self.client.log_artifact(self.run_id, str(folder.report_file))
        if folder.plots_dir.is_dir():
            self.client.log_artifacts(self.run_id, str(folder.plots_dir), "plots")
        for name in artifact_dirs():
            if (folder.path / name).is_dir():
                self.client.log_artifacts(self.run_id, str(folder.path / name), name)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def flatten_keys(values: dict, prefix: str = "") -> dict:
    """Nested mappings as one level of dotted keys (``lora.r``), as MLflow params and config comparisons want."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Trackers:
    """The trainer's one sink for scalars: ``scalars`` per step, ``finish`` after the report is written, ``close``
    always (a run closed without ``finish`` is marked failed in live.json and in MLflow)."""

    def __init__(self, config, folder, history: Callable[[], list], total_steps: int, enabled: bool = True) -> None:
        report_to = set(getattr(config, "report_to", ["tensorboard"]))
        self.mlflow = MLflow(folder, config) if enabled and "mlflow" in report_to else None  # first: it may refuse
        self.board = TensorBoard(folder.tensorboard_dir, enabled=enabled and "tensorboard" in report_to)
        self.live = Live(folder.path / LIVE_FILE, history, total_steps) if enabled else None
        self.finished = False
        if self.live:
            self.live.write("running", force=True)

    def scalars(self, values: dict, step: int) -> None:
        self.board.scalars(values, step)
        if self.mlflow:
            self.mlflow.scalars(values, step)
        if self.live:
            self.live.write("running", step, force=any(key.startswith("dev/") for key in values))

    def finish(self, report: dict) -> None:
        if self.mlflow and report:
            self.mlflow.finish(report)
        if self.live:
            self.live.write("finished", force=True)
        self.finished = True

    def close(self) -> None:
        self.board.close()
        if self.live and not self.finished:
            self.live.write("failed", force=True)
        if self.mlflow:
            self.mlflow.close("FINISHED" if self.finished else "FAILED")


def read_live(run_dir: Path) -> dict:
    """A run's live.json, or {} (none yet, or unreadable)."""
    try:
        return json.loads((Path(run_dir) / LIVE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
