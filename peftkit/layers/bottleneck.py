"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020; He et al. 2022) wrapped around one module.

sequential:  y = M(x) + s · U f(D M(x))      (after the module's output, before the residual add and LayerNorm)
parallel:    y = M(x) + s · U f(D h)         (h: the module's own input, or the input of a sibling ``source``
                                              module, e.g. BERT's ``intermediate`` when M is ``output.dense``)

D: d -> m and U: m -> d with m = d / reduction_factor. U starts at zero, so the adapter starts as the identity.
There is a nonlinearity between D and U: the adapter cannot be folded into the base weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import AdapterLayer

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckLayer(AdapterLayer):
    adapter_containers = ("adapter_down", "adapter_up")
    mergeable = False
    supports_mixed = True

    def __init__(self, base_layer: nn.Module, width: int) -> None:
        super().__init__(base_layer)
        self.width = width
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.activation: dict[str, nn.Module] = {}
        self.scale: dict[str, float] = {}
        self.parallel: dict[str, bool] = {}
        self._source_input: torch.Tensor | None = None  # set by a hook on the source module (parallel placement)

    def add_adapter(self, name: str, bottleneck: int, nonlinearity: str, scale: float, parallel: bool) -> None:
        weight = next(self.base_layer.parameters(), None)
        device = weight.device if weight is not None else None
        down = nn.Linear(self.width, bottleneck, device=device)
        up = nn.Linear(bottleneck, self.width, device=device)
        with torch.no_grad():
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.weight)  # near-identity: the adapter adds nothing at first
            nn.init.zeros_(up.bias)
        self.adapter_down[name], self.adapter_up[name] = down, up
        self.activation[name] = ACTIVATIONS[nonlinearity]()
        self.scale[name] = scale
        self.parallel[name] = parallel

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        down, up = self.adapter_down[name], self.adapter_up[name]
        return {"adapter_down.weight": down.weight, "adapter_down.bias": down.bias,
                "adapter_up.weight": up.weight, "adapter_up.bias": up.bias}

    def _forget(self, name: str) -> None:
        for table in (self.activation, self.scale, self.parallel):
            table.pop(name, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError(
            "bottleneck adapters have a nonlinearity between their two projections, so they cannot be merged into "
            "the base weights; keep the adapter (or train LoRA if you need a merged model)"
        )

    def _delta(self, name: str, x: torch.Tensor, out: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        h = (source if source is not None else x) if self.parallel[name] else out
        down, up = self.adapter_down[name], self.adapter_up[name]
        return (up(self.activation[name](down(h.to(down.weight.dtype)))) * self.scale[name]).to(out.dtype)

    def forward(self, x, *args, **kwargs):
        out = self.base_layer(x, *args, **kwargs)
        source = self._source_input
        self._source_input = None
        if self.row_adapters is not None:
            return self._mixed(x, out, source)
        for name in self._unmerged_active():
            out = out + self._delta(name, x, out, source)
        return out

    def _mixed(self, x: torch.Tensor, out: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        """Each adapter runs on its own rows only (the nonlinearity rules out one gathered matmul)."""
        self.check_rows(out.shape[0])
        if self.disabled:
            return out
        result = out
        for name in dict.fromkeys(self.row_adapters):
            if name is None or name not in self.adapter_down:
                continue
            rows = torch.tensor([i for i, n in enumerate(self.row_adapters) if n == name], device=out.device)
            delta = self._delta(name, x[rows], out[rows], source[rows] if source is not None else None)
            result = result.index_add(0, rows, delta)
        return result

    def unwrapped(self, merged: bool) -> nn.Module:
        if merged and self.merged_adapters:
            raise NotImplementedError("bottleneck adapters cannot be merged")
        hook = getattr(self, "_source_hook", None)
        if hook is not None:
            hook.remove()
        return self.base_layer

    def capture_source(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook on the source module: remember its input for this layer's next call."""
        self._source_input = args[0]
