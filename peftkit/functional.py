"""Stateless LoRA math shared by the layers (and by merging code that works on plain tensors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops.dropout import effective_p, keep_mask


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout with peftkit's fast mask (see ``peftkit.ops.dropout``)."""
    if p <= 0.0 or not training:
        return x
    return x * keep_mask(x.shape, p, x.device).tensor(x.dtype).mul_(1.0 / (1.0 - effective_p(p)))


def lora_linear_delta(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float, training: bool
) -> torch.Tensor:
    """s · B A dropout(x) for A (r, in) and B (out, r); x (..., in) -> (..., out)."""
    return F.linear(F.linear(dropout(x, p, training), A), B) * scaling


def lora_delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = s · B A in fp32, shape (out, in)."""
    return (B.float() @ A.float()) * scaling
