"""DoRA (Liu et al. 2024) as a LoRA variant: a learned magnitude m per output row of the adapted weight.

y = (m / ‖W + s·B A‖_row) ⊙ (W + s·B A) x + b, with the norm treated as a constant (detached) and the bias outside
the rescale. m is stored as ``lora_magnitude_vector`` (PEFT's key) and starts at ‖W‖_row, so the adapter starts as
the identity. The delta depends on W, so a merge composes from the unmerged weight (``depends_on_weight``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ...functional import dropout
from .variant import LoraVariant

if TYPE_CHECKING:
    from .linear import LoraLinear

MAGNITUDE = "lora_magnitude_vector"


def row_norm(layer: "LoraLinear", name: str, weight_out_in: torch.Tensor | None = None) -> torch.Tensor:
    """‖W + s·B A‖ per output row, fp32, detached (DoRA treats it as a constant). W: the current base weight
    unless ``weight_out_in`` is given."""
    weight = (layer.weight_out_in() if weight_out_in is None else weight_out_in).detach().float()
    return torch.linalg.vector_norm(weight + layer.lora_matrix(name).detach(), dim=1)


class DoraVariant(LoraVariant):
    name = "DoRA"
    depends_on_weight = True
    fusable = False

    def init(self, layer: "LoraLinear", name: str) -> None:
        # a DoRA adapter added while others are merged starts from the unmerged weight
        weight = layer.weight_out_in(layer.pristine) if layer.pristine is not None else None
        magnitude = row_norm(layer, name, weight).to(layer.lora_A[name].weight.dtype)
        layer.adapter_container(MAGNITUDE)[name] = nn.Parameter(magnitude)

    def tensors(self, layer: "LoraLinear", name: str) -> dict[str, torch.Tensor]:
        return {MAGNITUDE: getattr(layer, MAGNITUDE)[name]}

    def delta(self, layer: "LoraLinear", name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """(m/n − 1) ⊙ W·drop(x) + (m/n) ⊙ s·B A drop(x); with dropout off: y = (m/n) ⊙ (W + sBA) x + b."""
        A, B, scaling = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
        scale = getattr(layer, MAGNITUDE)[name] / row_norm(layer, name).to(A.dtype)
        dropped = dropout(x, layer.lora_dropout[name], layer.training)
        lora = F.linear(F.linear(dropped, A), B) * scaling
        if dropped is x and layer.is_plain_base():  # no dropout: W x is the base output without its bias
            # (not so when base_layer is another adapter layer, e.g. BitFit's bias change: its output holds more)
            bias = layer.base_layer.bias
            base = base_out.to(A.dtype) - (bias.to(A.dtype) if bias is not None else 0)
        else:
            base = F.linear(dropped, layer.weight_out_in().to(A.dtype))
        return (scale - 1) * base + scale * lora

    def delta_weight(self, layer: "LoraLinear", name: str, original: torch.Tensor | None) -> torch.Tensor:
        """ΔW = (m/n − 1) W + (m/n) s·B A, row by row, with n = ‖W + s·B A‖_row and W the unmerged weight."""
        scale = (getattr(layer, MAGNITUDE)[name].detach().float() / row_norm(layer, name, original)).unsqueeze(1)
        return (scale - 1) * original + scale * layer.lora_matrix(name)

    def mixed_refusal(self) -> str | None:
        return "DoRA adapters cannot be mixed with other adapters in one batch"
