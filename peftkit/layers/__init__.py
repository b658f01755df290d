"""Adapter layers: each wraps one module of the base model (kept as ``base_layer``)."""

from .base import AdapterLayer, LayerRegistry
from .conv import LoraConv2d
from .embedding import LoraEmbedding
from .linear import LoraConv1D, LoraLinear
from .lora import LORA_LAYERS, LoraLayer
from .modules_to_save import ModulesToSave

__all__ = [
    "AdapterLayer", "LayerRegistry", "LORA_LAYERS", "LoraLayer", "LoraLinear", "LoraConv1D", "LoraEmbedding",
    "LoraConv2d", "ModulesToSave",
]
