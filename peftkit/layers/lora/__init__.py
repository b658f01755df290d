"""LoRA layers: the shared per-adapter state (``layer.py``), LoRA on Linear/Conv1D (``linear.py``), Embedding
(``embedding.py``) and Conv2d (``conv.py``); an adapter's variant of the math (``variant.py``: plain LoRA, ``dora.py``:
DoRA); mixed batches on Linear/Conv1D (``mixed.py``); q/k/v layers sharing one dropout mask (``siblings.py``).

Importing this package registers the layer types in ``LORA_LAYERS``.
"""

from .conv import LoraConv2d
from .dora import DoraVariant
from .embedding import LoraEmbedding
from .layer import ALWAYS_ALLOWED_RANK, LORA_LAYERS, LoraLayer, check_rank
from .linear import LoraConv1D, LoraLinear
from .variant import LoraVariant

__all__ = [
    "ALWAYS_ALLOWED_RANK", "LORA_LAYERS", "LoraLayer", "LoraLinear", "LoraConv1D", "LoraEmbedding", "LoraConv2d",
    "LoraVariant", "DoraVariant", "check_rank",
]
