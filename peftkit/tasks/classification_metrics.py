"""Classification metrics (scikit-learn) and the confusion-matrix plot."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def scores(labels: Sequence[int], predictions: Sequence[int], names: Sequence[str]) -> dict:
    """Accuracy, macro/micro/weighted precision-recall-F1 and per-class figures (scikit-learn)."""
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    ids = list(range(len(names)))
    report = classification_report(labels, predictions, labels=ids, target_names=list(names), output_dict=True,
                                   zero_division=0)
    text = classification_report(labels, predictions, labels=ids, target_names=list(names), zero_division=0, digits=4)
    micro = f1_score(labels, predictions, labels=ids, average="micro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, labels=ids, average="macro", zero_division=0)),
        "micro_f1": float(micro),
        "weighted_f1": float(f1_score(labels, predictions, labels=ids, average="weighted", zero_division=0)),
        "per_class": {name: report[name] for name in names},
        "macro_avg": report["macro avg"],
        "weighted_avg": report["weighted avg"],
        "confusion_matrix": confusion_matrix(labels, predictions, labels=ids).tolist(),
        "report_text": text + f"\n   micro avg f1 {micro:.4f}",
    }


def plot_confusion(matrix: list[list[int]], names: Sequence[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..atomic import atomic_write

    values = np.array(matrix)
    size = max(4.0, 0.35 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(values, cmap="Blues")
    ax.set_xticks(range(len(names)), labels=names, rotation=90, fontsize=7 if len(names) > 20 else 9)
    ax.set_yticks(range(len(names)), labels=names, fontsize=7 if len(names) > 20 else 9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(names) <= 20:
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, int(values[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if values[i, j] > values.max() / 2 else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
