"""Modules trained fully and saved with an adapter (typically a freshly initialised classification head).

Each adapter gets its own trainable copy of the module; the original stays frozen as ``base_layer`` and is
used when no active adapter has a copy or when adapters are disabled.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from .base import AdapterLayer, MergeProposal, Staged


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
        if self.row_adapters is not None:
            return self.mixed_forward(*args, **kwargs)
        return self._selected()(*args, **kwargs)

    # ------------------------------------------------------------------------------------ mixed batches
    @property
    def supports_mixed(self) -> bool:  # linear heads only (their label counts may differ)
        return isinstance(self.base_layer, nn.Linear) and all(isinstance(m, nn.Linear) for m in self.modules_to_save.values())

    def _stack(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        heads = [self.base_layer] + [self.modules_to_save[n] for n in names]
        width = max(h.out_features for h in heads)
        weight = torch.zeros(len(heads), width, self.base_layer.in_features, dtype=heads[-1].weight.dtype)
        bias = torch.zeros(len(heads), width, dtype=weight.dtype)
        for slot, head in enumerate(heads):
            weight[slot, : head.out_features] = head.weight
            if head.bias is not None:
                bias[slot, : head.out_features] = head.bias
        device = self.base_layer.weight.device
        return weight.to(device), bias.to(device)

    def mixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each row through its own adapter's head; rows are padded to the widest head (extra logits are 0)."""
        self.check_rows(x.shape[0])
        weight, bias = self.stacked(self._stack)
        slots = self.row_slots(x.device) if not self.disabled else torch.zeros(x.shape[0], dtype=torch.long)
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        out = torch.baddbmm(bias[slots].unsqueeze(1).to(x.dtype), rows, weight[slots].transpose(1, 2).to(x.dtype))
        return out.view(*x.shape[:-1], weight.shape[1])

    # nothing to fold into weights: the copy simply replaces the original when unloading with merge
    def propose_merge(self, names: Iterable[str], staged: Staged | None = None) -> MergeProposal:
        return MergeProposal(self, [], [])

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
