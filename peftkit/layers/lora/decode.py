"""The decoding fast path of a LoRA Linear: a few tokens, no gradients, one plain adapter.

A decoder step at batch 1 is a chain of matrix-vector products. The adapter's own kernels (A x, then B h added
into the output) are tiny, so most of what an unmerged adapter costs there is Python: choosing a path for each of
~200 layers at every token. ``ThinPlan`` makes that choice once per layer and keeps the tensors it needs; a call
only re-checks, with plain attribute and dict reads, that the plan still describes the layer (the same active
adapters, nothing merged or disabled, the same tensor objects, B not changed in place, the same scaling).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .linear import LoraLinear


class ThinPlan:
    """y = W x + b + s · B (A x) for one adapter of one layer, as three kernels."""

    __slots__ = ("active", "merged", "training", "name", "weight", "bias", "A", "B", "B_version", "Bt", "scaling",
                 "in_out", "in_features", "max_tokens")

    def __init__(self, layer: "LoraLinear", name: str) -> None:
        base = layer.base_layer
        self.active, self.merged, self.training = layer.active_adapters, len(layer.merged_adapters), layer.training
        self.name, self.scaling, self.in_out = name, layer.scaling[name], layer.weight_is_in_out
        self.weight, self.bias = base.weight, base.bias
        self.A, self.B = layer.lora_A[name].weight, layer.lora_B[name].weight
        self.B_version = self.B._version
        # a contiguous (r, out) right factor: CPU addmm runs about twice as fast as on the transposed view of B
        self.Bt = self.B.detach().t().contiguous()
        self.in_features = layer.in_features
        # forming W + s·BA costs in·out; the thin path costs tokens·(in + out): thin only below that
        self.max_tokens = (layer.in_features * layer.out_features) // (layer.in_features + layer.out_features)

    def describes(self, layer: "LoraLinear") -> bool:
        """Whether the layer is still in the state this plan was made for."""
        base = layer._modules["base_layer"]._parameters
        return (
            layer.active_adapters == self.active and len(layer.merged_adapters) == self.merged
            and layer.training == self.training and not layer.disabled and layer.row_adapters is None
            and base["weight"] is self.weight and base.get("bias") is self.bias
            and layer._modules["lora_A"]._modules[self.name]._parameters["weight"] is self.A
            and layer._modules["lora_B"]._modules[self.name]._parameters["weight"] is self.B
            and self.B._version == self.B_version and layer.scaling.get(self.name) == self.scaling
        )

    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and (self.A.requires_grad or self.B.requires_grad)

    def accepts(self, x: torch.Tensor) -> bool:
        return x.dtype == self.weight.dtype and x.numel() // self.in_features < self.max_tokens \
            and not torch.is_autocast_enabled(x.device.type)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.in_out:  # GPT-2's Conv1D: the weight is (in, out)
            out = torch.addmm(self.bias, x2, self.weight) if self.bias is not None else torch.mm(x2, self.weight)
        else:
            out = F.linear(x2, self.weight, self.bias)
        out.addmm_(F.linear(x2, self.A), self.Bt, alpha=self.scaling)
        return out.view(*x.shape[:-1], out.shape[-1])


def thin_plan(layer: "LoraLinear", x: torch.Tensor) -> ThinPlan | None:
    """The layer's cached plan if this no-gradient call can take the thin path, else None (use the general path)."""
    plan = layer.__dict__.get("_thin_plan")
    if plan is None or not plan.describes(layer):
        plan = layer._thin_plan = _new_plan(layer, x)
        if plan is None:
            return None
    return plan if plan.accepts(x) else None


def _new_plan(layer: "LoraLinear", x: torch.Tensor) -> ThinPlan | None:
    if layer.row_adapters is not None or not x.is_floating_point():
        return None
    active = layer._unmerged_active()
    if len(active) != 1 or len(layer.active_adapters) != 1:
        return None
    name = active[0]
    if not layer.variants[name].fusable or not layer.is_plain_base() or (layer.training and layer.lora_dropout[name]):
        return None
    if layer.lora_A[name].weight.dtype != layer.base_layer.weight.dtype:
        return None
    return ThinPlan(layer, name)
