"""A finished run folder, reopened for ``peftkit eval / predict / merge / info``: task-agnostic, every task-specific
step (reading files, encoding, outputs, metrics, prediction rows, the merged layout) is the run's task's.

A folder written by ``peftkit merge`` opens the same way (``Run(merged)``): see ``RunFolder``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

import torch

from ..tasks.data import DataError
from .folder import RunFolder, no_grad_forward, read_marker, write_marker
from ..methods import get_method


class Run(RunFolder):
    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.read()

    @property
    def labels(self):
        """The run's vocabulary (classification: its ``LabelMap``)."""
        return self.vocabulary

    def with_columns(self, **overrides: str | None) -> "Run":
        """Read files with other column names than the run's (``--text_column`` ...); ``None`` keeps the run's."""
        given = {key: value for key, value in overrides.items() if value is not None}
        unknown = sorted(set(given) - set(self.task.column_keys))
        if unknown:
            from ..config import ConfigError

            raise ConfigError(f"task {self.task.name!r} has no column setting {', '.join(unknown)}")
        if given:
            self.config = self.config.model_copy(update=given)
        return self

    # -- inference ----------------------------------------------------------------------------------------
    def read_file(self, path: str | Path, labelled: bool) -> list:
        return self.task.read(path, self.config, labelled=labelled)

    def logits(self, examples: Sequence, batch_size: int = 64) -> torch.Tensor:
        features = self.task.encode(self.tokenizer, examples, self.config.max_length)
        return no_grad_forward(self.task, self.model, self.tokenizer, features, batch_size)

    def outputs(self, examples: Sequence, batch_size: int = 64) -> torch.Tensor:
        """The task's outputs per example (classification: probabilities over the labels)."""
        return self.task.outputs(self.logits(examples, batch_size))

    def probabilities(self, texts: Sequence[str], pairs: Sequence[str] | None = None, batch_size: int = 64) -> torch.Tensor:
        """Outputs for raw texts (and second texts of pairs): what ``peftkit predict --text`` computes."""
        return self.outputs(self.task.inputs(texts, pairs), batch_size)

    def evaluate(self, path: str | Path, batch_size: int = 64) -> dict:
        examples = self.read_file(path, labelled=True)
        targets = self.task.targets(examples, self.vocabulary, str(path))
        features = self.task.encode(self.tokenizer, examples, self.config.max_length)
        logits = no_grad_forward(self.task, self.model, self.tokenizer, features, batch_size)
        return {**self.task.metrics(logits, targets, self.vocabulary), **self.task.encoding_report(features)}

    def predict(self, examples: Sequence) -> list[dict]:
        """The rows ``peftkit predict`` prints or writes."""
        outputs = self.task.prediction_outputs(self.logits(examples), self.vocabulary)
        return self.task.prediction_rows(examples, outputs, self.vocabulary)

    def write_predictions(self, path: Path, rows: list[dict]) -> None:
        self.task.write_predictions(Path(path), rows, self.vocabulary)

    # -- merge ----------------------------------------------------------------------------------------------
    def merge(self, out: str | Path) -> Path:
        """The model without adapter wrappers, with the tokenizer, written whole (in the task's layout), then
        renamed into place."""
        out = Path(out)
        if self.merged:
            raise DataError(f"{self.path} is already a merged model; copy the folder instead of merging it again")
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not empty; choose another --out")
        plain = get_method(self.config.method).merged(self.model)
        self.model = None  # merging changed the loaded model in place
        tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            marker = self.task.write_merged(tmp, plain, self.vocabulary, self.config, self.path, self.tokenizer)
            write_marker(tmp, {"task": self.task.name, **marker})
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    # -- info -------------------------------------------------------------------------------------------------
    def info(self) -> dict:
        report = self.report
        out = {"run": str(self.path), "task": self.task.name, "method": self.config.method,
               "base model": self.config.model, **self.task.settings(self.config),
               **self.task.vocabulary_settings(self.vocabulary)}
        names = self.task.names(self.vocabulary)
        if names:  # a task without a label set (causal-lm) shows no labels line
            out["labels"] = names
        if self.merged:
            marker = read_marker(self.path)
            out.update({"base model": marker.get("base_model", "?"), "merged from": marker.get("merged_from", "?")})
        if "trainable_parameters" in report:
            out["trainable"] = (f"{report['trainable_parameters']:,} of {report['total_parameters']:,} "
                                f"({100 * report['trainable_share']:.3f}%)")
        out.update(self.task.info(report))
        return out
