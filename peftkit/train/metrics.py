"""Classification metrics (scikit-learn) and the run's plots (matplotlib) and TensorBoard events."""

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


def plot_history(history: list[dict], out: Path) -> list[Path]:
    """Loss and metric curves (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    train = [h for h in history if "train_loss" in h]
    evals = [h for h in history if "dev_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot([h["step"] for h in train], [h["train_loss"] for h in train], label="train loss")
    if evals:
        ax.plot([h["step"] for h in evals], [h["dev_loss"] for h in evals], marker="o", label="dev loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out / "loss.png")
    plt.close(fig)
    written.append(out / "loss.png")
    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in ("dev_accuracy", "dev_macro_f1"):
            ax.plot([h["step"] for h in evals], [h[key] for h in evals], marker="o", label=key.replace("dev_", "dev "))
        ax.set_xlabel("optimizer step")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        _save(fig, out / "metrics.png")
        plt.close(fig)
        written.append(out / "metrics.png")
    return written


def plot_confusion(matrix: list[list[int]], names: Sequence[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

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
    _save(fig, path)
    plt.close(fig)
    return path


def _save(fig, path: Path) -> None:
    from ..io import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


class TensorBoard:
    """Scalars to ``<run>/tensorboard`` (a no-op when tensorboard is not installed)."""

    def __init__(self, directory: Path, enabled: bool = True) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            self.writer = SummaryWriter(log_dir=str(directory))

    def scalars(self, values: dict, step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
