"""Sibling LoRA layers: projections of one block that usually read the same tensor (q, k, v).

Only for adapters created with ``shared_dropout_mask=True`` (an opt-in speed mode; by default every layer draws
its own mask, as PEFT does). With dropout in training, the first sibling to run then draws one dropout mask for
the input and computes the down-projections of all siblings in one pass; the siblings that follow with the very
same input tensor take their slice. A sibling that receives a different tensor (k/v of cross-attention, or an
output projection grouped with q/k/v) computes its own; the wasted work is r extra columns of a thin matmul.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...ops.lora import dropout_keep, lora_down

if TYPE_CHECKING:
    from .linear import LoraLinear

Down = tuple[torch.Tensor, torch.Tensor, float]  # (h, keep mask, 1/(1-p))


class SiblingGroup:
    def __init__(self, members: list["LoraLinear"]) -> None:
        self.members = members
        self._source: weakref.ref | None = None
        self._pending: dict[int, Down] = {}

    def down(self, layer: "LoraLinear", name: str, x: torch.Tensor, p: float, cast=lambda t: t) -> Down:
        """(dropout(x) Aᵀ, mask, rescale) for ``layer``'s adapter ``name``, shared with its siblings.

        ``x`` is already in the compute dtype; ``cast`` brings each sibling's A to it."""
        if self._source is not None and self._source() is x and id(layer) in self._pending:
            return self._pending.pop(id(layer))
        group = [m for m in self.members if m.fused_adapter(x) == name and m.lora_dropout[name] == p
                 and m.shared_dropout_mask[name]]
        if layer not in group:
            group = [layer]
        keep, scale = dropout_keep(x, p)
        h = lora_down(x, keep, scale, *(cast(m.lora_A[name].weight) for m in group))
        slices = h.split([m.r[name] for m in group], dim=-1)
        self._pending = {id(m): (s, keep, scale) for m, s in zip(group, slices) if m is not layer}
        self._source = weakref.ref(x) if self._pending else None
        return slices[group.index(layer)], keep, scale


def group_siblings(model: nn.Module, layer_type: type) -> None:
    """Group the ``layer_type`` layers that share a parent module and an input width."""
    groups: dict[tuple[str, int], list] = defaultdict(list)
    for path, module in model.named_modules():
        if type(module) is layer_type:
            groups[(path.rpartition(".")[0], module.in_features)].append(module)
    for members in groups.values():
        group = SiblingGroup(members) if len(members) > 1 else None
        for member in members:
            member.siblings = group
