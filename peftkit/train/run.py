"""A finished run folder, reopened: its model for evaluation, prediction and merging.

A folder written by ``peftkit merge`` opens the same way (``Run(merged)``): its model is read whole from the
folder, with the labels and text settings the merge recorded (``merged.py``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch
import yaml

from .. import data as D
from ..io import recover_dir
from . import merged as M
from ..config import ConfigError
from .config import RunConfig
from .methods import ADAPTER_DIR, MODEL_DIR, get as get_method
from .trainer import CONFIG_FILE, LABELS_FILE, REPORT_FILE, build_model, resolve_model


class Run:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._model = None
        self._tokenizer = None
        self.merged = not (self.path / CONFIG_FILE).is_file() and (self.path / M.MARKER).is_file()
        if self.merged:
            self._open_merged()
            return
        if not (self.path / CONFIG_FILE).is_file() or not (self.path / LABELS_FILE).is_file():
            raise D.DataError(f"{self.path}: not a peftkit run folder ({CONFIG_FILE} and {LABELS_FILE} are expected) "
                              f"nor a folder written by `peftkit merge` ({M.MARKER} is expected)")
        try:
            stored = yaml.safe_load((self.path / CONFIG_FILE).read_text(encoding="utf-8"))
            self.config = RunConfig.model_validate(stored, context={"stored": True})  # as written by an older version too
        except Exception as err:
            raise ConfigError(f"{self.path / CONFIG_FILE}: {err}") from None
        for name in (ADAPTER_DIR, MODEL_DIR):  # a crash in the middle of replacing a folder: see io.write_dir
            recover_dir(self.path / name)
        self.labels = D.LabelMap.from_dict(json.loads((self.path / LABELS_FILE).read_text(encoding="utf-8")))
        report = self.path / REPORT_FILE
        self.report = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else {}

    def _open_merged(self) -> None:
        try:
            marker = M.read_marker(self.path)
            carried = {key: marker[key] for key in M.CARRIED if key in marker}
            self.config = RunConfig.model_validate({"model": str(self.path), "pooling": marker["pooling"], **carried})
            self.labels = D.LabelMap(marker["labels"])
        except Exception as err:
            raise ConfigError(f"{self.path / M.MARKER}: {err}") from None
        self.report = {}

    @property
    def model_path(self) -> str:
        return resolve_model(self.config.model)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return self._tokenizer

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            if self.merged:
                self._model = self._merged_model()
            else:
                fresh = build_model(self.config, self.model_path, self.labels, prepare=False)
                self._model = get_method(self.config.method).load(fresh, self.path).eval()
        return self._model

    def _merged_model(self) -> torch.nn.Module:
        from ..heads import build_classifier

        model = build_classifier(self.path, None, self.config.pooling).eval()  # the folder's own trained head
        outputs = model.num_labels if hasattr(model, "num_labels") else model.config.num_labels
        if outputs != len(self.labels):
            raise D.DataError(f"{self.path}: the model has {outputs} outputs but {M.MARKER} lists {len(self.labels)} "
                              "labels; merge the run again")
        return model

    def probabilities(self, texts: Sequence[str], pairs: Sequence[str] | None = None, batch_size: int = 64) -> torch.Tensor:
        examples = [D.Example(t, pairs[i] if pairs else None, None, i + 1) for i, t in enumerate(texts)]
        features = D.encode(self.tokenizer, examples, self.config.max_length)
        out = torch.empty(len(examples), len(self.labels))
        order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                logits = self.model(**D.collate(self.tokenizer, [features[i] for i in idx])).logits
                out[idx] = torch.softmax(logits.float(), -1)
        return out

    def read(self, path: str | Path, labelled: bool, columns: D.Columns | None = None) -> list[D.Example]:
        columns = columns or D.Columns(self.config.text_column, self.config.label_column, self.config.text_pair_column)
        return D.read_examples(path, columns, labelled=labelled)

    def evaluate(self, path: str | Path, columns: D.Columns | None = None) -> dict:
        from .metrics import scores

        examples = self.read(path, labelled=True, columns=columns)
        targets = self.labels.ids(examples, str(path))
        probs = self.probabilities([e.text for e in examples], [e.text_pair for e in examples] if examples[0].text_pair else None)
        result = scores(targets, probs.argmax(-1).tolist(), self.labels.names)
        result["loss"] = float(torch.nn.functional.nll_loss(torch.log(probs.clamp_min(1e-12)), torch.tensor(targets)))
        return result

    def merge(self, out: str | Path) -> Path:
        """The model without adapter wrappers, with the tokenizer, written whole, then renamed into place: a
        transformers sequence classifier (pooling ``pooler``), or encoder + pooling + head (see ``merged.py``)."""
        out = Path(out)
        if self.merged:
            raise D.DataError(f"{self.path} is already a merged model; copy the folder instead of merging it again")
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not empty; choose another --out")
        plain = get_method(self.config.method).merged(self.model)
        self._model = None  # merging changed the loaded model in place
        tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            M.write(tmp, plain, self.labels.names, self.config, self.path, self.tokenizer)
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    def info(self) -> dict:
        report = self.report
        out = {"run": str(self.path), "method": self.config.method, "base model": self.config.model,
               "pooling": self.config.pooling, "labels": self.labels.names}
        if self.merged:
            marker = M.read_marker(self.path)
            out.update({"base model": marker.get("base_model", "?"), "merged from": marker.get("merged_from", "?")})
        if "trainable_parameters" in report:
            out["trainable"] = (f"{report['trainable_parameters']:,} of {report['total_parameters']:,} "
                                f"({100 * report['trainable_share']:.3f}%)")
        for split in ("dev", "test"):
            if split in report:
                out[f"{split} accuracy"] = round(report[split]["accuracy"], 4)
                out[f"{split} macro-F1"] = round(report[split]["macro_f1"], 4)
        return out
