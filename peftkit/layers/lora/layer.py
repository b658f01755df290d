"""What every LoRA layer shares: per-adapter rank, alpha, scaling, dropout and variant, the rank check and the
initialiser table.

y = base(x) + Σ_active s · B A dropout(x), with s = alpha / r (alpha / √r with rsLoRA).
The concrete layers (``linear.py``, ``embedding.py``, ``conv.py``) create A and B in their own shape and
supply their own initialisers; adding an initialiser means adding one entry to a layer's table. Layers that
host variants (``variant_host``: Linear, Conv1D) let each adapter's ``LoraVariant`` change its math (DoRA).
"""

from __future__ import annotations

import math
from typing import Callable, ClassVar, Iterable

import torch
from torch import nn

from ..base import AdapterLayer, LayerRegistry
from .dora import DoraVariant
from .variant import LoraVariant

LORA_LAYERS = LayerRegistry("lora")

#: a rank above min(fan_in, fan_out) adds nothing, but PEFT files use such ranks on small layers (e.g. r=16 on a
#: 2-label head), so ranks up to this are accepted on any layer
ALWAYS_ALLOWED_RANK = 256


def check_rank(base_layer: nn.Module, r: int, minimum: int = 1) -> None:
    """Refuse a rank the layer cannot use, before anything is allocated (a file's r=10**9 would ask for terabytes)."""
    weight = base_layer.weight  # (out, in...) for Linear/Conv, (in, out) for Conv1D, (num, dim) for Embedding
    dims = (weight.shape[0], math.prod(weight.shape[1:]))
    limit = max(min(dims), ALWAYS_ALLOWED_RANK)
    if not isinstance(r, int) or r < minimum or r > limit:
        raise ValueError(
            f"rank r={r!r} does not fit this {type(base_layer).__name__} layer of shape {tuple(weight.shape)}: the "
            f"rank must be between {minimum} and {limit} (min of its dimensions, or up to {ALWAYS_ALLOWED_RANK}); "
            "lower r (or its rank_pattern entry)"
        )


class LoraLayer(AdapterLayer):
    adapter_containers = ("lora_A", "lora_B")
    container_type: ClassVar[type[nn.Module]] = nn.ModuleDict
    #: whether adapters of this layer may use a variant other than plain LoRA (e.g. DoRA)
    variant_host: ClassVar[bool] = False
    #: init name -> function(layer, adapter_name) that fills A and B
    initializers: ClassVar[dict[str, Callable[["LoraLayer", str], None]]] = {}

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for container in self.adapter_containers:
            setattr(self, container, self.container_type())
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        #: adapter -> whether sibling layers reading the same input (q, k, v) share one dropout mask
        self.shared_dropout_mask: dict[str, bool] = {}
        #: adapter -> its variant (plain LoRA unless the adapter was created with another one)
        self.variants: dict[str, LoraVariant] = {}

    def add_adapter(
        self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False, init: str = "default",
        use_dora: bool = False, shared_dropout_mask: bool = False, variant: LoraVariant | None = None,
    ) -> None:
        """``variant``: a ``LoraVariant`` that changes this adapter's math; ``use_dora`` (PEFT's flag) picks DoRA."""
        if variant is None:
            variant = DoraVariant() if use_dora else LoraVariant()
        if type(variant) is not LoraVariant and not self.variant_host:
            raise NotImplementedError(
                f"{variant.name} is implemented for Linear and GPT-2 Conv1D layers, not "
                f"{type(self.base_layer).__name__}; exclude such modules with exclude_modules"
            )
        check_rank(self.inner, r)
        initializer = self.initializers.get(init)
        if initializer is None:
            raise ValueError(
                f"init={init!r} is not available for {type(self).__name__} layers; "
                f"available: {', '.join(sorted(self.initializers))}"
            )
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[name] = dropout
        self.shared_dropout_mask[name] = shared_dropout_mask
        self.variants[name] = variant
        self._create_factors(name, r, **self._factory())
        with torch.no_grad():
            initializer(self, name)
            variant.init(self, name)  # after A and B: DoRA's magnitude starts at ‖W + s·B A‖ = ‖W‖

    def _create_factors(self, name: str, r: int, device: torch.device, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def _factory(self) -> dict:
        """New adapters live on the base weight's device, in fp32 when the base is fp16/bf16."""
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        return {"device": weight.device, "dtype": dtype}

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight,
                **self.variants[name].tensors(self, name)}

    def adapter_container(self, attr: str, kind: type[nn.Module] = nn.ParameterDict) -> nn.Module:
        """The per-adapter container ``attr`` (a variant's own parameters, e.g. ``lora_magnitude_vector``), made
        on first use and from then on part of ``adapter_containers`` (so delete_adapter empties it too)."""
        if attr not in self.adapter_containers:
            setattr(self, attr, kind())
            self.adapter_containers = (*self.adapter_containers, attr)
        return getattr(self, attr)

    def mixed_refusal(self, names: Iterable[str]) -> str | None:
        refusal = super().mixed_refusal(names)
        if refusal is not None:
            return refusal
        return next(filter(None, (self.variants[n].mixed_refusal() for n in names if n in self.variants)), None)

    def _forget(self, name: str) -> None:
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout, self.shared_dropout_mask, self.variants):
            table.pop(name, None)


def kaiming_A_zero_B(layer: LoraLayer, name: str) -> None:
    """A ~ U(-1/√fan_in, 1/√fan_in) (kaiming-uniform with a=√5, as nn.Linear does), B = 0."""
    nn.init.kaiming_uniform_(layer.lora_A[name].weight, a=math.sqrt(5))
    nn.init.zeros_(layer.lora_B[name].weight)


def gaussian_A_zero_B(layer: LoraLayer, name: str) -> None:
    """A ~ N(0, (1/r)²), B = 0."""
    nn.init.normal_(layer.lora_A[name].weight, std=1.0 / layer.r[name])
    nn.init.zeros_(layer.lora_B[name].weight)
