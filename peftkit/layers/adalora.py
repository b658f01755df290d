"""AdaLoRA's SVD-form adapter on Linear / GPT-2 Conv1D: ΔW = P · diag(E) · Q (B · diag(E) · A in PEFT's names).

y = W x + b + (dropout(x) (A ⊙ E)ᵀ Bᵀ) · alpha / (ranknum + 1e-5), where ranknum is the initial rank (it stays
fixed when triplets are masked or pruned, so the scale never jumps). E starts at zero (identity at init),
A and B ~ N(0, 0.02²). The rank budget itself is managed by ``peftkit.methods.adalora.RankAllocator``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import dropout
from .base import AdapterLayer, LayerRegistry

ADALORA_LAYERS = LayerRegistry("AdaLoRA")


class SVDLinear(AdapterLayer):
    adapter_containers = ("lora_A", "lora_E", "lora_B")
    weight_is_in_out = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        weight = base_layer.weight
        self.in_features, self.out_features = (weight.shape[0], weight.shape[1]) if self.weight_is_in_out else \
            (weight.shape[1], weight.shape[0])
        self.lora_A = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.ranknum: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, ranknum: float) -> None:
        from .lora import check_rank

        check_rank(self.inner, r, minimum=0)  # AdaLoRA may prune a layer's rank to 0
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        factory = {"device": weight.device, "dtype": dtype}
        self.lora_A[name] = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_E[name] = nn.Parameter(torch.zeros(r, 1, **factory))
        self.lora_B[name] = nn.Parameter(torch.empty(self.out_features, r, **factory))
        with torch.no_grad():
            nn.init.normal_(self.lora_A[name], std=0.02)
            nn.init.normal_(self.lora_B[name], std=0.02)
        self.ranknum[name] = float(ranknum)
        self.scaling[name] = alpha if alpha > 0 else float(r)
        self.lora_dropout[name] = dropout

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A[name], "lora_E": self.lora_E[name], "lora_B": self.lora_B[name]}

    def _forget(self, name: str) -> None:
        for table in (self.ranknum, self.scaling, self.lora_dropout):
            table.pop(name, None)

    def scale(self, name: str) -> float:
        return self.scaling[name] / (self.ranknum[name] + 1e-5)

    def delta_weight(self, name: str) -> torch.Tensor:
        A, E, B = (t.float() for t in (self.lora_A[name], self.lora_E[name], self.lora_B[name]))
        delta = (B @ (A * E)) * self.scale(name)
        return delta.T if self.weight_is_in_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self._unmerged_active():
            A, E, B = self.lora_A[name], self.lora_E[name], self.lora_B[name]
            h = dropout(x.to(A.dtype), self.lora_dropout[name], self.training)
            result = result + (F.linear(F.linear(h, A * E), B) * self.scale(name)).to(result.dtype)
        return result

    def resize(self, name: str, keep: torch.Tensor) -> None:
        """Keep only the triplets marked in ``keep`` (a bool vector over the current rank)."""
        with torch.no_grad():
            for holder, rows in ((self.lora_A, True), (self.lora_E, True), (self.lora_B, False)):
                old = holder[name]
                holder[name] = nn.Parameter(old[keep].clone() if rows else old[:, keep].clone(),
                                            requires_grad=old.requires_grad)


class SVDConv1D(SVDLinear):
    weight_is_in_out = True


ADALORA_LAYERS.register(nn.Linear, SVDLinear)
ADALORA_LAYERS.register("transformers.pytorch_utils.Conv1D", SVDConv1D)
