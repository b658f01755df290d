"""Opt-in fast training mode: the base model's own dropouts drawn with peftkit's fast mask.

    peftkit.fast_training(model)          # model: a transformers model or an AdaptedModel

- every ``nn.Dropout`` of the base model becomes a ``FastDropout`` (same p, a mask ~15x cheaper to draw on a CPU);
- attention goes through ``peftkit_sdpa``, registered with transformers' ``AttentionInterface``: it is exactly
  SDPA when dropout is off (eval, or p = 0), and SDPA's math with the fast mask when dropout is on.

With dropout off the results are identical to eager mode. With dropout on the randomness differs (the drop
probability is rounded to a multiple of 1/65536), the distribution does not. ``fast_training(model, False)``
restores the original modules and attention implementation.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers.base import AdapterLayer
from .ops.attention import attention
from .ops.dropout import fast_dropout

ATTENTION_NAME = "peftkit_sdpa"


class FastDropout(nn.Module):
    def __init__(self, original: nn.Dropout) -> None:
        super().__init__()
        self.original = original  # kept so that fast_training(model, False) can restore it
        self.p = original.p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if dropout <= 0.0 or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = query.shape[2] > 1 and attention_mask is None and is_causal
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    out = attention(query, key, value, attention_mask, dropout, scaling, is_causal)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, _hf_attention)
    # transformers builds no mask at all (padding ignored) for an implementation without a mask function
    if ATTENTION_NAME not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def fast_training(model: nn.Module, enable: bool = True) -> nn.Module:
    """Switch the base model's dropouts (and transformers attention) to the fast mask, or back."""
    from .model import AdaptedModel

    base = model.base_model if isinstance(model, AdaptedModel) else model
    for parent in list(base.modules()):
        if isinstance(parent, (AdapterLayer, FastDropout)):
            continue
        for name, child in parent.named_children():
            if enable and type(child) is nn.Dropout:
                setattr(parent, name, FastDropout(child))
            elif not enable and isinstance(child, FastDropout):
                setattr(parent, name, child.original)
    # the outermost transformers model: the base itself, or the encoder inside a peftkit pooled classifier
    hf_model = next((m for m in base.modules() if hasattr(m, "set_attn_implementation")), None)
    config = getattr(hf_model, "config", None)
    if config is not None:
        current = getattr(config, "_attn_implementation", None)
        if enable and current == "sdpa":
            _register_attention()
            hf_model.set_attn_implementation(ATTENTION_NAME)
        elif not enable and current == ATTENTION_NAME:
            hf_model.set_attn_implementation("sdpa")
    return model
