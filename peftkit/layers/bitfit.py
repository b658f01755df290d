"""Per-adapter changes of a base module's bias (and of a LayerNorm's weight): BitFit, and every method that trains
base parameters (LoRA's ``bias="all"``/``"lora_only"``, bottleneck's ``train_layer_norms``).

y = M(x) + δb (along the output features; the channel dimension for Conv2d); for a LayerNorm with a weight change
also + δw ⊙ norm(x). Training δ from zero is the same as training b (w) itself, but kept apart it gives these
adapters what other adapters have: the shared base never changes, so they can be disabled, deleted, stacked,
served beside other adapters from one base model, and merged (b ← b + δb).

An adapter's changes are saved in one of two forms (``DeltaForm``): as the change itself (BitFit's ``bias_delta``)
or, as Hugging Face PEFT writes trained base biases, as the full value base + δ under the base parameter's key;
``saved_tensors``/``load_tensor`` convert between the live change and that file value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, LayerRegistry, MergeProposal, Staged, current

BITFIT_LAYERS = LayerRegistry("BitFit")


@dataclass(frozen=True)
class DeltaForm:
    """How one adapter's changes are named and valued in its file."""

    bias_key: str = "bias_delta"  # file suffix of the bias change
    weight_key: str | None = None  # file suffix of the weight change (LayerNorm only); None: no weight change
    full: bool = False  # the file holds base + δ (PEFT's form for trained base parameters), not δ


class BiasDelta(AdapterLayer):
    adapter_containers = ("bias_delta", "weight_delta")
    channel_dim = -1
    supports_mixed = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        if getattr(self.inner, "bias", None) is None:
            raise ValueError(f"{type(self.inner).__name__} has no bias to tune")
        self.bias_delta = nn.ParameterDict()
        self.weight_delta = nn.ParameterDict()
        self.forms: dict[str, DeltaForm] = {}

    def add_adapter(self, name: str, form: DeltaForm = DeltaForm()) -> None:
        if form.weight_key is not None and not isinstance(self.inner, nn.LayerNorm):
            raise TypeError(f"a per-adapter weight change is implemented for LayerNorm only, not {type(self.inner).__name__}")
        self.bias_delta[name] = self._zeros(self.inner.bias)
        if form.weight_key is not None:
            self.weight_delta[name] = self._zeros(self.inner.weight)
        self.forms[name] = form

    @staticmethod
    def _zeros(like: torch.Tensor) -> nn.Parameter:
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        return nn.Parameter(torch.zeros(like.shape, device=like.device, dtype=dtype))

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        form = self.forms[name]
        tensors = {form.bias_key: self.bias_delta[name]}
        if name in self.weight_delta:
            tensors[form.weight_key] = self.weight_delta[name]
        return tensors

    def _forget(self, name: str) -> None:
        self.forms.pop(name, None)

    # ---------------------------------------------------------------------------------------- file values
    def _base_values(self) -> dict[str, torch.Tensor]:
        """The base bias (weight) without any merged adapter's change: what a full file value is relative to."""
        values = {"bias": self.inner.bias.detach().float()}
        if isinstance(self.inner, nn.LayerNorm) and self.inner.weight is not None:
            values["weight"] = self.inner.weight.detach().float()
        for merged in self.merged_adapters:
            values["bias"] = values["bias"] - self.bias_delta[merged].detach().float()
            if merged in self.weight_delta:
                values["weight"] = values["weight"] - self.weight_delta[merged].detach().float()
        return values

    def _offsets(self, name: str) -> dict[str, torch.Tensor]:
        """File suffix -> what the file value adds to the live change (the base value, or nothing)."""
        form = self.forms[name]
        if not form.full:
            return {}
        base = self._base_values()
        offsets = {form.bias_key: base["bias"]}
        if name in self.weight_delta:
            offsets[form.weight_key] = base["weight"]
        return offsets

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        offsets = self._offsets(name)
        return {suffix: (delta.detach().float() + offsets[suffix]).to(self.inner.bias.dtype) if suffix in offsets
                else delta for suffix, delta in self.adapter_tensors(name).items()}

    def load_tensor(self, name: str, suffix: str, value: torch.Tensor) -> None:
        offset = self._offsets(name).get(suffix)
        delta = self.adapter_tensors(name)[suffix]
        value = value.to(device=delta.device, dtype=torch.float32 if offset is not None else delta.dtype)
        with torch.no_grad():
            delta.copy_(value - offset.to(value.device) if offset is not None else value)

    # -------------------------------------------------------------------------------------------- forward
    def _shaped(self, delta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.channel_dim == -1:
            return delta
        return delta.view(-1, *([1] * (out.dim() - 2)))

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.inner
        return F.layer_norm(x, norm.normalized_shape, None, None, norm.eps)

    def forward(self, x, *args, **kwargs):
        out = self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            return self._mixed(x, out)
        for name in self._unmerged_active():
            out = out + self._shaped(self.bias_delta[name], out).to(out.dtype)
            if name in self.weight_delta:
                out = out + (self._normalized(x) * self.weight_delta[name]).to(out.dtype)
        return out

    def _mixed(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        self.check_rows(out.shape[0])
        if self.disabled:
            return out
        deltas = self.stacked(lambda names: torch.stack([torch.zeros_like(self.inner.bias, dtype=torch.float32)]
                                                         + [self.bias_delta[n].float() for n in names]))
        slots = self.row_slots(out.device)
        per_row = deltas[slots].to(out.dtype)  # (batch, channels)
        shape = (out.shape[0],) + ((1,) * (out.dim() - 2) + (-1,) if self.channel_dim == -1 else (-1,) + (1,) * (out.dim() - 2))
        out = out + per_row.view(shape)
        if len(self.weight_delta):
            names = self.adapter_names
            weights = torch.stack([torch.zeros_like(self.inner.bias, dtype=torch.float32)]
                                  + [self.weight_delta[n].float() if n in self.weight_delta
                                     else torch.zeros_like(self.inner.bias, dtype=torch.float32) for n in names])
            out = out + (self._normalized(x) * weights[slots].to(out.dtype).view(shape)).to(out.dtype)
        return out

    # merging acts on the bias (and a LayerNorm's weight), never on another layer's weight
    def propose_merge(self, names, staged: Staged | None = None) -> MergeProposal:
        names = self.new_merges(names)
        if not names:
            return MergeProposal(self, [], [])
        owner = self.inner
        bias = current(owner.bias, staged).float() + sum(self.bias_delta[n].detach().float() for n in names)
        updates = [(owner, "bias", bias.to(owner.bias.dtype))]
        scaled = [n for n in names if n in self.weight_delta]
        if scaled:
            weight = current(owner.weight, staged).float() + sum(self.weight_delta[n].detach().float() for n in scaled)
            updates.append((owner, "weight", weight.to(owner.weight.dtype)))
        return MergeProposal(self, names, updates)

    def _unmerge_one(self, name: str) -> None:
        pairs = [(self.inner.bias, self.bias_delta[name])]
        if name in self.weight_delta:
            pairs.append((self.inner.weight, self.weight_delta[name]))
        with torch.no_grad():
            for base, delta in pairs:
                base.copy_((base.detach().float() - delta.detach().float()).to(base.dtype))


class ConvBiasDelta(BiasDelta):
    channel_dim = 1


for kind in (nn.Linear, nn.LayerNorm, "transformers.pytorch_utils.Conv1D"):
    BITFIT_LAYERS.register(kind, BiasDelta)
BITFIT_LAYERS.register(nn.Conv2d, ConvBiasDelta)
