"""The run folder: one place that knows its layout, writes it, reads it back and builds its model.

    <run>/config.yaml      the resolved run config (``RunConfig.to_yaml``)
    <run>/labels.json      the task's vocabulary (``Task.vocabulary_file``; labels for classification)
    <run>/report.json      metrics, history and parameter counts, written at the end
    <run>/plots/           loss and metric curves, the task's plots
    <run>/tensorboard/     TensorBoard events
    <run>/checkpoints/     resumable step checkpoints (``checkpoint.py``)
    <run>/best/            the best model so far, as the method saves it
    <run>/adapter/ or <run>/model/   the result (a copy of best/): the method's ``save`` decides which

A folder written by ``peftkit merge`` opens the same way: it has no config.yaml but the marker
``peftkit_head.json`` (``tasks.MERGED_MARKER``), from which its task reads the settings back; its model is read
whole from the folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_write, output_error, recover_dir, write_dir, write_json
from ..tasks import DEFAULT_TASK, MERGED_MARKER, Task, get_task, task_of
from ..tasks.data import DataError
from ..methods import artifact_dirs, get_method

CONFIG_FILE = "config.yaml"
REPORT_FILE = "report.json"
PLOTS_DIR = "plots"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"


class RunFolder:
    """``RunFolder(path)`` knows the layout and writes it; ``.read()`` loads a finished (or merged) run: ``config``,
    ``task``, ``vocabulary``, ``report``, ``merged``; then ``model`` / ``tokenizer`` are built on first use."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.merged = False
        self._model: nn.Module | None = None
        self._tokenizer = None

    # -- layout ---------------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def report_file(self) -> Path:
        return self.path / REPORT_FILE

    @property
    def plots_dir(self) -> Path:
        return self.path / PLOTS_DIR

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def best_dir(self) -> Path:
        return self.path / BEST_DIR

    @property
    def adapter_dir(self) -> Path:
        """Where an adapter method's save wrote the adapter (the default artifact folder of a method)."""
        from ..methods import Method

        return self.path / Method.artifact

    @property
    def marker_file(self) -> Path:
        return self.path / MERGED_MARKER

    def vocabulary_file(self, task: Task) -> Path:
        return self.path / task.vocabulary_file

    # -- writing (the trainer's main process) ---------------------------------------------------------------
    def create(self) -> None:
        """Create the folder (an unwritable place fails here, before any work) and finish any folder swap a crash
        interrupted (see ``atomic.write_dir``)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise output_error(err, self.path) from None
        for name in (BEST_DIR, *artifact_dirs()):
            recover_dir(self.path / name)

    def holds_finished_or_resumable_run(self) -> bool:
        from .checkpoint import complete

        return self.config_file.exists() and (bool(complete(self.checkpoints_dir)) or self.report_file.exists())

    def write_config(self, config) -> None:
        atomic_write(self.config_file, lambda tmp: Path(tmp).write_text(config.to_yaml(), encoding="utf-8"))

    def write_vocabulary(self, task: Task, vocabulary) -> None:
        write_json(self.vocabulary_file(task), task.vocabulary_to_dict(vocabulary))

    def write_report(self, report: dict) -> None:
        write_json(self.report_file, report)

    @staticmethod
    def save_model(method, model: nn.Module, directory: Path) -> None:
        """The method's artifact (e.g. ``adapter/``), written whole into a new folder, then swapped in."""
        write_dir(directory, lambda tmp: method.save(model, tmp))

    def publish_best(self) -> None:
        """Copy the best model's artifact to the top of the folder (``adapter/`` or ``model/``)."""
        for name in artifact_dirs():
            source = self.best_dir / name
            if source.exists():
                write_dir(self.path / name, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True))

    # -- reading ----------------------------------------------------------------------------------------
    def read(self) -> "RunFolder":
        """Load the run's config, task, vocabulary and report (a merged folder: from its marker)."""
        from ..config import ConfigError

        if not self.config_file.is_file() and self.marker_file.is_file():
            return self._read_merged()
        if not self.config_file.is_file():
            raise DataError(f"{self.path}: not a peftkit run folder ({CONFIG_FILE} and a vocabulary file such as "
                            f"labels.json are expected) nor a folder written by `peftkit merge` ({MERGED_MARKER} "
                            "is expected)")
        import yaml

        from .config import RunConfig

        try:
            stored = yaml.safe_load(self.config_file.read_text(encoding="utf-8"))
            self.config = RunConfig.model_validate(stored, context={"stored": True})  # as written by an older version too
        except Exception as err:
            raise ConfigError(f"{self.config_file}: {err}") from None
        self.task = task_of(self.config)
        vocabulary = self.vocabulary_file(self.task)
        if not vocabulary.is_file():
            raise DataError(f"{self.path}: not a peftkit run folder ({CONFIG_FILE} and {vocabulary.name} are expected) "
                            f"nor a folder written by `peftkit merge` ({MERGED_MARKER} is expected)")
        for name in artifact_dirs():  # a crash in the middle of replacing a folder: see atomic.write_dir
            recover_dir(self.path / name)
        try:
            self.vocabulary = self.task.vocabulary_from_dict(json.loads(vocabulary.read_text(encoding="utf-8")))
        except (DataError, ValueError) as err:
            raise DataError(f"{vocabulary}: {err}") from None
        self.report = json.loads(self.report_file.read_text(encoding="utf-8")) if self.report_file.is_file() else {}
        return self

    def _read_merged(self) -> "RunFolder":
        from ..config import ConfigError
        from .config import RunConfig

        self.merged = True
        try:
            self.marker = read_marker(self.path)
            self.task = get_task(self.marker.get("task", DEFAULT_TASK))
            values, self.vocabulary = self.task.open_merged(self.path, self.marker)
            if "task" in RunConfig.model_fields:  # the config key arrives with the method registry (issue 11)
                values = {**values, "task": self.task.name}
            self.config = RunConfig.model_validate({**values, "model": str(self.path)})
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(f"{self.marker_file}: {err}") from None
        self.report = {}
        return self

    @property
    def model_path(self) -> str:
        from .setup import resolve_model

        return resolve_model(self.config.model)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return self._tokenizer

    @property
    def model(self) -> nn.Module:
        """The trained model, in eval mode: a fresh task model with the method's saved weights loaded (strictly),
        or a merged folder's model read whole."""
        if self._model is None:
            self._model = self.load_model()
        return self._model

    @model.setter
    def model(self, value: nn.Module | None) -> None:
        self._model = value

    def load_model(self, directory: Path | None = None) -> nn.Module:
        """A fresh model with the method's artifact from ``directory`` (default: this folder; the trainer passes
        ``best/``) loaded through the method's strict loader."""
        if self.merged:
            return self.task.merged_model(self.path, self.config, self.vocabulary).eval()
        return load_trained(self.config, self.task, self.vocabulary, directory or self.path)


def load_trained(config, task: Task, vocabulary, directory: Path) -> nn.Module:
    """A fresh task model from the config's base, with the method's saved artifact in ``directory`` loaded."""
    from .setup import build_model, resolve_model

    fresh = build_model(config, resolve_model(config.model), task, vocabulary, prepare=False)
    return get_method(config.method).load(fresh, Path(directory)).eval()


def read_marker(folder: Path) -> dict:
    return json.loads((Path(folder) / MERGED_MARKER).read_text(encoding="utf-8"))


def write_marker(folder: Path, marker: dict) -> None:
    (Path(folder) / MERGED_MARKER).write_text(json.dumps(marker, indent=2, ensure_ascii=False), encoding="utf-8")


def no_grad_forward(task: Task, model: nn.Module, tokenizer, features: list[dict], batch_size: int,
                    autocast=None) -> torch.Tensor:
    """Logits of encoded examples in their order, batched by length (less padding), without gradients."""
    import contextlib

    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    pieces = []
    with torch.no_grad(), (autocast or contextlib.nullcontext()):
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            batch = task.collate(tokenizer, [features[i] for i in index])
            pieces.append((index, task.logits(task.forward(model, batch)).float()))
    return task.gather(pieces, len(features))
