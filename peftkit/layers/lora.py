"""What every LoRA layer shares: per-adapter rank, alpha, scaling and dropout, and the initialiser table.

y = base(x) + Σ_active s · B A dropout(x), with s = alpha / r (alpha / √r with rsLoRA).
The concrete layers (``linear.py``, ``embedding.py``, ``conv.py``) create A and B in their own shape and
supply their own initialisers; adding an initialiser means adding one entry to a layer's table.
"""

from __future__ import annotations

import math
from typing import Callable, ClassVar

import torch
from torch import nn

from .base import AdapterLayer, LayerRegistry

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
    #: containers of another type than ``container_type`` (e.g. DoRA's magnitudes: plain parameters)
    container_types: ClassVar[dict[str, type[nn.Module]]] = {}
    #: whether the layer implements DoRA (weight-decomposed LoRA)
    supports_dora: ClassVar[bool] = False
    #: init name -> function(layer, adapter_name) that fills A and B
    initializers: ClassVar[dict[str, Callable[["LoraLayer", str], None]]] = {}

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for container in self.adapter_containers:
            setattr(self, container, self.container_types.get(container, self.container_type)())
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        #: adapter -> whether sibling layers reading the same input (q, k, v) share one dropout mask
        self.shared_dropout_mask: dict[str, bool] = {}

    def add_adapter(
        self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False, init: str = "default",
        use_dora: bool = False, shared_dropout_mask: bool = False,
    ) -> None:
        if use_dora and not self.supports_dora:
            raise NotImplementedError(
                f"DoRA is implemented for Linear and GPT-2 Conv1D layers, not {type(self.base_layer).__name__}; "
                "exclude such modules with exclude_modules"
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
        self._create_factors(name, r, **self._factory())
        with torch.no_grad():
            initializer(self, name)
        if use_dora:
            self._add_magnitude(name)

    def _add_magnitude(self, name: str) -> None:
        raise NotImplementedError

    def _create_factors(self, name: str, r: int, device: torch.device, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def _factory(self) -> dict:
        """New adapters live on the base weight's device, in fp32 when the base is fp16/bf16."""
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        return {"device": weight.device, "dtype": dtype}

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}

    def _forget(self, name: str) -> None:
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout, self.shared_dropout_mask):
            table.pop(name, None)


def kaiming_A_zero_B(layer: LoraLayer, name: str) -> None:
    """A ~ U(-1/√fan_in, 1/√fan_in) (kaiming-uniform with a=√5, as nn.Linear does), B = 0."""
    nn.init.kaiming_uniform_(layer.lora_A[name].weight, a=math.sqrt(5))
    nn.init.zeros_(layer.lora_B[name].weight)


def gaussian_A_zero_B(layer: LoraLayer, name: str) -> None:
    """A ~ N(0, (1/r)²), B = 0."""
    nn.init.normal_(layer.lora_A[name].weight, std=1.0 / layer.r[name])
    nn.init.zeros_(layer.lora_B[name].weight)
