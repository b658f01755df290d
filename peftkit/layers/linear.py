"""LoRA on ``nn.Linear`` and on transformers' GPT-2 ``Conv1D`` (a Linear whose weight is stored transposed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import dropout, lora_delta_weight, lora_linear_delta
from ..ops.lora import base_up, dropout_keep, lora_down, merged_lora_linear
from .base import MergeProposal, Staged, current
from .lora import LORA_LAYERS, LoraLayer, gaussian_A_zero_B, kaiming_A_zero_B
from .siblings import SiblingGroup


class LoraLinear(LoraLayer):
    """y = W x + b + Σ s · B A dropout(x); A is (r, in), B is (out, r).

    DoRA adapters (``use_dora``) add a magnitude m per output row: y = (m / ‖W + sBA‖_row) (W + sBA) x + b, with
    the norm treated as a constant (detached) and the bias outside the rescale.

    One active LoRA adapter on a plain Linear/Conv1D runs through the fused kernels of ``peftkit.ops.lora``;
    anything else (DoRA, several active adapters, a trainable base weight, a Linear subclass with its own forward)
    takes the plain formula.
    """

    adapter_containers = ("lora_A", "lora_B", "lora_magnitude_vector")
    container_types = {"lora_magnitude_vector": nn.ParameterDict}
    supports_dora = True
    supports_mixed = True
    initializers = {"default": kaiming_A_zero_B, "gaussian": gaussian_A_zero_B}
    siblings: SiblingGroup | None = None
    weight_is_in_out = False  # GPT-2's Conv1D stores (in, out)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = self.features_of(self.inner)
        self._pristine: torch.Tensor | None = None  # the unmerged weight, kept while a DoRA adapter is merged

    @staticmethod
    def features_of(base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.in_features, base_layer.out_features

    def is_plain_base(self) -> bool:
        return type(self.base_layer) is nn.Linear  # not a subclass, not another adapter layer

    def _create_factors(self, name: str, r: int, device: torch.device, dtype: torch.dtype) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        tensors = super().adapter_tensors(name)
        if name in self.lora_magnitude_vector:
            tensors["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return tensors

    # ------------------------------------------------------------------------------------------- DoRA
    def weight_out_in(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.base_layer.weight if weight is None else weight
        return weight.T if self.weight_is_in_out else weight

    def _lora_matrix(self, name: str) -> torch.Tensor:
        """s · B A in fp32, (out, in)."""
        return lora_delta_weight(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])

    def dora_norm(self, name: str, weight_out_in: torch.Tensor | None = None) -> torch.Tensor:
        """‖W + s·B A‖ per output row, fp32, detached (DoRA treats it as a constant)."""
        weight = (self.weight_out_in() if weight_out_in is None else weight_out_in).detach().float()
        return torch.linalg.vector_norm(weight + self._lora_matrix(name).detach(), dim=1)

    def _add_magnitude(self, name: str) -> None:
        weight = self.weight_out_in(self._pristine) if self._pristine is not None else None
        norm = self.dora_norm(name, weight)
        self.lora_magnitude_vector[name] = nn.Parameter(norm.to(self.lora_A[name].weight.dtype))

    def is_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    # ------------------------------------------------------------------------------------------ merging
    def delta_weight(self, name: str, original: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW in fp32 and in the base weight's layout. For DoRA it depends on the unmerged weight W (``original``,
        base layout; default: the kept pristine weight, else the current one):
        ΔW = (m/n − 1) W + (m/n) s·B A, row by row, with n = ‖W + s·B A‖_row."""
        lora = self._lora_matrix(name)
        if self.is_dora(name):
            if original is None:
                original = self._pristine
            original = self.weight_out_in(original).detach().float()
            scale = (self.lora_magnitude_vector[name].detach().float() / self.dora_norm(name, original)).unsqueeze(1)
            lora = (scale - 1) * original + scale * lora
        return lora.T if self.weight_is_in_out else lora

    def propose_merge(self, names, staged: Staged | None = None) -> MergeProposal:
        if not any(self.is_dora(n) for n in self.adapter_names) and self._pristine is None:
            return super().propose_merge(names, staged)
        # DoRA deltas depend on the unmerged weight: keep it (from the first merge on) and compose W from it and
        # every merged delta
        names = self.new_merges(names)
        if not names:
            return MergeProposal(self, [], [])
        owner = self.inner
        pristine = self._pristine
        if pristine is None:  # plain LoRA deltas may be merged already: take them out (they do not depend on W)
            weight = current(owner.weight, staged)
            pristine = (weight.float() - sum(self.delta_weight(n) for n in self.merged_adapters)).to(weight.dtype) \
                if self.merged_adapters else weight.clone()
        composed = pristine.float() + sum(self.delta_weight(n, pristine) for n in self.merged_adapters + names)

        def keep_pristine() -> None:
            self._pristine = pristine

        return MergeProposal(self, names, [(owner, "weight", composed.to(owner.weight.dtype))], keep_pristine)

    def unmerge(self) -> None:
        if self._pristine is None:
            return super().unmerge()
        with torch.no_grad():
            self.base_layer.weight.copy_(self._pristine)  # bit for bit the weight before the first merge
        self._pristine = None
        self.merged_adapters = []

    def fused_adapter(self, x: torch.Tensor) -> str | None:
        """The adapter to run through the fused kernels, or None when the plain formula must be used."""
        active = self._unmerged_active()
        if len(active) != 1 or self.is_dora(active[0]) or not self.is_plain_base() or self.base_layer.weight.requires_grad:
            return None
        return active[0] if x.is_floating_point() else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None:
            return self.mixed_forward(x, *args, **kwargs)
        active = self._unmerged_active()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        name = self.fused_adapter(x)
        if name is None or (not self._needs_grad(name, x) and self._thin_is_cheaper(x)):
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

    # ------------------------------------------------------------------------------------ mixed batches
    def _stack(self, names: tuple[str, ...]) -> tuple[torch.Tensor, int]:
        """One row per adapter slot holding its A (r_max, in) and (s·B)ᵀ (r_max, out), flattened side by side so
        that one lookup gathers both. Slot 0 (no adapter) and the padding of smaller ranks are zeros."""
        r_max = max((self.r[n] for n in names), default=1)
        dtype = self.lora_A[names[0]].weight.dtype if names else torch.float32
        A_all = torch.zeros(len(names) + 1, r_max, self.in_features, dtype=dtype)
        Bt_all = torch.zeros(len(names) + 1, r_max, self.out_features, dtype=dtype)
        for slot, name in enumerate(names, start=1):
            r = self.r[name]
            A_all[slot, :r] = self.lora_A[name].weight
            Bt_all[slot, :r] = (self.lora_B[name].weight * self.scaling[name]).t()
        both = torch.cat([A_all.flatten(1), Bt_all.flatten(1)], dim=1)
        return both.to(self.base_layer.weight.device), r_max

    def mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Row i of the batch gets adapter ``row_adapters[i]``: the A's and B's of the rows are gathered and
        applied with one batched matmul each (as Punica / S-LoRA do), not a loop over adapters."""
        self.check_rows(x.shape[0])
        result = self.base_layer(x, *args, **kwargs)
        slots = self.row_slots(x.device)
        if self.disabled or not bool(slots.any()):
            return result
        both, r = self.stacked(self._stack)
        rows = torch.nn.functional.embedding(slots, both)  # (batch, in·r + r·out): one gather for A and B
        split = self.in_features * r
        A = rows[:, :split].view(-1, r, self.in_features).to(x.dtype)
        Bt = rows[:, split:].view(-1, r, self.out_features).to(result.dtype)
        # A·xᵀ (batch, r, tokens) runs several times faster on CPU than x·Aᵀ for a small rank
        h = torch.bmm(A, x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)).transpose(1, 2)  # (batch, tokens, r)
        out = result.view(result.shape[0], -1, result.shape[-1])
        if torch.is_grad_enabled() and (out.requires_grad or h.requires_grad):
            return torch.baddbmm(out, h, Bt).view(result.shape)
        out.baddbmm_(h, Bt)  # in place: no second pass over the output
        return result

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
            A = self.lora_A[name].weight
            if self.is_dora(name):
                result = result + self._dora_delta(x.to(A.dtype), name, base_result).to(result.dtype)
                continue
            delta = lora_linear_delta(
                x.to(A.dtype), A, self.lora_B[name].weight, self.scaling[name], self.lora_dropout[name], self.training
            )
            result = result + delta.to(result.dtype)
        return result

    def _dora_delta(self, x: torch.Tensor, name: str, result: torch.Tensor) -> torch.Tensor:
        """(m/n − 1) ⊙ W·drop(x) + (m/n) ⊙ s·B A drop(x); with dropout off: y = (m/n) ⊙ (W + sBA) x + b."""
        A, B, scaling = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        scale = self.lora_magnitude_vector[name] / self.dora_norm(name).to(A.dtype)
        p = self.lora_dropout[name]
        dropped = dropout(x, p, self.training)
        lora = F.linear(F.linear(dropped, A), B) * scaling
        if dropped is x and self.is_plain_base():  # no dropout: W x is the base output without its bias
            # (not so when base_layer is another adapter layer, e.g. BitFit's bias change: its output holds more)
            bias = self.base_layer.bias
            base = result.to(A.dtype) - (bias.to(A.dtype) if bias is not None else 0)
        else:
            base = F.linear(dropped, self.weight_out_in().to(A.dtype))
        return (scale - 1) * base + scale * lora


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
