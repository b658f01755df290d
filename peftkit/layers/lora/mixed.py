"""Mixed batches on LoRA Linear/Conv1D layers: row i of the batch gets adapter ``layer.row_adapters[i]``.

The A's and B's of all the layer's adapters are stacked once (cached by ``AdapterLayer.stacked`` until an adapter
or one of its tensors changes); each forward gathers the rows' factors with one lookup and applies them with one
batched matmul each (as Punica / S-LoRA do), not a loop over adapters. Which adapters may join such a batch is the
layer's answer (``mixed_refusal``: plain LoRA mixes, DoRA does not); ``peftkit.mixing`` routes the rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .linear import LoraLinear


def stack_factors(layer: "LoraLinear", names: tuple[str, ...]) -> tuple[torch.Tensor, int]:
    """One row per adapter slot holding its A (r_max, in) and (s·B)ᵀ (r_max, out), flattened side by side so
    that one lookup gathers both. Slot 0 (no adapter) and the padding of smaller ranks are zeros."""
    r_max = max((layer.r[n] for n in names), default=1)
    dtype = layer.lora_A[names[0]].weight.dtype if names else torch.float32
    A_all = torch.zeros(len(names) + 1, r_max, layer.in_features, dtype=dtype)
    Bt_all = torch.zeros(len(names) + 1, r_max, layer.out_features, dtype=dtype)
    for slot, name in enumerate(names, start=1):
        r = layer.r[name]
        A_all[slot, :r] = layer.lora_A[name].weight
        Bt_all[slot, :r] = (layer.lora_B[name].weight * layer.scaling[name]).t()
    both = torch.cat([A_all.flatten(1), Bt_all.flatten(1)], dim=1)
    return both.to(layer.base_layer.weight.device), r_max


def mixed_lora_forward(layer: "LoraLinear", x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """base(x) plus, for each row, s·B A x of that row's adapter (nothing for rows without one)."""
    layer.check_rows(x.shape[0])
    result = layer.base_layer(x, *args, **kwargs)
    slots = layer.row_slots(x.device)
    if layer.disabled or not bool(slots.any()):
        return result
    both, r = layer.stacked(lambda names: stack_factors(layer, names))
    rows = torch.nn.functional.embedding(slots, both)  # (batch, in·r + r·out): one gather for A and B
    split = layer.in_features * r
    A = rows[:, :split].view(-1, r, layer.in_features).to(x.dtype)
    Bt = rows[:, split:].view(-1, r, layer.out_features).to(result.dtype)
    # A·xᵀ (batch, r, tokens) runs several times faster on CPU than x·Aᵀ for a small rank
    h = torch.bmm(A, x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)).transpose(1, 2)  # (batch, tokens, r)
    out = result.view(result.shape[0], -1, result.shape[-1])
    if torch.is_grad_enabled() and (out.requires_grad or h.requires_grad):
        return torch.baddbmm(out, h, Bt).view(result.shape)
    out.baddbmm_(h, Bt)  # in place: no second pass over the output
    return result
