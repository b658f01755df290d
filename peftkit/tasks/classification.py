"""Text classification: single texts or sentence pairs, one label each (``task: classification``, the default).

The model is a sequence classifier with a choice of pooling (``heads.py``); data are CSV/TSV/JSONL files with a
text column, an optional second text column and a label column (``data.py``); the vocabulary is the sorted label
set of the training file (``labels.json``); the loss is cross-entropy; metrics are scikit-learn's
(``classification_metrics.py``); a merged folder is a transformers classifier or encoder + pooling + head
(``classification_merge.py``); the server answers ``POST /v1/classify`` (``classification_serve.py``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import Datasets, ServeSchema, Task, register_task
from . import data as D


class Classification(Task):
    name = "classification"
    vocabulary_file = "labels.json"
    column_keys = ("text_column", "text_pair_column", "label_column")
    curve_metrics = ("accuracy", "macro_f1")

    # -- the model ---------------------------------------------------------------------------------------
    def build_model(self, model_path: str, config, vocabulary: D.LabelMap) -> nn.Module:
        from .heads import build_classifier

        names = dict(enumerate(vocabulary.names))
        return build_classifier(model_path, len(vocabulary), config.pooling, id2label=names,
                                label2id={v: k for k, v in names.items()})

    def serving_base(self, model_path: str, options: dict) -> tuple[nn.Module, list[str] | None, dict]:
        from .heads import build_classifier, resolve_pooling

        pooling = resolve_pooling(model_path, options.get("pooling", "auto"))
        model = build_classifier(model_path, num_labels=None, pooling=pooling)  # keeps a trained head
        return model, _trained_head_labels(model), {"pooling": pooling}

    def check_adapter(self, name: str, stored_config: dict, settings: dict, model_path: str) -> str | None:
        from .heads import resolve_pooling

        pooling = stored_config.get("pooling", "auto")
        if resolve_pooling(model_path, pooling) != settings["pooling"]:
            return (f"adapter {name!r} was trained with pooling {pooling!r}; this server's base uses "
                    f"{settings['pooling']!r} (start it with --pooling {pooling})")
        return None

    # -- reading data ------------------------------------------------------------------------------------
    def read(self, path: str | Path, config, labelled: bool = True) -> list[D.Example]:
        columns = D.Columns(config.text_column, config.label_column, config.text_pair_column)
        return D.read_examples(path, columns, labelled=labelled)

    def load_datasets(self, config) -> Datasets:
        train = self.read(config.train_file, config)
        labels = D.LabelMap.from_examples(train)
        if len(labels) < 2:
            raise D.DataError(f"{config.train_file}: only one label ({labels.names[0]!r}); a classifier needs two or more")
        if config.ood is not None:
            labels.ood = _ood_rule(config, labels)
        if config.dev_file:
            dev = self.read(config.dev_file, config)
            labels.ids(dev, config.dev_file)
        else:
            train, dev = D.stratified_split(train, config.dev_split, config.seed)
        test = []
        if config.test_file:
            test = self.read(config.test_file, config)
            labels.ids(test, config.test_file)
        calibration = _calibration_rows(self, config, labels, dev)
        return Datasets(labels, train, dev, test, calibration)

    def inputs(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[D.Example]:
        return [D.Example(t, pairs[i] if pairs else None, None, i + 1) for i, t in enumerate(texts)]

    def vocabulary_to_dict(self, vocabulary: D.LabelMap) -> dict:
        return vocabulary.to_dict()

    def vocabulary_from_dict(self, data: dict) -> D.LabelMap:
        labels = data.get("labels") if isinstance(data, dict) else None
        if not isinstance(labels, list) or not labels or not all(isinstance(label, str) for label in labels):
            raise D.DataError('must hold {"labels": [names...]}')
        return D.LabelMap.from_dict(data)

    def names(self, vocabulary: D.LabelMap) -> list[str]:
        return vocabulary.names

    def targets(self, examples: Sequence[D.Example], vocabulary: D.LabelMap, source: str) -> list[int]:
        return vocabulary.ids(examples, source)

    # -- batches -------------------------------------------------------------------------------------------
    def encode(self, tokenizer, examples: Sequence[D.Example], max_length: int) -> list[dict]:
        return D.encode(tokenizer, examples, max_length)

    def collate(self, tokenizer, features: Sequence[dict]) -> dict:
        return D.collate(tokenizer, features)

    def loss_sum(self, logits: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.float(), torch.as_tensor(list(targets)), reduction="sum")

    # -- evaluation and report ---------------------------------------------------------------------------
    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), -1)

    def metrics(self, logits: torch.Tensor, targets: Sequence[int], vocabulary: D.LabelMap) -> dict:
        from .classification_metrics import scores

        targets, ood_result = list(targets), None
        if vocabulary.ood is not None:  # the closed-set figures are those of the in-scope rows
            from . import ood

            ood_result = ood.metrics(logits, targets, vocabulary.ood)
            inside = [i for i, t in enumerate(targets) if t != ood.OUT_OF_SCOPE]
            logits, targets = logits[inside], [targets[i] for i in inside]
        loss = float(nn.functional.cross_entropy(logits.float(), torch.tensor(targets))) if targets else float("nan")
        result = scores(targets, logits.argmax(-1).tolist(), vocabulary.names)
        result["loss"] = loss
        if ood_result is not None:
            from .ood import summary

            result["ood"] = ood_result
            result["report_text"] += f"\n   out of scope ({vocabulary.ood.method}): {summary(ood_result)}"
        return result

    def summary(self, result: dict) -> str:
        line = f"accuracy {result['accuracy']:.4f}   macro-F1 {result['macro_f1']:.4f}"
        if "ood" in result:
            from .ood import summary

            line += "   " + summary(result["ood"])
        return line

    def calibrate(self, logits_of, datasets: Datasets, config) -> dict:
        if config.ood is None:
            return {}
        from . import ood

        rows = datasets.calibration or datasets.dev
        targets = torch.tensor(datasets.vocabulary.ids(rows, "calibration"), dtype=torch.long)
        logits = logits_of(rows) if rows else torch.empty(0, len(datasets.vocabulary))
        result = ood.calibrate(datasets.vocabulary.ood, logits, targets != ood.OUT_OF_SCOPE, config.ood.target())
        return {"file": config.ood_dev_file or "dev", **result}

    def plots(self, report: dict, vocabulary: D.LabelMap, directory: Path) -> None:
        from .classification_metrics import plot_confusion

        for split in ("dev", "test"):
            if split in report:
                plot_confusion(report[split]["confusion_matrix"], vocabulary.names,
                               directory / f"confusion_{split}.png", f"confusion matrix ({split})")

    def settings(self, config) -> dict:
        return {"pooling": config.pooling}

    def info(self, report: dict) -> dict:
        out = {}
        for split in ("dev", "test"):
            if split in report:
                out[f"{split} accuracy"] = round(report[split]["accuracy"], 4)
                out[f"{split} macro-F1"] = round(report[split]["macro_f1"], 4)
                if "ood" in report[split]:
                    from .ood import summary

                    out[f"{split} OOD"] = summary(report[split]["ood"])
        return out

    # -- prediction output -------------------------------------------------------------------------------
    def prediction_outputs(self, logits: torch.Tensor, vocabulary: D.LabelMap) -> torch.Tensor:
        """Probabilities; with an out-of-scope rule, the row's score as one more column."""
        return _with_score(logits, vocabulary.ood, len(vocabulary))

    def prediction_rows(self, examples: Sequence[D.Example], outputs: torch.Tensor, vocabulary: D.LabelMap) -> list[dict]:
        names, pairs = vocabulary.names, examples and examples[0].text_pair is not None
        rows = []
        for i, example in enumerate(examples):
            probs = outputs[i, :len(names)]
            best = int(probs.argmax())
            rows.append({"text": example.text, **({"text_pair": example.text_pair} if pairs else {}),
                         "label": names[best], "probability": round(float(probs[best]), 6),
                         "probabilities": {name: round(float(p), 6) for name, p in zip(names, probs)}})
            if vocabulary.ood is not None:
                score = float(outputs[i, len(names)])
                if bool(vocabulary.ood.rejected(torch.tensor([score]))):
                    rows[-1]["label"] = vocabulary.ood.label
                rows[-1]["ood_score"] = round(score, 6)
        return rows

    def write_predictions(self, path: Path, rows: list[dict], vocabulary: D.LabelMap) -> None:
        from ..atomic import atomic_write

        names = vocabulary.names

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8", newline="") as handle:
                if path.suffix.lower() == ".jsonl":
                    for row in rows:
                        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                    return
                fields = [k for k in ("text", "text_pair") if k in rows[0]] + ["label", "probability"] + \
                    [k for k in ("ood_score",) if k in rows[0]] + [f"p_{n}" for n in names]
                writer = csv.DictWriter(handle, fieldnames=fields)
                writer.writeheader()
                for row in rows:
                    flat = {k: row[k] for k in fields if k in row}
                    flat.update({f"p_{n}": row["probabilities"][n] for n in names})
                    writer.writerow(flat)

        atomic_write(path, write)

    # -- merged folders ------------------------------------------------------------------------------------
    def write_merged(self, folder: Path, plain: nn.Module, vocabulary: D.LabelMap, config, run_path: Path,
                     tokenizer) -> dict:
        from . import classification_merge as M

        marker = M.write(folder, plain, vocabulary.names, config, run_path, tokenizer)
        return {**marker, "ood": vocabulary.ood.to_dict()} if vocabulary.ood is not None else marker

    def open_merged(self, folder: Path, marker: dict) -> tuple[dict, D.LabelMap]:
        from . import classification_merge as M

        values, labels = M.open_folder(marker)
        return values, D.LabelMap.from_dict({"labels": labels.names, "ood": marker.get("ood")})

    def merged_model(self, folder: Path, config, vocabulary: D.LabelMap) -> nn.Module:
        from . import classification_merge as M

        return M.model(folder, config.pooling, vocabulary)

    # -- serving -------------------------------------------------------------------------------------------
    def serve_schema(self) -> ServeSchema:
        from .classification_serve import ClassifyRequest, ClassifyResponse

        return ServeSchema("/v1/classify", ClassifyRequest, ClassifyResponse, verb="classify")

    def request_rows(self, request) -> list[tuple[str, str | None]]:
        if request.texts is not None:
            return [(text, None) for text in request.texts]
        return [(a, b) for a, b in request.pairs]

    def request_problem(self, request, settings: dict) -> str | None:
        takes_pairs = settings.get("pairs")
        if takes_pairs is None or takes_pairs == (request.pairs is not None):
            return None
        wanted, sent = ("'pairs' ([[text, text_pair], ...])", "single texts") if takes_pairs else ("'texts'", "pairs")
        return (f"adapter {request.adapter!r} was trained on {'sentence pairs' if takes_pairs else 'single texts'} "
                f"but the request sends {sent}: send {wanted}")

    def serve_row(self, logits: torch.Tensor, names: list[str], inputs: tuple,
                  vocabulary: D.LabelMap | None = None) -> torch.Tensor:
        # the shared head may be wider than this adapter's; an adapter with an ood rule gets its score appended
        return _with_score(logits, _rule(vocabulary), len(names))

    def response(self, adapter: str, outputs: list[torch.Tensor], names: list[str],
                 vocabulary: D.LabelMap | None = None):
        from .classification_serve import ClassifyResponse, OodPrediction, Prediction

        rule, predictions = _rule(vocabulary), []
        for output in outputs:  # full float32 precision: answers equal `peftkit predict` bit for bit
            probs = output[:len(names)]
            best = int(probs.argmax())
            fields = {"label": names[best], "probability": float(probs[best]),
                      "probabilities": {name: float(p) for name, p in zip(names, probs)}}
            if rule is None:
                predictions.append(Prediction(**fields))
                continue
            score = output[len(names):len(names) + 1]
            fields["label"] = rule.label if bool(rule.rejected(score)) else fields["label"]
            predictions.append(OodPrediction(**fields, ood_score=float(score), threshold=rule.threshold))
        return ClassifyResponse(adapter=adapter, predictions=predictions)

    def adapter_settings(self, stored_config: dict | None) -> dict:
        # True: trained on sentence pairs; False: on single texts; None: not known (a plain adapter folder)
        return {"pairs": None if stored_config is None else bool(stored_config.get("text_pair_column"))}

    def shared_head(self, stored_config: dict, model_path: str) -> str:
        from .heads import resolve_pooling

        pooling = resolve_pooling(model_path, stored_config.get("pooling", "auto"))
        if pooling == "pooler":  # the pooler is a body module of its own that token classification has not
            raise D.DataError("was trained with pooling 'pooler', which cannot share the encoder body with other "
                            "tasks; serve it with --task classification --pooling pooler")
        return pooling

    def served_metrics(self, report: dict) -> dict:
        return {split: round(report[split]["accuracy"], 4) for split in ("dev", "test") if split in report}

    def adapter_public(self, settings: dict) -> dict:
        return {"input": {True: "pairs", False: "texts", None: "texts or pairs"}[settings.get("pairs")]}


def _rule(vocabulary: D.LabelMap | None):
    """The out-of-scope rule of a served adapter's run (None: none, or a plain adapter folder)."""
    return getattr(vocabulary, "ood", None)


def _with_score(logits: torch.Tensor, rule, width: int) -> torch.Tensor:
    """Probabilities over the first ``width`` logits of each row, plus the rule's score as a last column (if any)."""
    probs = torch.softmax(logits[..., :width].float(), -1)
    if rule is None:
        return probs
    return torch.cat([probs, rule.scores(logits[..., :width])[..., None]], -1)


def _ood_rule(config, labels: D.LabelMap):
    from .ood import OodRule

    if config.ood.label in labels.index:
        raise D.DataError(f"{config.train_file}: rows labelled {config.ood.label!r}, the out-of-scope label (ood.label); "
                          "the classifier learns in-scope intents only: drop those rows from train, or set ood.label")
    return OodRule.from_config(config.ood)


def _calibration_rows(task: "Classification", config, labels: D.LabelMap, dev: list) -> list:
    """The ood_dev_file's rows (else none: dev is used), checked to fit the calibration target."""
    if config.ood is None or config.ood.threshold is not None:
        return []
    rows, source = (task.read(config.ood_dev_file, config), config.ood_dev_file) if config.ood_dev_file else (dev, "dev")
    targets = labels.ids(rows, source)
    if config.ood.in_scope_precision is not None and -1 not in targets:
        raise D.DataError(f"{source}: no out-of-scope rows (labelled {config.ood.label!r} or unseen in training) to "
                          "calibrate ood.in_scope_precision on")
    if all(t == -1 for t in targets):
        raise D.DataError(f"{source}: no in-scope rows to calibrate the ood threshold on")
    return rows if config.ood_dev_file else []


def _trained_head_labels(model: nn.Module) -> list[str] | None:
    """The base model's own labels if its head came from the checkpoint (not initialised at random)."""
    head = getattr(model, "classifier", None) or getattr(model, "score", None)
    if head is None or not all(getattr(p, "_is_hf_initialized", False) for p in head.parameters()):
        return None
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    return [str(id2label.get(i, i)) for i in range(next(head.parameters()).shape[0])]


register_task(Classification())
