"""The toy method's layer: y = W x + b + s ⊙ (M x), with a learned per-output scale s (zeros at init: the layer
starts as the identity) and a frozen random matrix M that every targeted layer of one shape shares (the method's
"extra shared tensor", saved once per adapter through the method's paired file hooks)."""

from __future__ import annotations

import torch
from torch import nn

from peftkit.layers.base import AdapterLayer, LayerRegistry


class ToyLinear(AdapterLayer):
    adapter_containers = ("toy_scale",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.toy_scale = nn.ParameterDict()
        self.shared: dict[str, torch.Tensor] = {}  # adapter name -> M (the method's tensor, not a parameter here)

    def add_adapter(self, name: str, shared: torch.Tensor) -> None:
        weight = self.inner.weight
        self.toy_scale[name] = nn.Parameter(torch.zeros(weight.shape[0], device=weight.device))
        self.shared[name] = shared

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"toy_scale": self.toy_scale[name]}

    def _forget(self, name: str) -> None:
        self.shared.pop(name, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.toy_scale[name].float()[:, None] * self.shared[name].float()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for name in self._unmerged_active():
            out = out + (x @ self.shared[name].to(x.dtype).T) * self.toy_scale[name].to(x.dtype)
        return out


TOY_LAYERS = LayerRegistry("toy")
TOY_LAYERS.register(nn.Linear, ToyLinear)
