"""BitFit (Ben Zaken et al. 2022): only bias terms train. Here each adapter holds its own bias *change* δb.

y = M(x) + δb (along the output features; the channel dimension for Conv2d). Training δb from zero is the same as
training b itself, but kept apart it gives BitFit what adapters have: it can be disabled, deleted, stacked,
served beside other adapters from one base model, and merged (b ← b + δb).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterLayer, LayerRegistry, MergeProposal, Staged, current

BITFIT_LAYERS = LayerRegistry("BitFit")


class BiasDelta(AdapterLayer):
    adapter_containers = ("bias_delta",)
    channel_dim = -1
    supports_mixed = True

    def __init__(self, base_layer: nn.Module) -> None:
        if getattr(base_layer, "bias", None) is None:
            raise ValueError(f"{type(base_layer).__name__} has no bias to tune")
        super().__init__(base_layer)
        self.bias_delta = nn.ParameterDict()

    def add_adapter(self, name: str) -> None:
        bias = self.base_layer.bias
        dtype = bias.dtype if bias.dtype in (torch.float32, torch.float64) else torch.float32
        self.bias_delta[name] = nn.Parameter(torch.zeros(bias.shape, device=bias.device, dtype=dtype))

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"bias_delta": self.bias_delta[name]}

    def _shaped(self, delta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.channel_dim == -1:
            return delta
        return delta.view(-1, *([1] * (out.dim() - 2)))

    def forward(self, x, *args, **kwargs):
        out = self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            self.check_rows(out.shape[0])
            if self.disabled:
                return out
            deltas = self.stacked(lambda names: torch.stack([torch.zeros_like(self.base_layer.bias, dtype=torch.float32)]
                                                             + [self.bias_delta[n].float() for n in names]))
            per_row = deltas[self.row_slots(out.device)].to(out.dtype)  # (batch, channels)
            shape = (out.shape[0],) + ((1,) * (out.dim() - 2) + (-1,) if self.channel_dim == -1 else (-1,) + (1,) * (out.dim() - 2))
            return out + per_row.view(shape)
        for name in self._unmerged_active():
            out = out + self._shaped(self.bias_delta[name], out).to(out.dtype)
        return out

    # merging acts on the bias, not the weight
    def propose_merge(self, names, staged: Staged | None = None) -> MergeProposal:
        names = self.new_merges(names)
        if not names:
            return MergeProposal(self, [], [])
        owner = self.inner
        new = current(owner.bias, staged).float() + sum(self.bias_delta[n].detach().float() for n in names)
        return MergeProposal(self, names, [(owner, "bias", new.to(owner.bias.dtype))])

    def _unmerge_one(self, name: str) -> None:
        bias = self.base_layer.bias
        with torch.no_grad():
            bias.copy_((bias.detach().float() - self.bias_delta[name].detach().float()).to(bias.dtype))


class ConvBiasDelta(BiasDelta):
    channel_dim = 1


for kind in (nn.Linear, nn.LayerNorm, "transformers.pytorch_utils.Conv1D"):
    BITFIT_LAYERS.register(kind, BiasDelta)
BITFIT_LAYERS.register(nn.Conv2d, ConvBiasDelta)
