"""Tasks: what a fine-tuning job learns to do, one registered entry per task.

A ``Task`` owns everything that differs between tasks, so that the trainer, ``peftkit eval/predict/merge/info``
and the server stay the same for all of them: the transformers model it builds (and with what head), how
examples are read and checked from files, the task's vocabulary stored in the run folder (``labels.json`` for
classification), encoding and collating a batch, the training loss, turning model outputs into predictions,
metrics / report / plots, the rows ``peftkit predict`` writes, and the server's request/response schema.

Built in: ``classification`` (single texts and pairs; ``tasks/classification.py``), ``causal-lm``,
``token-classification`` (``tasks/token_classification.py``) and ``ranking`` (``tasks/ranking.py``). A new task subclasses ``Task``,
fills its seams and calls ``register_task``; the config key ``task: <name>`` then selects it. The seams the next
tasks need are marked below: ``token-classification`` (one label per token: ``targets`` and ``gather`` return
per-token rows, ``metrics`` uses seqeval) and ``causal-lm`` (prompt/response columns; ``forward`` is teacher-forced
for the loss and ``generate`` replaces the classifier forward at prediction time).

Keep this module light: ``import peftkit`` must not pull in transformers, pydantic or scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

DEFAULT_TASK = "classification"
#: the file every folder written by ``peftkit merge`` carries: its task and the settings it is read with
MERGED_MARKER = "peftkit_head.json"

_TASKS: dict[str, "Task"] = {}
_BUILT_IN = {"classification": "peftkit.tasks.classification", "causal-lm": "peftkit.tasks.causal_lm",
             "token-classification": "peftkit.tasks.token_classification",
             "ranking": "peftkit.tasks.ranking"}  # imported on first use


@dataclass
class Datasets:
    """A task's training data, read and checked before anything is written."""

    vocabulary: Any  # what the task's head predicts over (classification: a LabelMap)
    train: list
    dev: list
    test: list = field(default_factory=list)
    calibration: list = field(default_factory=list)  # rows a task calibrates on at the end (classification: ood_dev_file)


@dataclass
class ServeSchema:
    """How the server speaks a task: its route and the pydantic request/response models (``Task.request_rows``
    turns a request into rows, ``Task.response`` the rows' outputs into the answer)."""

    route: str  # e.g. "/v1/classify"
    request: type  # pydantic model of the request body; it has an ``adapter`` field
    response: type  # pydantic model of the answer
    verb: str = "classify"  # in messages: "nothing to classify"


class Task:
    """The seams of a task. Subclasses override what they need; the defaults fit "one output vector per example"
    tasks (classification), so a task that predicts per token or generates text overrides ``gather`` or
    ``generate`` too. Every method receives what it works on; a task keeps no state of its own."""

    name: ClassVar[str] = ""
    #: the file in the run folder that holds the task's vocabulary (labels, tag set, ...)
    vocabulary_file: ClassVar[str] = "labels.json"
    #: config keys that ``peftkit eval/predict`` may override per file (``--<key> value``)
    column_keys: ClassVar[tuple[str, ...]] = ()
    #: metrics drawn as curves in plots/metrics.png and logged per evaluation (``dev_<key>`` in the history)
    curve_metrics: ClassVar[tuple[str, ...]] = ()
    #: the values ``metric_for_best_model`` may take for this task (the first is its default)
    best_metrics: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1", "loss")
    #: whether a method's ``train_logits`` (head-only training on the frozen body's pooled features) fits this
    #: task's batches; False: such methods train through the plain forward (token-classification)
    pooled_head: ClassVar[bool] = True

    # -- the model ---------------------------------------------------------------------------------------
    def build_model(self, model_path: str, config, vocabulary) -> nn.Module:
        """A fresh task model over the pretrained body, its new head sized for ``vocabulary`` (random)."""
        raise NotImplementedError

    def serving_base(self, model_path: str, options: dict) -> tuple[nn.Module, list[str] | None, dict]:
        """The server's base model (the folder's own trained head kept, if any), the names its head predicts (None:
        no trained head) and the settings adapters must match (e.g. classification's pooling)."""
        raise NotImplementedError

    def check_adapter(self, name: str, stored_config: dict, settings: dict, model_path: str) -> str | None:
        """Why a run folder's adapter cannot join the server (a message), or None."""
        return None

    # -- reading data ------------------------------------------------------------------------------------
    def read(self, path: str | Path, config, labelled: bool = True) -> list:
        """Examples of one file; every problem is a ``DataError`` naming the file, line and column."""
        raise NotImplementedError

    def load_datasets(self, config) -> Datasets:
        """Train/dev/test examples and the vocabulary learned from train; everything checked up front."""
        raise NotImplementedError

    def inputs(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list:
        """Unlabelled examples from raw texts (``peftkit predict --text``, the server)."""
        raise NotImplementedError

    def vocabulary_to_dict(self, vocabulary) -> dict:
        raise NotImplementedError

    def vocabulary_from_dict(self, data: dict):
        raise NotImplementedError

    def names(self, vocabulary) -> list[str]:
        """Human-readable names of the vocabulary (``peftkit info``, the report, the server)."""
        raise NotImplementedError

    def targets(self, examples: Sequence, vocabulary, source: str) -> list:
        """What the model should predict for each example (classification: a label id; token classification:
        one id per token). Unknown labels are a ``DataError`` naming ``source``."""
        raise NotImplementedError

    # -- batches -------------------------------------------------------------------------------------------
    def encode(self, tokenizer, examples: Sequence, max_length: int) -> list[dict]:
        """Token ids of every example, unpadded."""
        raise NotImplementedError

    def collate(self, tokenizer, features: Sequence[dict]) -> dict:
        """One padded batch of encoded examples."""
        return tokenizer.pad(list(features), padding=True, return_tensors="pt")

    def forward(self, model: nn.Module, batch: dict, **kwargs) -> Any:
        """The model's outputs for a batch (causal-lm: teacher-forced logits of the response tokens)."""
        return model(**batch, **kwargs)

    def logits(self, outputs) -> torch.Tensor:
        return outputs.logits

    def loss_sum(self, logits: torch.Tensor, targets: Sequence) -> torch.Tensor:
        """The training loss summed over the batch (the trainer normalises it over the optimizer step)."""
        raise NotImplementedError

    def gather(self, pieces: Sequence[tuple[list[int], torch.Tensor]], count: int) -> torch.Tensor:
        """Join per-batch logits (rows given by index) into file order. Default: one vector per example;
        token-classification overrides this (rows of different lengths)."""
        width = pieces[0][1].shape[1:] if pieces else (0,)
        out = torch.empty(count, *width)
        for index, logits in pieces:
            out[index] = logits.float()
        return out

    def generate(self, model: nn.Module, tokenizer, examples: Sequence, config) -> list:
        """Seam for generation tasks (causal-lm): predictions without a classifier forward."""
        raise NotImplementedError(f"task {self.name!r} does not generate")

    # -- evaluation and report ---------------------------------------------------------------------------
    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """What a prediction is made of, per example (classification: probabilities)."""
        raise NotImplementedError

    def metrics(self, logits: torch.Tensor, targets: Sequence, vocabulary) -> dict:
        """Metrics of a split, including ``loss``, plus ``report_text`` (printed)."""
        raise NotImplementedError

    def calibrate(self, logits_of, datasets: Datasets, config) -> dict:
        """Settings fitted on held-out rows with the best model, before the final evaluation (classification: the
        out-of-scope threshold, kept in the vocabulary, which the trainer then writes again); ``logits_of(rows)``
        gives the model's logits. Returns what report.json records about it ({}: nothing to do)."""
        return {}

    def final_evaluation(self, model: nn.Module, tokenizer, datasets: Datasets, config, say) -> dict:
        """Extra entries of report.json computed once at the end with the best model (causal-lm: generation on dev
        prompts, base vs adapted); ``say`` prints."""
        return {}

    def summary(self, result: dict) -> str:
        """One line of headline metrics (printed after each split and by ``peftkit eval``)."""
        return "   ".join(f"{key} {result[key]:.4f}" for key in (*self.curve_metrics, "loss") if key in result)

    def plots(self, report: dict, vocabulary, directory: Path) -> None:
        """Task plots beside the loss/metric curves (classification: confusion matrices)."""

    def settings(self, config) -> dict:
        """The task's own settings of a run, shown by ``peftkit info`` (classification: the pooling)."""
        return {}

    def vocabulary_settings(self, vocabulary) -> dict:
        """Settings resolved at training time and kept with the vocabulary, shown by ``peftkit info`` over the
        configured ones (token-classification: the detected tag scheme instead of ``auto``)."""
        return {}

    def encoding_report(self, features: Sequence[dict]) -> dict:
        """Facts about how a file's examples were encoded, added to ``peftkit eval``'s result (token-classification:
        how many sentences were split into windows)."""
        return {}

    def info(self, report: dict) -> dict:
        """Headline results of a finished run for ``peftkit info`` and the server's adapter list."""
        return {}

    # -- prediction output -------------------------------------------------------------------------------
    def prediction_outputs(self, logits: torch.Tensor, vocabulary) -> Any:
        """What ``prediction_rows`` is made of (classification with an out-of-scope rule: the score too)."""
        return self.outputs(logits)

    def prediction_rows(self, examples: Sequence, outputs, vocabulary) -> list[dict]:
        """The rows ``peftkit predict`` prints (JSON lines) or writes."""
        raise NotImplementedError

    def write_predictions(self, path: Path, rows: list[dict], vocabulary) -> None:
        raise NotImplementedError

    # -- merged folders (``peftkit merge``) -------------------------------------------------------------
    def write_merged(self, folder: Path, plain: nn.Module, vocabulary, config, run_path: Path, tokenizer) -> dict:
        """Fill ``folder`` with the merged model; returns the marker to record (settings the folder is read with)."""
        raise NotImplementedError

    def open_merged(self, folder: Path, marker: dict) -> tuple[dict, Any]:
        """(run config values, vocabulary) of a merged folder, from its marker."""
        raise NotImplementedError

    def merged_model(self, folder: Path, config, vocabulary) -> nn.Module:
        raise NotImplementedError

    # -- serving -------------------------------------------------------------------------------------------
    def serve_schema(self) -> ServeSchema:
        raise NotImplementedError(f"task {self.name!r} cannot be served")

    def request_rows(self, request) -> list[tuple]:
        """Rows of a request: one tuple of inputs per example (classification: (text, text_pair or None))."""
        raise NotImplementedError

    def request_problem(self, request, settings: dict) -> str | None:
        """Why a valid request does not fit its adapter (``settings``: from ``adapter_settings``; e.g. pairs sent
        to an adapter trained on single texts), or None."""
        return None

    def encode_row(self, tokenizer, row: tuple, max_length: int) -> dict:
        """One row of a request, encoded (a failure here fails only that row)."""
        return self.encode(tokenizer, self.inputs([row[0]], [row[1]] if len(row) > 1 and row[1] is not None
                                                   else None), max_length)[0]

    def serve_row(self, logits: torch.Tensor, names: list[str], inputs: tuple, vocabulary=None):
        """One row's answer from its logits, for an adapter predicting over ``names``; ``inputs`` are the row's
        inputs (token-classification needs the text for its spans) and ``vocabulary`` the adapter's own (None: a
        plain adapter folder; classification reads its out-of-scope rule there)."""
        raise NotImplementedError

    def shared_head(self, stored_config: dict, model_path: str) -> str:
        """``peftkit serve --task auto`` (one encoder body for several tasks): how this run's head reads the body's
        hidden states (``"token"``: every position; ``"mean"``/``"cls"``: a pooled vector); a ``DataError`` says
        why it cannot share the body. ``serving_base(model_path, {"pooling": <that>})`` is its own serving model."""
        from .data import DataError

        raise DataError(f"task {self.name!r} cannot share an encoder body with other tasks")

    def response(self, adapter: str, outputs: list, names: list[str], vocabulary=None):
        """The response model for a request's rows (``vocabulary``: the adapter's own, None if not known)."""
        raise NotImplementedError

    def adapter_settings(self, stored_config: dict | None) -> dict:
        """What the server keeps about an adapter's task settings (None: a plain adapter folder, no run config)."""
        return {}

    def served_metrics(self, report: dict) -> dict:
        """The metrics the server's adapter list shows for a run (from its report.json)."""
        return {}

    def adapter_public(self, settings: dict) -> dict:
        """What the server's adapter list shows of those settings (e.g. the input kind)."""
        return {}


def register_task(task: Task) -> Task:
    """Register a task under ``task.name`` (``task: <name>`` in a run config); returns it."""
    if not task.name:
        raise ValueError("a task needs a name")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in _TASKS and name in _BUILT_IN:
        import importlib

        importlib.import_module(_BUILT_IN[name])
    if name not in _TASKS:
        from ..config import ConfigError

        raise ConfigError(f"task: {name!r} is not a task; choose one of {', '.join(available_tasks())}")
    return _TASKS[name]


def available_tasks() -> list[str]:
    return sorted(set(_TASKS) | set(_BUILT_IN))


def task_of(config) -> Task:
    """The task of a run config (``task:``, default classification)."""
    return get_task(getattr(config, "task", DEFAULT_TASK) or DEFAULT_TASK)
