"""LoRA dropout masks of sibling layers (q, k, v reading the same input): one mask per layer by default, as PEFT;
one shared mask with ``shared_dropout_mask=True``."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import peftkit
from peftkit.ops import lora as lora_ops
from peftkit.ops.dropout import effective_p

from conftest import tiny_bert

P = 0.5


class Block(nn.Module):
    """Three projections of one parent reading the same tensor, like attention's query, key and value."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(16, 12) for _ in range(3))

    def forward(self, x):
        return self.query(x), self.key(x), self.value(x)


def same_factors(model: nn.Module, seed: int = 0) -> list[nn.Module]:
    """Give every LoRA layer the same non-zero A and B, so that equal LoRA outputs mean equal masks."""
    layers = [m for m in model.modules() if isinstance(m, peftkit.layers.AdapterLayer) and hasattr(m, "lora_A")]
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(layers[0].lora_A["default"].weight.shape, generator=generator)
    B = torch.randn(layers[0].lora_B["default"].weight.shape, generator=generator)
    with torch.no_grad():
        for layer in layers:
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
    return layers


@pytest.fixture
def drawn(monkeypatch):
    """Every keep-mask the LoRA kernels draw, in order."""
    masks = []
    real = lora_ops.keep_mask

    def recording(*args, **kwargs):
        masks.append(real(*args, **kwargs))
        return masks[-1]

    monkeypatch.setattr(lora_ops, "keep_mask", recording)
    return masks


def block(shared: bool | None) -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(0)
    extra = {} if shared is None else {"shared_dropout_mask": shared}
    model = peftkit.adapt(Block(), peftkit.LoraConfig(r=4, alpha=8, dropout=P, target_modules=["query", "key", "value"],
                                                      **extra))
    return model, same_factors(model)


def plain(layer, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """W x + b + s · B A (x ⊙ keep / (1 - p)); no dropout when keep is None."""
    dropped = x if keep is None else x * keep / (1 - effective_p(P))
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return layer.base_layer(x) + layer.scaling["default"] * dropped @ A.T @ B.T


def lora_parts(layers, outputs, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [out.detach() - layer.base_layer(x) for layer, out in zip(layers, outputs)]


@pytest.mark.parametrize("shared", [None, False])
def test_independent_masks_by_default(drawn, shared):
    model, layers = block(shared)
    x = torch.randn(2, 5, 16)
    outputs = model.train()(x)
    assert len(drawn) == 3, "one mask per layer"
    for layer, out, mask in zip(layers, outputs, drawn):
        torch.testing.assert_close(out, plain(layer, x, mask.tensor(x.dtype).view(x.shape)), rtol=1e-5, atol=1e-5)
    # same A and B in the three layers: different LoRA outputs mean different masks
    q, k, v = lora_parts(layers, outputs, x)
    assert not torch.allclose(q, k) and not torch.allclose(k, v)


def test_shared_mask_opt_in(drawn):
    model, layers = block(True)
    x = torch.randn(2, 5, 16)
    outputs = model.train()(x)
    assert len(drawn) == 1, "q, k and v share one mask"
    keep = drawn[0].tensor(x.dtype).view(x.shape)
    for layer, out in zip(layers, outputs):
        torch.testing.assert_close(out, plain(layer, x, keep), rtol=1e-5, atol=1e-5)
    q, k, v = lora_parts(layers, outputs, x)
    torch.testing.assert_close(q, k)
    torch.testing.assert_close(k, v)


@pytest.mark.parametrize("shared", [False, True])
def test_unbiased_and_eval_unaffected(shared):
    model, layers = block(shared)
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        expected = [plain(layer, x, None) for layer in layers]
        model.eval()
        for out, want in zip(model(x), expected):
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)  # eval: no dropout, whatever the setting
        model.train()
        runs = 4000
        mean = [torch.zeros_like(e) for e in expected]
        for _ in range(runs):
            for total, out in zip(mean, model(x)):
                total += out / runs
    for got, want in zip(mean, expected):
        # the standard error of the mean of 4000 draws is ~0.03 of the LoRA term here: 0.15 is ~5 sigma
        lora = (want - layers[0].base_layer(x)).abs().max()
        assert (got - want).abs().max() < 0.15 * lora


def captured_lora_outputs(model: nn.Module, layer_names: list[str]) -> dict[str, torch.Tensor]:
    """Each named layer's LoRA contribution in one forward: its output minus its base layer's output."""
    found: dict[str, torch.Tensor] = {}
    hooks = []
    for path, module in model.base_model.named_modules():
        name = path.rpartition(".")[2]
        if name in layer_names and hasattr(module, "lora_A"):
            def hook(module, args, out, path=path):
                found[path] = (out - module.base_layer(args[0])).detach()
            hooks.append(module.register_forward_hook(hook))
    return found, hooks


@pytest.mark.parametrize("shared", [False, True])
def test_tiny_bert_qkv_masks(shared):
    torch.manual_seed(0)
    model = peftkit.adapt(tiny_bert(), peftkit.LoraConfig(r=4, alpha=8, dropout=P, target_modules=["query", "key", "value"],
                                                          shared_dropout_mask=shared))
    same_factors(model)
    found, hooks = captured_lora_outputs(model, ["query", "key", "value"])
    ids = torch.randint(1, 100, (2, 7))
    model.train()(input_ids=ids).logits.sum().backward()
    for hook in hooks:
        hook.remove()
    prefix = "bert.encoder.layer.0.attention.self."
    q, k, v = (found[prefix + n] for n in ("query", "key", "value"))
    assert torch.count_nonzero(q) > 0
    # equal up to rounding (the fused kernel adds the LoRA term before the base matmul) iff the mask is shared
    same = [torch.allclose(a, b, rtol=1e-4, atol=1e-3) for a, b in ((q, k), (k, v))]
    assert same == [shared, shared]
    grads = [model.base_model.get_submodule(prefix + n).lora_A["default"].weight.grad for n in ("query", "key", "value")]
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in grads)


def test_config_and_cli_schema(tmp_path):
    from peftkit.train.config import RunConfig

    assert peftkit.LoraConfig().shared_dropout_mask is False
    with pytest.raises(ValueError, match="shared_dropout_mask"):
        peftkit.LoraConfig(shared_dropout_mask="yes")
    chosen = RunConfig.model_validate({"method": "lora", "lora": {"shared_dropout_mask": True}})
    assert chosen.method_config({"total_steps": 10}).shared_dropout_mask is True
    assert RunConfig.model_validate({"method": "lora"}).method_config({"total_steps": 10}).shared_dropout_mask is False
    # a training-time setting: not written into PEFT's adapter_config.json, which PEFT still reads
    model = peftkit.adapt(tiny_bert(), peftkit.LoraConfig(r=4, dropout=0.1, shared_dropout_mask=True))
    model.save_adapter(tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "shared_dropout_mask" not in written
    peft = pytest.importorskip("peft")
    assert peft.LoraConfig.from_pretrained(str(tmp_path / "adapter")).lora_dropout == 0.1
