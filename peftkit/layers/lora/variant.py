"""What one adapter of a LoRA Linear/Conv1D layer computes: plain LoRA, or a variant of it (DoRA, ...).

A variant is an object attached to ONE adapter of a layer (``layer.variants[name]``), in the spirit of Hugging Face
PEFT's ``LoraVariant`` and torchtune's separate ``DoRALinear``: the layer owns A, B, the scaling and dropout, and
asks the adapter's variant for everything that differs. A new variant subclasses ``LoraVariant`` and overrides
what it changes; no edit of ``linear.py`` is needed:

- ``init(layer, name)``: create and initialise its own parameters, in a container from
  ``layer.adapter_container(attr)`` (runs under ``no_grad``, after A and B are initialised);
- ``tensors(layer, name)``: those parameters keyed by their file suffix (what is saved and loaded);
- ``delta(layer, name, x, base_out)``: what the adapter adds to the base output for input ``x``;
- ``delta_weight(layer, name, original)``: the same as a change of the weight, fp32, (out, in); ``original`` is the
  unmerged base weight (fp32, (out, in), detached) when ``depends_on_weight`` is set, else None;
- ``depends_on_weight``: the delta is a function of W, so merges keep the pristine weight and compose from it;
- ``fusable``: the fused kernels of ``peftkit.ops.lora`` (which compute plain LoRA) may run it;
- ``mixed_refusal()``: None if rows of a mixed batch may use it, else the reason why not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from ...functional import lora_delta_weight, lora_linear_delta

if TYPE_CHECKING:
    from .linear import LoraLinear


class LoraVariant:
    """Plain LoRA: y = W x + b + s · B A dropout(x). The base class of every variant."""

    name: ClassVar[str] = "LoRA"
    depends_on_weight: ClassVar[bool] = False
    fusable: ClassVar[bool] = True

    def init(self, layer: "LoraLinear", name: str) -> None:
        """Create and initialise the variant's own parameters (plain LoRA has none)."""

    def tensors(self, layer: "LoraLinear", name: str) -> dict[str, torch.Tensor]:
        return {}

    def delta(self, layer: "LoraLinear", name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """s · B A dropout(x); ``x`` is already in the adapter's dtype."""
        return lora_linear_delta(x, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name],
                                 layer.lora_dropout[name], layer.training)

    def delta_weight(self, layer: "LoraLinear", name: str, original: torch.Tensor | None) -> torch.Tensor:
        """s · B A in fp32, (out, in)."""
        return lora_delta_weight(layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])

    def mixed_refusal(self) -> str | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
