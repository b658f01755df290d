"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) and BitFit: placement, identity, training, files, merging."""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit
from peftkit.layers.bitfit import BiasDelta
from peftkit.layers.bottleneck import BottleneckLayer

from conftest import CASES, MLP, randomize, run, tiny_bert, tiny_gpt2, tiny_llama


def layers_of(model, kind):
    return {path: layer for path, layer in model.adapter_layers() if isinstance(layer, kind)}


@pytest.mark.parametrize("build,variant,expected", [
    (tiny_bert, "houlsby", {"attention.output.dense", "output.dense"}),
    (tiny_bert, "pfeiffer", {"output.dense"}),
    (tiny_bert, "parallel", {"output.dense"}),
    (tiny_gpt2, "houlsby", {"attn.c_proj", "mlp.c_proj"}),
    (tiny_gpt2, "parallel", {"mlp"}),
    (tiny_llama, "houlsby", {"self_attn.o_proj", "mlp.down_proj"}),
    (tiny_llama, "pfeiffer", {"mlp.down_proj"}),
])
def test_default_placement_identity_and_bottleneck_size(build, variant, expected):
    base = build()
    model = peftkit.adapt(copy.deepcopy(base), peftkit.BottleneckConfig(variant=variant, reduction_factor=4))
    found = layers_of(model, BottleneckLayer)
    assert len(found) == 2 * len(expected)  # two transformer layers
    for path in found:
        assert any(path.endswith(e) for e in expected)
        if variant != "houlsby":
            assert "attention" not in path and "attn" not in path
    for layer in found.values():
        assert layer.adapter_down["default"].out_features == layer.width // 4  # hidden // reduction_factor
    ids = {"input_ids": torch.randint(0, 100, (2, 7))}
    torch.testing.assert_close(run(model, ids), run(base, ids), atol=1e-6, rtol=0)  # zero up-projection: identity


def test_parallel_reads_the_feed_forward_input_and_sequential_the_output():
    model = peftkit.adapt(tiny_bert(), peftkit.BottleneckConfig(variant="parallel", reduction_factor=4))
    randomize(model, scale=0.2)
    block = model.base_model.bert.encoder.layer[0]
    layer = block.output.dense
    seen = {}
    block.intermediate.register_forward_hook(lambda m, args, out: seen.update(ffn_input=args[0]))
    layer.register_forward_hook(lambda m, args, out: seen.update(out=out, inner=args[0]))
    model(input_ids=torch.randint(0, 100, (2, 5)))
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    expected = layer.base_layer(seen["inner"]) + 4.0 * up(torch.relu(down(seen["ffn_input"])))
    torch.testing.assert_close(seen["out"], expected)

    sequential = peftkit.adapt(MLP(), peftkit.BottleneckConfig(variant="pfeiffer", target_modules=["lin1"], reduction_factor=5))
    randomize(sequential, scale=0.2)
    layer = sequential.base_model.lin1
    x = torch.randn(3, 20)
    y = layer.base_layer(x)
    torch.testing.assert_close(layer(x), y + layer.adapter_up["default"](torch.relu(layer.adapter_down["default"](y))))


def test_bottleneck_trains_saves_loads_and_refuses_to_merge(tmp_path):
    base = tiny_bert()
    state = copy.deepcopy(base.state_dict())
    model = peftkit.adapt(base, peftkit.BottleneckConfig(variant="houlsby", reduction_factor=8, train_layer_norms=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("adapter_up" in n for n in trainable) and any("LayerNorm" in n for n in trainable)
    assert not any(n.endswith("query.weight") for n in trainable)
    randomize(model, scale=0.1)
    ids = {"input_ids": torch.randint(0, 100, (2, 7))}
    expected = run(model, ids)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge()
    model.save_adapter(tmp_path)
    fresh = tiny_bert(seed=3)
    fresh.load_state_dict(state)
    torch.testing.assert_close(run(peftkit.load_adapter(fresh, tmp_path), ids), expected, atol=1e-6, rtol=0)
    plain = model.unload()
    assert not any(isinstance(m, BottleneckLayer) for m in plain.modules())


def test_bitfit_trains_only_biases_and_the_head_and_merges(tmp_path):
    base = tiny_bert()
    state = copy.deepcopy(base.state_dict())
    reference = copy.deepcopy(base)
    model = peftkit.adapt(base, peftkit.BitFitConfig())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("bias_delta" in n or "classifier" in n for n in trainable)
    with_bias = [n for n, m in tiny_bert().named_modules() if getattr(m, "bias", None) is not None and n != "classifier"]
    assert len(layers_of(model, BiasDelta)) == len(with_bias)
    ids = {"input_ids": torch.randint(0, 100, (2, 7))}
    randomize(model, scale=0.1)
    expected = run(model, ids)
    model.save_adapter(tmp_path)
    fresh = tiny_bert(seed=4)
    fresh.load_state_dict(state)
    torch.testing.assert_close(run(peftkit.load_adapter(fresh, tmp_path), ids), expected, atol=1e-6, rtol=0)
    with model.disable_adapters():
        torch.testing.assert_close(run(model, ids), run(reference, ids), atol=1e-6, rtol=0)
    assert not torch.allclose(expected, run(reference, ids))
    plain = model.merge_and_unload()
    torch.testing.assert_close(run(plain, ids), expected, atol=1e-5, rtol=1e-5)


def test_bitfit_identity_at_init_on_every_case(case):
    base = case.model()
    if case.name == "llama":
        with pytest.raises(peftkit.TargetError, match="no Linear/LayerNorm/Conv biases"):
            peftkit.adapt(base, peftkit.BitFitConfig())
        return
    model = peftkit.adapt(copy.deepcopy(base), peftkit.BitFitConfig(modules_to_save=[]))
    inputs = case.inputs()
    torch.testing.assert_close(run(model, inputs), run(base, inputs), atol=1e-6, rtol=0)
