"""The base of every adapter method: ``peftkit train`` adds the adapter to the task model (``adapt``), saves it
as an adapter folder (``save_adapter``), reloads it strictly into a fresh model (``load_adapter``) and merges it
(``merge_and_unload``). Full fine-tuning, which trains the model itself, derives from ``Method`` directly."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import AdapterConfig
from ..model import adapt, load_adapter
from .registry import Method


class AdapterMethod(Method):
    """A method that trains an adapter on a frozen base (every built-in method but full fine-tuning)."""

    def prepare(self, model: nn.Module, config: AdapterConfig) -> nn.Module:
        return adapt(model, config)

    def save(self, model: nn.Module, folder: Path) -> None:
        model.save_adapter(Path(folder) / self.artifact)

    def load(self, model: nn.Module, folder: Path) -> nn.Module:
        return load_adapter(model, Path(folder) / self.artifact)

    def merged(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()
