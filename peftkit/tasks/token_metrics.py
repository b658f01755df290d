"""Token-classification metrics: seqeval's entity-level precision/recall/F1 per type with micro and macro averages
(strict mode for IOB2/BIOES when the run's tags are strict), word-level accuracy, and a confusion matrix over
entity types."""

from __future__ import annotations

from typing import Sequence

from .token_data import TagSet, entities

NONE = "(none)"  # the row/column of a missed or spurious entity in the confusion matrix


def scores(gold: Sequence[Sequence[int]], predicted: Sequence[Sequence[int]], tags: TagSet) -> dict:
    """Metrics of a split: ``gold`` and ``predicted`` hold one tag id per word of each sentence."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2, IOBES

    names = tags.names
    y_true = [[names[i] for i in sentence] for sentence in gold]
    y_pred = [[names[i] for i in sentence] for sentence in predicted]
    mode = {"mode": "strict", "scheme": IOB2 if tags.scheme == "IOB2" else IOBES} if tags.strict else {}
    report = classification_report(y_true, y_pred, output_dict=True, zero_division=0, **mode)
    text = classification_report(y_true, y_pred, digits=4, zero_division=0, **mode)
    words = sum(len(s) for s in gold)
    correct = sum(a == b for g, p in zip(gold, predicted) for a, b in zip(g, p))
    accuracy = correct / words if words else 0.0
    report = {k: {m: float(v) for m, v in row.items()} for k, row in report.items()}  # numpy numbers -> JSON
    micro, macro = report.get("micro avg", {}), report.get("macro avg", {})
    types, matrix = confusion(y_true, y_pred, tags)
    return {
        "f1": float(micro.get("f1-score", 0.0)), "precision": float(micro.get("precision", 0.0)),
        "recall": float(micro.get("recall", 0.0)), "macro_f1": float(macro.get("f1-score", 0.0)),
        "accuracy": accuracy,
        "per_type": {k: row for k, row in report.items() if not k.endswith(" avg")},
        "micro_avg": micro, "macro_avg": macro,
        "entity_types": types, "confusion_matrix": matrix,
        "seqeval_mode": "strict " + tags.scheme if tags.strict else "default (conlleval)",
        "report_text": text + f"\nword accuracy {accuracy:.4f} ({correct} of {words} words)",
    }


def confusion(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]], tags: TagSet) -> tuple[list[str], list[list[int]]]:
    """Entity types x entity types (+ ``(none)``): a gold entity and a predicted one with the same words count in
    (gold type, predicted type); a gold entity no prediction covers exactly in (type, none); a predicted entity no
    gold one matches in (none, type)."""
    types = tags.types + [NONE]
    index = {t: i for i, t in enumerate(types)}
    matrix = [[0] * len(types) for _ in types]
    for true, pred in zip(y_true, y_pred):
        gold = {(s, e): kind for kind, s, e in entities(true, tags.scheme, tags.strict)}
        found = {(s, e): kind for kind, s, e in entities(pred, tags.scheme, tags.strict)}
        for span, kind in gold.items():
            matrix[index[kind]][index[found.get(span, NONE)]] += 1
        for span, kind in found.items():
            if span not in gold:
                matrix[index[NONE]][index[kind]] += 1
    return types, matrix
