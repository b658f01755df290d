"""LoRA on ``nn.Linear`` and on transformers' GPT-2 ``Conv1D`` (a Linear whose weight is stored transposed).

What an adapter computes is its variant's business (``variant.py``: plain LoRA; ``dora.py``); this layer owns A, B,
the choice of the fused kernels, and merges (keeping the pristine weight when a variant's delta depends on W).
Mixed batches (a different adapter per row) are applied by ``mixed.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from ...functional import lora_delta_weight
from ...ops.lora import base_up, dropout_keep, lora_down, merged_lora_linear
from ..base import MergeProposal, Staged, current
from .decode import thin_plan
from .layer import LORA_LAYERS, LoraLayer, gaussian_A_zero_B, kaiming_A_zero_B
from .mixed import mixed_lora_forward
from .siblings import SiblingGroup


class LoraLinear(LoraLayer):
    """y = W x + b + Σ_active delta of each adapter; A is (r, in), B is (out, r). Plain LoRA adds s · B A dropout(x);
    an adapter's variant (``self.variants[name]``, e.g. DoRA) may compute something else.

    One active fusable adapter (plain LoRA) on a plain Linear/Conv1D runs through the fused kernels of
    ``peftkit.ops.lora``; anything else (DoRA, several active adapters, a trainable base weight, a Linear subclass
    with its own forward) takes the plain formula.
    """

    variant_host = True
    supports_mixed = True
    initializers = {"default": kaiming_A_zero_B, "gaussian": gaussian_A_zero_B}
    siblings: SiblingGroup | None = None
    weight_is_in_out = False  # GPT-2's Conv1D stores (in, out)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = self.features_of(self.inner)
        #: the unmerged weight, kept while an adapter whose delta depends on W (DoRA) is merged
        self.pristine: torch.Tensor | None = None

    @staticmethod
    def features_of(base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.in_features, base_layer.out_features

    def is_plain_base(self) -> bool:
        return type(self.base_layer) is nn.Linear  # not a subclass, not another adapter layer

    def _create_factors(self, name: str, r: int, device: torch.device, dtype: torch.dtype) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)

    def weight_out_in(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``weight`` (default: the base weight) as an (out, in) matrix."""
        weight = self.base_layer.weight if weight is None else weight
        return weight.T if self.weight_is_in_out else weight

    def lora_matrix(self, name: str) -> torch.Tensor:
        """s · B A in fp32, (out, in)."""
        return lora_delta_weight(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])

    # ------------------------------------------------------------------------------------------ merging
    def delta_weight(self, name: str, original: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW in fp32 and in the base weight's layout. A variant whose delta depends on W gets the unmerged weight
        (``original``, base layout; default: the kept pristine weight, else the current one)."""
        variant = self.variants[name]
        if variant.depends_on_weight:
            original = self.weight_out_in(self.pristine if original is None else original).detach().float()
        delta = variant.delta_weight(self, name, original if variant.depends_on_weight else None)
        return delta.T if self.weight_is_in_out else delta

    def propose_merge(self, names, staged: Staged | None = None) -> MergeProposal:
        if not any(self.variants[n].depends_on_weight for n in self.adapter_names) and self.pristine is None:
            return super().propose_merge(names, staged)
        # deltas that depend on the unmerged weight: keep it (from the first merge on) and compose W from it and
        # every merged delta
        names = self.new_merges(names)
        if not names:
            return MergeProposal(self, [], [])
        owner = self.inner
        pristine = self.pristine
        if pristine is None:  # plain LoRA deltas may be merged already: take them out (they do not depend on W)
            weight = current(owner.weight, staged)
            pristine = (weight.float() - sum(self.delta_weight(n) for n in self.merged_adapters)).to(weight.dtype) \
                if self.merged_adapters else weight.clone()
        composed = pristine.float() + sum(self.delta_weight(n, pristine) for n in self.merged_adapters + names)

        def keep_pristine() -> None:
            self.pristine = pristine

        return MergeProposal(self, names, [(owner, "weight", composed.to(owner.weight.dtype))], keep_pristine)

    def unmerge(self) -> None:
        if self.pristine is None:
            return super().unmerge()
        with torch.no_grad():
            self.base_layer.weight.copy_(self.pristine)  # bit for bit the weight before the first merge
        self.pristine = None
        self.merged_adapters = []

    # ------------------------------------------------------------------------------------------ forward
    def fused_adapter(self, x: torch.Tensor, active: tuple[str, ...] | None = None) -> str | None:
        """The adapter to run through the fused kernels, or None when the plain formula must be used."""
        active = self._unmerged_active() if active is None else active
        if len(active) != 1 or not self.variants[active[0]].fusable or not self.is_plain_base() \
                or self.base_layer.weight.requires_grad:
            return None
        return active[0] if x.is_floating_point() else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None:
            return mixed_lora_forward(self, x, *args, **kwargs)
        if not args and not kwargs and not (torch.is_grad_enabled() and x.requires_grad):
            plan = thin_plan(self, x)  # few tokens, no gradients (decoding): the path chosen once, re-checked cheaply
            if plan is not None and not plan.needs_grad():
                return plan(x)
        active = self._unmerged_active()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        name = self.fused_adapter(x, active)
        if name is None or (not self._needs_grad(name, x) and self._thin_is_cheaper(x)):
            # (the fused kernels would form W + s·BA: for a few tokens without gradients the formula is cheaper)
            return self._plain_forward(x, active, *args, **kwargs)
        # one compute dtype for everything: autocast's if it is on, else the input's; fp32 master weights of
        # the adapter receive their gradients through the casts
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        cast = (lambda t: t if t is None or t.dtype == dtype else t.to(dtype))
        with torch.autocast(device, enabled=False):
            return self._fused(name, x, cast)

    def _fused(self, name: str, x: torch.Tensor, cast) -> torch.Tensor:
        weight, bias = cast(self.base_layer.weight), cast(self.base_layer.bias)
        A, B, scaling = cast(self.lora_A[name].weight), cast(self.lora_B[name].weight), self.scaling[name]
        x = cast(x)
        p = self.lora_dropout[name] if self.training else 0.0
        if p == 0.0:
            return merged_lora_linear(x, weight, bias, A, B, scaling, self.weight_is_in_out)
        if self.siblings is not None and self.shared_dropout_mask.get(name, False):
            h, keep, scale = self.siblings.down(self, name, x, p, cast)
        else:
            keep, scale = dropout_keep(x, p)
            h = lora_down(x, keep, scale, A)
        return base_up(x, weight, bias, h, B, A, keep, scaling, scale, self.weight_is_in_out)

    def _needs_grad(self, name: str, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (
            x.requires_grad or self.lora_A[name].weight.requires_grad or self.lora_B[name].weight.requires_grad
        )

    def _thin_is_cheaper(self, x: torch.Tensor) -> bool:
        """Without gradients, forming W + s·BA only pays off once there are enough tokens."""
        tokens = x.numel() // self.in_features
        return tokens * (self.in_features + self.out_features) < self.in_features * self.out_features

    def _plain_forward(self, x: torch.Tensor, active: tuple[str, ...], *args, **kwargs) -> torch.Tensor:
        result = base_result = self.base_layer(x, *args, **kwargs)
        for name in active:
            delta = self.variants[name].delta(self, name, x.to(self.lora_A[name].weight.dtype), base_result)
            result = result + delta.to(result.dtype)
        return result


class LoraConv1D(LoraLinear):
    """GPT-2's ``Conv1D`` stores its weight as (in, out); the LoRA factors keep Linear's orientation."""

    weight_is_in_out = True

    @staticmethod
    def features_of(base_layer: nn.Module) -> tuple[int, int]:
        return tuple(base_layer.weight.shape)  # (in, out)

    def is_plain_base(self) -> bool:
        klass = type(self.base_layer)
        return klass.__name__ == "Conv1D" and klass.__module__ == "transformers.pytorch_utils"


LORA_LAYERS.register(nn.Linear, LoraLinear)
LORA_LAYERS.register("transformers.pytorch_utils.Conv1D", LoraConv1D)
