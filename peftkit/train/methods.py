"""``peftkit train``'s view of a method (a transitional shim over the method registry, ``peftkit.methods``).

Every registered method is a training method: its ``Method`` object carries the learning rate, the CLI section
(``RunConfig``), and the prepare/save/load/merged hooks. ``get(name)`` adapts it to the interface the trainer
uses today (a run config instead of a library config); nothing here branches on method names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..methods import Method, available_methods, get_method

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"


class TrainingMethod:
    """A registered method seen from the trainer: hooks that take the run config."""

    def __init__(self, method: Method) -> None:
        self.method = method
        self.name = method.name
        self.default_lr = method.default_lr
        self.adapter = method.adapter
        self.artifact = method.artifact
        # (model, batch, example keys, run config, store) -> logits; None: the model's own forward
        self.logits: Callable[..., torch.Tensor] | None = self._logits if method.train_logits is not None else None

    def prepare(self, model: nn.Module, run_config: Any, run_info: dict) -> nn.Module:
        return self.method.prepare(model, run_config.method_config(run_info))

    def save(self, model: nn.Module, run_dir: Path) -> None:
        self.method.save(model, Path(run_dir))

    def load(self, model: nn.Module, run_dir: Path) -> nn.Module:
        return self.method.load(model, Path(run_dir))

    def merged(self, model: nn.Module) -> nn.Module:
        return self.method.merged(model)

    def _logits(self, model: nn.Module, batch: dict, keys: list, run_config: Any, store: dict) -> torch.Tensor:
        return self.method.train_logits(model, batch, keys, run_config.method_config(), store)


def available() -> list[str]:
    return available_methods()


def get(name: str) -> TrainingMethod:
    try:
        return TrainingMethod(get_method(name))
    except KeyError:
        raise KeyError(f"unknown training method {name!r}; available: {', '.join(available_methods())}") from None
