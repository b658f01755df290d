"""LoRA on ``nn.Conv2d``: A is a conv with the base kernel (C_in -> r), B a 1×1 conv (r -> C_out)."""

from __future__ import annotations

import torch
from torch import nn

from ...functional import dropout
from .layer import LORA_LAYERS, LoraLayer, gaussian_A_zero_B, kaiming_A_zero_B


class LoraConv2d(LoraLayer):
    initializers = {"default": kaiming_A_zero_B, "gaussian": gaussian_A_zero_B}

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if base_layer.groups != 1:
            raise NotImplementedError(
                f"LoRA on a grouped Conv2d (groups={base_layer.groups}) is not supported; "
                "exclude this module with exclude_modules"
            )
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels

    def _create_factors(self, name: str, r: int, device: torch.device, dtype: torch.dtype) -> None:
        base = self.base_layer
        self.lora_A[name] = nn.Conv2d(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
            bias=False, padding_mode=base.padding_mode, device=device, dtype=dtype,
        )
        self.lora_B[name] = nn.Conv2d(r, base.out_channels, 1, bias=False, device=device, dtype=dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        A = self.lora_A[name].weight.float()  # (r, C_in, kh, kw)
        B = self.lora_B[name].weight.float()[:, :, 0, 0]  # (C_out, r)
        return torch.einsum("or,rikl->oikl", B, A) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self._unmerged_active():
            A, B = self.lora_A[name], self.lora_B[name]
            h = dropout(x.to(A.weight.dtype), self.lora_dropout[name], self.training)
            result = result + (B(A(h)) * self.scaling[name]).to(result.dtype)
        return result


LORA_LAYERS.register(nn.Conv2d, LoraConv2d)
