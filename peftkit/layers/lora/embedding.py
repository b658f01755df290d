"""LoRA on ``nn.Embedding``: y = E[x] + s · (Aᵀ[x]) Bᵀ with A (r, vocab) and B (dim, r); no dropout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layer import LORA_LAYERS, LoraLayer


def zero_A_normal_B(layer: "LoraEmbedding", name: str) -> None:
    """The reverse of Linear's init (as loralib and PEFT do): A = 0, B ~ N(0, 1)."""
    nn.init.zeros_(layer.lora_embedding_A[name])
    nn.init.normal_(layer.lora_embedding_B[name])


class LoraEmbedding(LoraLayer):
    adapter_containers = ("lora_embedding_A", "lora_embedding_B")
    container_type = nn.ParameterDict
    initializers = {"default": zero_A_normal_B, "gaussian": zero_A_normal_B}

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = base_layer.num_embeddings, base_layer.embedding_dim

    def _create_factors(self, name: str, r: int, device: torch.device, dtype: torch.dtype) -> None:
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, self.num_embeddings, device=device, dtype=dtype))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(self.embedding_dim, r, device=device, dtype=dtype))

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_embedding_A": self.lora_embedding_A[name], "lora_embedding_B": self.lora_embedding_B[name]}

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.lora_embedding_A[name].float(), self.lora_embedding_B[name].float()
        return (B @ A).T * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        for name in self._unmerged_active():
            A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
            rows = F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
            result = result + ((rows @ B.T) * self.scaling[name]).to(result.dtype)
        return result


LORA_LAYERS.register(nn.Embedding, LoraEmbedding)
