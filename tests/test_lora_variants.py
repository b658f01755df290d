"""LoRA variants are objects: a new one, defined here, plugs into the Linear/Conv1D layers without editing them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit.layers.lora import LoraConv1D, LoraLinear, LoraVariant


class ScaledOutput(LoraVariant):
    """A toy variant: a learned gain g per adapter on the LoRA path, y = W x + b + g · s · B A dropout(x)."""

    name = "scaled-output LoRA"
    fusable = False  # the fused kernels compute plain LoRA only

    def init(self, layer, name):
        layer.adapter_container("lora_gain")[name] = nn.Parameter(torch.ones(()))

    def tensors(self, layer, name):
        return {"lora_gain": layer.lora_gain[name]}

    def delta(self, layer, name, x, base_out):
        return layer.lora_gain[name] * super().delta(layer, name, x, base_out)

    def delta_weight(self, layer, name, original):
        return layer.lora_gain[name].detach().float() * super().delta_weight(layer, name, original)

    def mixed_refusal(self):
        return "scaled-output adapters do not mix"


def gpt2_conv1d(n_in: int, n_out: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(n_out, n_in)


@pytest.mark.parametrize("wrap,build", [(LoraLinear, lambda i, o: nn.Linear(i, o)), (LoraConv1D, gpt2_conv1d)])
def test_a_variant_defined_outside_the_layer_trains_saves_and_merges(wrap, build):
    torch.manual_seed(0)
    layer = wrap(build(12, 7))
    layer.base_layer.requires_grad_(False)
    layer.add_adapter("toy", r=3, alpha=6, variant=ScaledOutput())
    layer.add_adapter("plain", r=2, alpha=2)  # a plain LoRA adapter alongside, untouched by the variant
    layer.set_active(["toy"])
    assert set(layer.adapter_tensors("toy")) == {"lora_A.weight", "lora_B.weight", "lora_gain"}
    assert set(layer.adapter_tensors("plain")) == {"lora_A.weight", "lora_B.weight"}
    x, target = torch.randn(32, 12), torch.randn(32, 7)
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # identity at init (B = 0)

    params = list(layer.adapter_tensors("toy").values())
    optimizer = torch.optim.Adam(params, lr=0.05)
    losses = []
    for _ in range(30):
        loss = (layer(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    gain = layer.lora_gain["toy"]
    assert gain.item() != pytest.approx(1.0)  # the variant's own parameter trained

    A, B, s = layer.lora_A["toy"].weight, layer.lora_B["toy"].weight, layer.scaling["toy"]
    with torch.no_grad():
        expected = layer.base_layer(x) + gain * s * x @ A.T @ B.T
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        original = layer.base_layer.weight.clone()
        layer.merge(["toy"])
        assert not torch.allclose(layer.base_layer.weight, original)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)  # merged: the base alone gives it
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, original, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)

    assert layer.mixed_refusal(["toy"]) == "scaled-output adapters do not mix"
    assert layer.mixed_refusal(["plain"]) is None
    layer.delete_adapter("toy")
    assert "toy" not in layer.lora_gain and "toy" not in layer.variants


def test_a_variant_is_refused_on_layers_that_do_not_host_variants():
    from peftkit.layers.lora import LoraEmbedding

    layer = LoraEmbedding(nn.Embedding(10, 4))
    with pytest.raises(NotImplementedError, match="scaled-output LoRA is implemented for Linear"):
        layer.add_adapter("toy", r=2, alpha=2, variant=ScaledOutput())
    assert layer.adapter_names == []
