"""The run's curves (matplotlib) and TensorBoard events; a task's own metrics and plots live with the task."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def plot_history(history: list[dict], out: Path, curves: Sequence[str] = ()) -> list[Path]:
    """Loss and metric curves (PNG); ``curves``: the task's metrics recorded as ``dev_<name>``."""
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
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, out / "loss.png")
    plt.close(fig)
    written.append(out / "loss.png")
    if evals and curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        values = []
        for name in curves:
            values += [h[f"dev_{name}"] for h in evals]
            ax.plot([h["step"] for h in evals], [h[f"dev_{name}"] for h in evals], marker="o", label=f"dev {name}")
        ax.set_xlabel("optimizer step")
        if all(0 <= v <= 1 for v in values):  # rates (accuracy, F1) on a fixed scale; perplexity scales itself
            ax.set_ylim(0, 1)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        save_png(fig, out / "metrics.png")
        plt.close(fig)
        written.append(out / "metrics.png")
    return written


def save_png(fig, path: Path) -> None:
    from ..atomic import atomic_write

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
