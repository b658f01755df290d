"""One base model in memory, many adapters on it, and inference on mixed batches, for any task: what a row is, how
it is encoded and what it answers are the task's (``peftkit.tasks``); the run folders' layout is ``RunFolder``'s.

Adapters are folders under one directory: peftkit run folders (``config.yaml``, the task's vocabulary file such as
``labels.json``, ``adapter/``) or plain adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``, e.g. from Hugging Face PEFT).
Every path is confined to that directory (symbolic links included), only safetensors are read, and an adapter
built for another base model (other shapes, or another recorded base fingerprint) is refused.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..fingerprint import base_fingerprint
from ..io import CONFIG_NAME, AdapterContentError, AdapterFileError, find_adapter_dir
from ..model import BASE, AdaptedModel
from ..names import AdapterNameError, check_adapter_name
from ..tasks import DEFAULT_TASK, Task, get_task

SHARED_TASKS = ("classification", "token-classification")  # the tasks ``--task auto`` serves on one body
from ..tasks.data import DataError
from ..train.folder import RunFolder

log = logging.getLogger("peftkit.serve")


class AdapterNotFound(KeyError):
    pass


class AdapterConflict(ValueError):
    """The adapter does not fit this base model (HTTP 409)."""


class BadAdapterRequest(ValueError):
    """A path outside the adapter directory, an invalid name, an unreadable folder (HTTP 400)."""


class BadText(ValueError):
    """A text the tokenizer could not take (HTTP 422); only the request that sent it fails."""


@dataclass
class AdapterInfo:
    name: str
    path: str
    method: str
    labels: list[str]  # the names the adapter predicts over (its task's vocabulary)
    trainable_share: float | None = None
    metrics: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # the task's (Task.adapter_settings), e.g. whether it takes pairs
    task: Task | None = None
    vocabulary: object = None  # the task's vocabulary from the run folder (None: a plain adapter folder)
    head: str | None = None  # --task auto: how its head reads the shared body (Task.shared_head)

    def public(self) -> dict:
        public = self.task.adapter_public(self.settings) if self.task is not None else {}
        return {"name": self.name, "task": self.task.name if self.task is not None else None, "method": self.method, "labels": self.labels, "trainable_share": self.trainable_share,
                "metrics": self.metrics, **public}


class ServedModel:
    def __init__(self, base_path: str | Path, adapter_root: str | Path, task: str = DEFAULT_TASK,
                 max_length: int = 128, **options) -> None:
        """``options``: the task's base-model settings (classification: ``pooling``). ``task="auto"``: one encoder
        body for classification and token-classification run folders side by side (``shared.py``), each adapter
        answering for its own run's task."""
        from transformers import AutoTokenizer

        from ..train.setup import resolve_model

        self.auto = task == "auto"
        self.task = get_task(DEFAULT_TASK if self.auto else task)
        #: the tasks this server answers (one route each)
        self.tasks = [get_task(name) for name in SHARED_TASKS] if self.auto else [self.task]
        self.base_path = resolve_model(str(base_path))
        self.root = Path(adapter_root).resolve()
        if not self.root.is_dir():
            raise BadAdapterRequest(f"adapter directory {adapter_root} does not exist")
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        if self.auto:
            from .shared import SharedEncoder, load_body

            base, self.base_labels, self.settings = SharedEncoder(load_body(self.base_path)), None, {}
            self._own_bases: dict[tuple[str, str], tuple[str, str]] = {}  # (task, head) -> (fingerprint, prefix)
        else:
            base, self.base_labels, self.settings = self.task.serving_base(self.base_path, options)
        self.model = AdaptedModel(base).eval()  # and every adapter added later follows this mode (no dropout)
        self.fingerprint = base_fingerprint(base)
        self.lock = threading.RLock()
        self.adapters: dict[str, AdapterInfo] = {}
        #: called after every forward pass with the adapter name of each row (metrics, tests)
        self.on_forward: Callable[[list[str]], None] | None = None

    @property
    def pooling(self) -> str | None:
        """Classification servers: the base model's pooling (a task setting, shown by ``GET /v1/adapters``)."""
        return self.settings.get("pooling")

    # ---------------------------------------------------------------------------------------- adapters
    def discover(self) -> list[tuple[str, str]]:
        """Load every adapter folder under the root; returns (folder, problem) for those that failed."""
        problems = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                self.load(folder.name, folder.name)
            except (AdapterConflict, BadAdapterRequest, AdapterNotFound) as err:
                problems.append((folder.name, str(err)))
        return problems

    def _confined(self, path: str | Path) -> Path:
        try:
            candidate = Path(path)
            resolved = (candidate if candidate.is_absolute() else self.root / candidate).resolve()
            exists = resolved.exists()
        except (OSError, ValueError) as err:  # a name too long, a NUL byte, a link loop
            raise BadAdapterRequest(f"path {str(path)[:200]!r} cannot be used: {err}") from None
        if resolved != self.root and self.root not in resolved.parents:
            raise BadAdapterRequest(f"path {str(path)[:200]!r} is outside the adapter directory {self.root}")
        if not exists:
            raise AdapterNotFound(f"no adapter folder at {str(path)[:200]!r} under {self.root}")
        return resolved

    def load(self, name: str, path: str | Path) -> AdapterInfo:
        """Load an adapter folder; every problem of the folder is an AdapterConflict, BadAdapterRequest or
        AdapterNotFound, and leaves nothing behind."""
        if name in self.adapters or name in self.model.adapters:
            raise AdapterConflict(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
        try:
            check_adapter_name(name, ())
        except AdapterNameError as err:
            raise BadAdapterRequest(str(err)) from None
        try:
            return self._load(name, path)
        except (AdapterNotFound, AdapterConflict, BadAdapterRequest):
            raise
        except AdapterContentError as err:
            raise BadAdapterRequest(f"adapter {name!r} cannot be loaded: {err}") from None
        except AdapterFileError as err:
            raise AdapterConflict(f"adapter {name!r} does not fit this base model: {err}") from None
        except Exception as err:  # whatever is wrong in the folder's files is that folder's problem, not the server's
            raise BadAdapterRequest(f"adapter {name!r} cannot be loaded: {type(err).__name__}: {err}") from None

    def _adapter_folder(self, path: str | Path) -> tuple[RunFolder, Path]:
        """The run folder at ``path`` (confined to the adapter directory) and its adapter folder: ``adapter/`` of a
        run, or the folder itself for a plain adapter folder; every file in it must stay inside the directory."""
        run = RunFolder(self._confined(path))
        adapter_dir = run.adapter_dir if (run.adapter_dir / CONFIG_NAME).is_file() else run.path
        try:
            adapter_dir = find_adapter_dir(adapter_dir, "default")
        except AdapterFileError as err:
            raise BadAdapterRequest(str(err)) from None
        for file in adapter_dir.iterdir():  # a link inside the folder may not lead out of it
            self._confined(file)
        return run, adapter_dir

    def _load(self, name: str, path: str | Path) -> AdapterInfo:
        run, adapter_dir = self._adapter_folder(path)
        labels, method, share, metrics, stored, vocabulary = None, None, None, {}, None, None
        task, load_options = self.task, {}
        if self.auto:
            task, head_kind, load_options = self._shared_task(name, run)
        vocabulary_file = run.vocabulary_file(task)
        if run.config_file.is_file() and vocabulary_file.is_file():
            import yaml

            self._confined(vocabulary_file)
            stored = yaml.safe_load(self._confined(run.config_file).read_text(encoding="utf-8")) or {}
            if stored.get("task", DEFAULT_TASK) != task.name:
                raise AdapterConflict(f"adapter {name!r} was trained for the task {stored.get('task')!r}; this server "
                                      f"serves {task.name!r} (start it with --task auto to serve several tasks)")
            problem = None if self.auto else task.check_adapter(name, stored, self.settings, self.base_path)
            if problem:
                raise AdapterConflict(problem)
            stored_vocabulary = json.loads(vocabulary_file.read_text(encoding="utf-8"))
            try:
                vocabulary = task.vocabulary_from_dict(stored_vocabulary)
                labels = task.names(vocabulary)
            except DataError as err:
                raise BadAdapterRequest(f"adapter {name!r}: {vocabulary_file.name} {err}") from None
            method = stored.get("method")
            if run.report_file.is_file():
                report = json.loads(self._confined(run.report_file).read_text(encoding="utf-8"))
                share = report.get("trainable_share")
                metrics = task.served_metrics(report)
        try:
            settings = task.adapter_settings(stored)
        except DataError as err:
            raise BadAdapterRequest(f"adapter {name!r}: {err}") from None
        with self.lock:
            try:
                self.model.load_adapter(adapter_dir, name, resize_heads=True, check_base=True, **load_options)
            except (AdapterFileError, BadAdapterRequest):
                raise
            except (KeyError, TypeError, ValueError, NotImplementedError) as err:
                raise BadAdapterRequest(f"adapter {name!r} cannot be loaded: {err}") from None
            self.model.eval()  # the server never runs in training mode (dropout), whatever the core does
            record = self.model.adapters[name]
            head = self._head_size(name)
        if labels is None:
            labels = [str(i) for i in range(head)] if head else []
        if head is not None and len(labels) != head:
            self.unload(name)
            raise AdapterConflict(f"adapter {name!r}: {vocabulary_file.name} lists {len(labels)} labels but its head "
                                  f"has {head} outputs")
        info = AdapterInfo(name, str(run.path), method or record.method.name, labels, share, metrics, settings,
                           task, vocabulary, head_kind if self.auto else None)
        self.adapters[name] = info
        return info

    def _shared_task(self, name: str, run: RunFolder) -> tuple[Task, str, dict]:
        """--task auto: the run's task, how its head reads the shared body, and how its file is loaded onto the body
        (its keys renamed, the base checked against the fingerprint of the run's own task model)."""
        import yaml

        if not run.config_file.is_file():
            raise BadAdapterRequest(f"adapter {name!r}: --task auto serves run folders (config.yaml names the task); "
                                    "serve a plain adapter folder with --task classification")
        stored = yaml.safe_load(self._confined(run.config_file).read_text(encoding="utf-8")) or {}
        task_name = stored.get("task", DEFAULT_TASK)
        if task_name not in SHARED_TASKS:
            raise AdapterConflict(f"adapter {name!r} is a {task_name!r} run; --task auto serves "
                                  f"{' and '.join(SHARED_TASKS)} runs")
        task = get_task(task_name)
        try:
            head = task.shared_head(stored, self.base_path)
        except DataError as err:
            raise AdapterConflict(f"adapter {name!r} {err}") from None
        if (task.name, head) not in self._own_bases:  # built once per kind: what the run's own model looked like
            from .shared import body_prefix

            own = task.serving_base(self.base_path, {"pooling": head})[0]
            self._own_bases[task.name, head] = (base_fingerprint(own), body_prefix(own, self.model.base_model.body))
        fingerprint, prefix = self._own_bases[task.name, head]
        from .shared import renamer

        return task, head, {"rename": renamer(prefix), "base_fingerprint": fingerprint}

    def task_of(self, name: str) -> Task:
        """The task an adapter answers for (the base model: the server's)."""
        info = self.adapters.get(name)
        return info.task if info is not None and info.task is not None else self.task

    def _head_size(self, name: str) -> int | None:
        from ..layers.modules_to_save import ModulesToSave

        for _, layer in self.model.adapter_layers():
            if isinstance(layer, ModulesToSave) and name in layer.modules_to_save:
                weight = getattr(layer.modules_to_save[name], "weight", None)
                return weight.shape[0] if weight is not None else None
        return None

    def unload(self, name: str) -> None:
        if name not in self.model.adapters:
            raise AdapterNotFound(f"no adapter named {name!r}")
        with self.lock:
            self.model.delete_adapter(name)  # (also unwraps the layers it leaves empty)
        self.adapters.pop(name, None)

    def labels_of(self, name: str) -> list[str]:
        if name == BASE:
            if self.base_labels is None:
                raise BadAdapterRequest("the base model has no trained task head: name an adapter")
            return self.base_labels
        if name not in self.adapters:
            raise AdapterNotFound(f"no adapter named {name!r}; loaded: {', '.join(sorted(self.adapters)) or 'none'}")
        return self.adapters[name].labels

    def vocabulary_of(self, name: str):
        """The task vocabulary of an adapter's run (None: the base model or a plain adapter folder)."""
        info = self.adapters.get(name)
        return info.vocabulary if info is not None else None

    def settings_of(self, name: str) -> dict:
        """The task settings of an adapter (empty for the base model)."""
        info = self.adapters.get(name)
        return info.settings if info is not None else {}

    # ------------------------------------------------------------------------------------------ inference
    def infer(self, rows: Sequence[tuple]) -> list[torch.Tensor | Exception]:
        """The task's answer for rows of (adapter, *inputs) (classification: (adapter, text, text_pair or None) ->
        probabilities), in one forward when the adapters allow.

        A row that fails (its text cannot be tokenized, its adapter was unloaded, its forward fails) gets its
        exception instead of an answer; the other rows are answered as usual."""
        out: list = [None] * len(rows)
        features: dict[int, dict] = {}
        for i, (_, *inputs) in enumerate(rows):  # one row at a time: a bad text fails only its own row
            try:
                features[i] = self.task_of(rows[i][0]).encode_row(self.tokenizer, tuple(inputs), self.max_length)
            except Exception as err:
                out[i] = BadText(f"text {str(inputs[0])[:40]!r} cannot be tokenized: {type(err).__name__}: {err}")
        names = [row[0] for row in rows]
        with self.lock, torch.inference_mode():
            live = [i for i in features if names[i] == BASE or names[i] in self.model.adapters]
            for i in set(features) - set(live):  # unloaded while the request waited
                out[i] = AdapterNotFound(f"adapter {names[i]!r} was unloaded")
            groups = self._forward_rows(live, features, names, out) if live else []
            vocabularies = {name: (self.labels_of(name), self.vocabulary_of(name))
                            for name in {names[i] for i in live}}
        for index, logits in groups:
            for row, i in enumerate(index):
                labels, vocabulary = vocabularies[names[i]]
                try:
                    out[i] = self.task_of(names[i]).serve_row(logits[row], labels, tuple(rows[i][1:]), vocabulary)
                except Exception as err:  # only this row's answer failed
                    log.error("answer failed for one row (adapter %r): %s: %s", names[i], type(err).__name__, err)
                    out[i] = err
        return out

    def _forward_rows(self, index: list[int], features: dict[int, dict], names: list[str],
                      out: list) -> list[tuple[list[int], torch.Tensor]]:
        """(rows, logits) groups for ``index``: one forward if it works; else one per adapter (adapters that cannot
        share a batch), else one per row, so that a failing row fails alone."""
        try:
            return [(index, self._forward([features[i] for i in index], [names[i] for i in index]))]
        except NotImplementedError as err:
            adapters = list(dict.fromkeys(names[i] for i in index))
            if len(adapters) > 1:
                return [group for name in adapters
                        for group in self._forward_rows([i for i in index if names[i] == name], features, names, out)]
            failure: Exception = err
        except Exception as err:  # isolated below: retried row by row
            failure = err
        if len(index) > 1:
            return [group for i in index for group in self._forward_rows([i], features, names, out)]
        log.error("forward failed for one row (adapter %r): %s: %s", names[index[0]], type(failure).__name__, failure)
        out[index[0]] = failure
        return []

    def _forward(self, features: list[dict], names: list[str]) -> torch.Tensor | list[torch.Tensor]:
        if self.auto:
            logits = self._shared_forward(features, names)
        else:
            batch = self.task.collate(self.tokenizer, features)
            logits = self.task.logits(self.task.forward(self.model, batch, adapter_names=names))
        if self.on_forward is not None:
            self.on_forward(names)
        return logits

    def _shared_forward(self, features: list[dict], names: list[str]) -> list[torch.Tensor]:
        """--task auto: rows of every task in ONE forward of the shared body; each row's logits, in order."""
        from types import SimpleNamespace

        from .shared import TOKEN, shared_batch

        groups: dict[tuple[str, str], list[int]] = {}
        for i, name in enumerate(names):
            info = self.adapters[name] if name in self.adapters else None
            if info is None:
                raise BadAdapterRequest("the shared base has no task head of its own: name an adapter")
            groups.setdefault((info.task.name, info.head), []).append(i)
        parts = [(get_task(task), [features[i] for i in index], [names[i] for i in index], head)
                 for (task, head), index in groups.items()]
        joined, pieces = shared_batch(self.tokenizer, self.tokenizer.pad_token_id or 0, parts)
        shared = self.model.base_model
        shared.kinds = joined["kinds"]
        try:
            out = self.model(**joined["batch"], adapter_names=joined["adapter_names"])
        finally:
            shared.kinds = None
        logits: list = [None] * len(names)
        for (task, batch, first, count), index, (_, _, _, head) in zip(pieces, groups.values(), parts):
            rows = out[first:first + count]
            if head == TOKEN:  # windows stitched back into sentences, as the task itself does
                rows = task.logits(SimpleNamespace(raw=SimpleNamespace(logits=rows), plan=batch["token_plan"]))
            else:
                rows = rows[:, 0]
            for row, i in enumerate(index):
                logits[i] = rows[row]
        return logits
