"""Adapter layers: each wraps one module of the base model (kept as ``base_layer``)."""

from .base import AdapterLayer, LayerRegistry
from .lora import LORA_LAYERS, DoraVariant, LoraConv1D, LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear, LoraVariant
from .modules_to_save import ModulesToSave

__all__ = [
    "AdapterLayer", "LayerRegistry", "LORA_LAYERS", "LoraLayer", "LoraLinear", "LoraConv1D", "LoraEmbedding",
    "LoraConv2d", "LoraVariant", "DoraVariant", "ModulesToSave",
]
