"""DoRA: magnitude init, the formula (bias outside, norm detached), merging several adapters, PEFT files."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import peftkit

from conftest import MLP, randomize, run, tiny_bert, tiny_gpt2


def dora_mlp(**kw):
    torch.manual_seed(0)
    base = MLP()
    model = peftkit.adapt(copy.deepcopy(base), peftkit.LoraConfig(r=4, alpha=8, use_dora=True, target_modules=["lin0", "lin1"], **kw))
    return base, model


def test_magnitude_starts_at_the_row_norms_and_the_adapter_at_identity():
    base, model = dora_mlp()
    layer = model.base_model.lin1
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].detach(), base.lin1.weight.norm(dim=1))
    x = torch.randn(5, 10)
    torch.testing.assert_close(model(x), base(x), atol=1e-6, rtol=1e-6)


def test_forward_is_the_dora_formula_with_the_bias_outside():
    base, model = dora_mlp()
    randomize(model, scale=0.2)
    layer = model.base_model.lin1
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B, m = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"]
    s = layer.scaling["default"]
    merged = W + s * B @ A
    x = torch.randn(6, 20)
    expected = (m / merged.norm(dim=1)) * (x @ merged.T) + b
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_the_norm_is_treated_as_a_constant_in_backward():
    base, model = dora_mlp()
    randomize(model, scale=0.2)
    layer = model.base_model.lin1
    x = torch.randn(6, 20)
    layer(x).pow(2).sum().backward()
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    B = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    m = layer.lora_magnitude_vector["default"].detach().clone().requires_grad_(True)
    s = layer.scaling["default"]
    merged = W + s * B @ A
    out = (m / merged.norm(dim=1).detach()) * (x @ merged.T) + b
    out.pow(2).sum().backward()
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, A.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, B.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].grad, m.grad, atol=1e-4, rtol=1e-4)


def test_several_dora_and_lora_adapters_merge_exactly_and_unmerge_bit_for_bit():
    base, model = dora_mlp()
    peftkit.adapt(model, peftkit.LoraConfig(r=2, alpha=4, use_dora=True, target_modules=["lin1"]), "second")
    peftkit.adapt(model, peftkit.LoraConfig(r=3, alpha=3, target_modules=["lin1"]), "plain")
    for name, seed in (("default", 1), ("second", 2), ("plain", 3)):
        randomize(model, name, seed=seed, scale=0.2)
    model.set_adapter(["default", "second", "plain"])
    x = torch.randn(7, 10)
    unmerged = model(x)
    original = model.base_model.lin1.base_layer.weight.detach().clone()
    model.merge(["plain"])  # a plain LoRA merged first, DoRA ones after
    model.merge(["default", "second"])
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge(["second"])
    model.unmerge()
    assert torch.equal(model.base_model.lin1.base_layer.weight, original)
    torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=1e-6)


def test_dora_with_dropout_trains_and_uses_the_dropped_input():
    base, model = dora_mlp(dropout=0.5)
    randomize(model, scale=0.2)
    model.train()
    x = torch.randn(64, 10)
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_dora_on_an_embedding_is_refused():
    from conftest import EmbeddingNet

    with pytest.raises(NotImplementedError, match="DoRA is implemented for Linear"):
        peftkit.adapt(EmbeddingNet(), peftkit.LoraConfig(use_dora=True, target_modules=["emb"]))


@pytest.mark.parametrize("build,targets", [(tiny_bert, ["query", "value"]), (tiny_gpt2, ["c_attn", "c_proj"])])
def test_dora_files_work_with_peft_both_ways(build, targets, tmp_path):
    import peft  # a test dependency: a missing peft fails here instead of skipping

    ids = {"input_ids": torch.tensor([[5, 17, 3, 44, 9, 2], [8, 1, 66, 23, 7, 31]])}
    model = peftkit.adapt(build(), peftkit.LoraConfig(r=4, alpha=8, use_dora=True, target_modules=targets))
    randomize(model, scale=0.05)
    with torch.no_grad():
        for _, layer in model.adapter_layers():
            if hasattr(layer, "lora_magnitude_vector") and "default" in layer.lora_magnitude_vector:
                layer.lora_magnitude_vector["default"].mul_(1.1)
    expected = run(model, ids)
    model.save_adapter(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    torch.testing.assert_close(run(theirs, ids), expected, atol=1e-5, rtol=1e-5)

    kwargs = {"task_type": "SEQ_CLS"} if build is tiny_bert else {"fan_in_fan_out": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=targets, **kwargs)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = peftkit.load_adapter(build(), tmp_path / "theirs")
    torch.testing.assert_close(run(ours, ids), run(theirs, ids), atol=1e-5, rtol=1e-5)
    assert ours.adapters["default"].config.use_dora
