"""Modules trained fully and saved with an adapter (typically a freshly initialised classification head).

Each adapter gets its own trainable copy of the module; the original stays frozen as ``base_layer`` and is
used when no active adapter has a copy or when adapters are disabled.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from .base import AdapterLayer


class ModulesToSave(AdapterLayer):
    adapter_containers = ("modules_to_save",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.base_layer)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[name].named_parameters())

    def _selected(self) -> nn.Module:
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.base_layer

    def forward(self, *args, **kwargs):
        return self._selected()(*args, **kwargs)

    # nothing to fold into weights: the copy simply replaces the original when unloading with merge
    def merge(self, names: Iterable[str], safe: bool = False) -> None:
        pass

    def unmerge(self) -> None:
        pass

    def unwrapped(self, merged: bool) -> nn.Module:
        return self._selected() if merged else self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self._selected().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self._selected(), "bias", None)
