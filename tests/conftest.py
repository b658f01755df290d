"""Tiny models built from configs (no downloads) and helpers shared by the tests."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 20)
        self.lin2 = nn.Linear(20, 2)

    def forward(self, x):
        return self.lin2(self.relu(self.lin1(self.relu(self.lin0(x)))))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, (3, 1), stride=2, padding=(1, 0), dilation=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.conv1(torch.relu(self.conv0(x))))
        return self.head(h.mean(dim=(2, 3)))


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16, padding_idx=0)
        self.proj = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, ids):
        return self.out(torch.tanh(self.proj(self.emb(ids)))).mean(1)


def tiny_bert(num_labels: int = 3, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@dataclass
class Case:
    """A tiny model, a LoRA target spec that covers its layer types, and a way to run it."""

    name: str
    build: Callable[[int], nn.Module]
    targets: list[str] | str
    make_inputs: Callable[[], dict]
    layer_types: tuple[str, ...]

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build(seed).eval()

    def inputs(self) -> dict:
        torch.manual_seed(1234)
        return self.make_inputs()


def run(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


CASES = [
    Case("mlp", lambda s: MLP(), ["lin0", "lin1"], lambda: {"x": torch.randn(4, 10)}, ("LoraLinear",)),
    Case("conv", lambda s: ConvNet(), ["conv0", "conv1"], lambda: {"x": torch.randn(2, 3, 8, 8)}, ("LoraConv2d",)),
    Case("embedding", lambda s: EmbeddingNet(), ["emb", "proj"], lambda: {"ids": torch.randint(0, 50, (3, 6))},
         ("LoraEmbedding", "LoraLinear")),
    Case("bert", lambda s: tiny_bert(seed=s), ["query", "value", "intermediate.dense"],
         lambda: {"input_ids": torch.randint(0, 100, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)},
         ("LoraLinear",)),
    Case("gpt2", lambda s: tiny_gpt2(seed=s), ["c_attn", "c_fc", "wte"],
         lambda: {"input_ids": torch.randint(0, 100, (2, 9))}, ("LoraConv1D", "LoraEmbedding")),
    Case("llama", lambda s: tiny_llama(seed=s), ["q_proj", "v_proj", "down_proj"],
         lambda: {"input_ids": torch.randint(0, 100, (2, 9))}, ("LoraLinear",)),
]


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request) -> Case:
    return request.param


def randomize(adapted, adapter_name: str = "default", seed: int = 0, scale: float = 0.3) -> None:
    """Give every adapter parameter non-zero random values, so that merge/save tests are not trivial."""
    from peftkit import io

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in io.adapter_state(adapted.base_model, adapter_name).values():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


@pytest.fixture(autouse=True)
def _quiet_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage.*")
        yield
