"""One base model in memory, many adapters on it, and classification of mixed batches.

Adapters are folders under one directory: peftkit run folders (``config.yaml``, ``labels.json``, ``adapter/``)
or plain adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``, e.g. from Hugging Face PEFT).
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

from .. import data as D
from ..fingerprint import base_fingerprint
from ..io import CONFIG_NAME, AdapterContentError, AdapterFileError, find_adapter_dir
from ..model import BASE, AdaptedModel
from ..names import AdapterExistsError, AdapterNameError, check_adapter_name

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
    labels: list[str]
    trainable_share: float | None = None
    metrics: dict = field(default_factory=dict)
    #: True: trained on sentence pairs; False: on single texts; None: unknown (a plain adapter folder)
    pairs: bool | None = None

    def public(self) -> dict:
        return {"name": self.name, "method": self.method, "labels": self.labels, "trainable_share": self.trainable_share,
                "metrics": self.metrics, "input": {True: "pairs", False: "texts", None: "texts or pairs"}[self.pairs]}


class ServedModel:
    def __init__(self, base_path: str | Path, adapter_root: str | Path, pooling: str = "auto", max_length: int = 128):
        from transformers import AutoTokenizer

        from ..heads import build_classifier, resolve_pooling
        from ..train.trainer import resolve_model

        self.base_path = resolve_model(str(base_path))
        self.root = Path(adapter_root).resolve()
        if not self.root.is_dir():
            raise BadAdapterRequest(f"adapter directory {adapter_root} does not exist")
        self.pooling = resolve_pooling(self.base_path, pooling)
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        task = build_classifier(self.base_path, num_labels=None, pooling=self.pooling)  # keeps a trained head
        self.base_labels = self._trained_head_labels(task)
        self.model = AdaptedModel(task).eval()  # and every adapter added later follows this mode (no dropout)
        self.fingerprint = base_fingerprint(task)
        self.lock = threading.RLock()
        self.adapters: dict[str, AdapterInfo] = {}
        #: called after every forward pass with the adapter name of each row (metrics, tests)
        self.on_forward: Callable[[list[str]], None] | None = None

    @staticmethod
    def _trained_head_labels(task) -> list[str] | None:
        """The base model's own labels if its head came from the checkpoint (not initialised at random)."""
        head = getattr(task, "classifier", None) or getattr(task, "score", None)
        if head is None or not all(getattr(p, "_is_hf_initialized", False) for p in head.parameters()):
            return None
        id2label = getattr(getattr(task, "config", None), "id2label", None) or {}
        return [str(id2label.get(i, i)) for i in range(next(head.parameters()).shape[0])]

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
        try:
            check_adapter_name(name, self.adapters)
        except AdapterExistsError as err:
            raise AdapterConflict(str(err)) from None
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

    def _load(self, name: str, path: str | Path) -> AdapterInfo:
        folder = self._confined(path)
        run_config = folder / "config.yaml"
        labels_file = folder / "labels.json"
        adapter_dir = folder / "adapter" if (folder / "adapter" / CONFIG_NAME).is_file() else folder
        try:
            adapter_dir = find_adapter_dir(adapter_dir, "default")
        except AdapterFileError as err:
            raise BadAdapterRequest(str(err)) from None
        for file in adapter_dir.iterdir():  # a link inside the folder may not lead out of it
            self._confined(file)
        labels = None
        method, share, metrics, pairs = None, None, {}, None
        if run_config.is_file() and labels_file.is_file():
            import yaml

            self._confined(labels_file)
            values = yaml.safe_load(self._confined(run_config).read_text(encoding="utf-8")) or {}
            pooling = values.get("pooling", "auto")
            from ..heads import resolve_pooling

            if resolve_pooling(self.base_path, pooling) != self.pooling:
                raise AdapterConflict(f"adapter {name!r} was trained with pooling {pooling!r}; this server's base uses "
                                      f"{self.pooling!r} (start it with --pooling {pooling})")
            labels = json.loads(labels_file.read_text(encoding="utf-8")).get("labels")
            if not isinstance(labels, list) or not labels or not all(isinstance(l, str) for l in labels):
                raise BadAdapterRequest(f"adapter {name!r}: {labels_file.name} must hold {{\"labels\": [names...]}}")
            method = values.get("method")
            pairs = bool(values.get("text_pair_column"))
            report_file = folder / "report.json"
            if report_file.is_file():
                report = json.loads(self._confined(report_file).read_text(encoding="utf-8"))
                share = report.get("trainable_share")
                metrics = {k: round(report[k]["accuracy"], 4) for k in ("dev", "test") if k in report}
        with self.lock:
            try:
                self.model.load_adapter(adapter_dir, name, resize_heads=True, check_base=True)
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
            raise AdapterConflict(f"adapter {name!r}: labels.json lists {len(labels)} labels but its head has {head} outputs")
        info = AdapterInfo(name, str(folder), method or record.method.name, labels, share, metrics, pairs)
        self.adapters[name] = info
        return info

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
            self.model.delete_adapter(name)  # unwraps the layers it leaves empty
        self.adapters.pop(name, None)

    def labels_of(self, name: str) -> list[str]:
        if name == BASE:
            if self.base_labels is None:
                raise BadAdapterRequest("the base model has no trained task head: name an adapter")
            return self.base_labels
        if name not in self.adapters:
            raise AdapterNotFound(f"no adapter named {name!r}; loaded: {', '.join(sorted(self.adapters)) or 'none'}")
        return self.adapters[name].labels

    def takes_pairs(self, name: str) -> bool | None:
        """Whether the adapter was trained on sentence pairs (None: not known, e.g. the base or a plain folder)."""
        info = self.adapters.get(name)
        return info.pairs if info is not None else None

    # ------------------------------------------------------------------------------------------ inference
    def classify(self, rows: Sequence[tuple[str, str, str | None]]) -> list[torch.Tensor | Exception]:
        """Probabilities for rows of (adapter, text, text_pair or None), in one forward when the adapters allow.

        A row that fails (its text cannot be tokenized, its adapter was unloaded, its forward fails) gets its
        exception instead of probabilities; the other rows are answered as usual."""
        out: list = [None] * len(rows)
        features: dict[int, dict] = {}
        for i, (_, text, pair) in enumerate(rows):  # one row at a time: a bad text fails only its own row
            try:
                features[i] = D.encode(self.tokenizer, [D.Example(text, pair, None, 0)], self.max_length)[0]
            except Exception as err:
                out[i] = BadText(f"text {text[:40]!r} cannot be tokenized: {type(err).__name__}: {err}")
        names = [name for name, _, _ in rows]
        with self.lock, torch.inference_mode():
            live = [i for i in features if names[i] == BASE or names[i] in self.model.adapters]
            for i in set(features) - set(live):  # unloaded while the request waited
                out[i] = AdapterNotFound(f"adapter {names[i]!r} was unloaded")
            groups = self._forward_rows(live, features, names, out) if live else []
            widths = {name: len(self.labels_of(name)) for name in {names[i] for i in live}}
        for index, logits in groups:
            for row, i in enumerate(index):
                out[i] = torch.softmax(logits[row, :widths[names[i]]].float(), -1)
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

    def _forward(self, features: list[dict], names: list[str]) -> torch.Tensor:
        batch = D.collate(self.tokenizer, features)
        logits = self.model(**batch, adapter_names=names).logits
        if self.on_forward is not None:
            self.on_forward(names)
        return logits
