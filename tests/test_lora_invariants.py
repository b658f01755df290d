"""The LoRA invariants of the test checklist, over every tiny model (MLP, Conv2d, Embedding, BERT, GPT-2, LLaMA)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import peftkit
from peftkit import io
from peftkit.layers import AdapterLayer

from conftest import randomize, run


def adapted(case, seed=0, name="default", **kw):
    kw.setdefault("r", 4)
    kw.setdefault("alpha", 8)
    return peftkit.adapt(case.model(seed), peftkit.LoraConfig(target_modules=case.targets, **kw), name)


# ----------------------------------------------------------------------------------- construction, trainability
def test_identity_at_init(case):
    base = case.model()
    inputs = case.inputs()
    expected = run(base, inputs)
    model = peftkit.adapt(copy.deepcopy(base), peftkit.LoraConfig(r=4, alpha=8, target_modules=case.targets))
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-6, rtol=0)


def test_layer_types_and_shapes(case):
    model = adapted(case)
    kinds = {type(layer).__name__ for _, layer in model.adapter_layers() if type(layer).__name__ != "ModulesToSave"}
    assert kinds == set(case.layer_types)
    for path, layer in model.adapter_layers():
        if type(layer).__name__ == "LoraEmbedding":
            assert layer.lora_embedding_A["default"].shape == (4, layer.num_embeddings)
            assert layer.lora_embedding_B["default"].shape == (layer.embedding_dim, 4)
        elif type(layer).__name__ == "LoraConv2d":
            k = layer.base_layer.kernel_size
            assert layer.lora_A["default"].weight.shape == (4, layer.in_features, *k)
            assert layer.lora_B["default"].weight.shape == (layer.out_features, 4, 1, 1)
        elif hasattr(layer, "lora_A"):
            assert layer.lora_A["default"].weight.shape == (4, layer.in_features)
            assert layer.lora_B["default"].weight.shape == (layer.out_features, 4)
            assert layer.weight is layer.base_layer.weight  # attributes proxied to the base layer


def test_trainable_set_is_exactly_the_adapter(case):
    model = adapted(case)
    adapter_ids = {id(p) for p in io.adapter_state(model.base_model, "default").values()}
    for name, param in model.named_parameters():
        assert param.requires_grad == (id(param) in adapter_ids), name
    count = model.trainable_parameters()
    assert count.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert "trainable" in str(count) and 0 < count.share < 1


def test_gradients_reach_adapter_only_and_training_changes_only_adapter(case):
    model = adapted(case)
    randomize(model)
    inputs = case.inputs()
    before_out = run(model, inputs).detach().clone()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):
        optimizer.zero_grad()
        run(model, inputs).float().pow(2).mean().backward()
        if step == 0:
            for name, param in model.named_parameters():
                assert (param.grad is not None) == param.requires_grad, name
        optimizer.step()
    model.eval()
    for name, param in model.named_parameters():
        if name in base_before:
            torch.testing.assert_close(param, base_before[name], atol=1e-4, rtol=0)
        else:
            assert not torch.allclose(param, adapter_before[name]), f"{name} did not train"
    assert not torch.allclose(run(model, inputs), before_out)


def test_init_statistics():
    from scipy import stats

    torch.manual_seed(0)
    layer = torch.nn.Linear(1000, 64)
    model = peftkit.adapt(torch.nn.Sequential(layer), peftkit.LoraConfig(r=64, target_modules=["0"]))
    A = model.base_model[0].lora_A["default"].weight.detach().flatten().numpy()
    bound = 1 / math.sqrt(1000)
    assert abs(A).max() <= bound + 1e-7
    assert stats.kstest(A, stats.uniform(loc=-bound, scale=2 * bound).cdf).pvalue > 0.01
    assert stats.kstest(A, stats.norm(scale=A.std()).cdf).pvalue < 0.05
    assert torch.count_nonzero(model.base_model[0].lora_B["default"].weight) == 0

    model = peftkit.adapt(torch.nn.Sequential(torch.nn.Linear(1000, 64)),
                          peftkit.LoraConfig(r=16, init="gaussian", target_modules=["0"]))
    A = model.base_model[0].lora_A["default"].weight.detach().flatten().numpy()
    assert stats.kstest(A, stats.norm(scale=1 / 16).cdf).pvalue > 0.01

    model = peftkit.adapt(torch.nn.Sequential(torch.nn.Embedding(1000, 64)), peftkit.LoraConfig(r=16, target_modules=["0"]))
    emb = model.base_model[0]
    assert torch.count_nonzero(emb.lora_embedding_A["default"]) == 0
    assert stats.kstest(emb.lora_embedding_B["default"].detach().flatten().numpy(), stats.norm.cdf).pvalue > 0.01


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_and_patterns(rslora):
    from conftest import MLP

    config = peftkit.LoraConfig(r=4, alpha=8, use_rslora=rslora, target_modules=["lin0", "lin1", "lin2"],
                                rank_pattern={"lin1": 2}, alpha_pattern={"lin2": 3})
    model = peftkit.adapt(MLP(), config)
    m = model.base_model
    scale = (lambda a, r: a / math.sqrt(r)) if rslora else (lambda a, r: a / r)
    assert m.lin0.scaling["default"] == pytest.approx(scale(8, 4))
    assert m.lin1.r["default"] == 2 and m.lin1.scaling["default"] == pytest.approx(scale(8, 2))
    assert m.lin2.r["default"] == 4 and m.lin2.scaling["default"] == pytest.approx(scale(3, 4))
    assert m.lin1.lora_A["default"].weight.shape == (2, 20)


def test_golden_values_against_the_formula():
    """y = W x + b + (alpha/r) B A x, computed by hand."""
    torch.manual_seed(3)
    base = torch.nn.Linear(5, 3)
    model = peftkit.adapt(torch.nn.Sequential(copy.deepcopy(base)), peftkit.LoraConfig(r=2, alpha=6, target_modules=["0"]))
    layer = model.base_model[0]
    A = torch.tensor([[0.1, -0.2, 0.3, 0.0, 0.5], [0.4, 0.1, -0.1, 0.2, -0.3]])
    B = torch.tensor([[1.0, -1.0], [0.5, 0.25], [-2.0, 0.0]])
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    x = torch.randn(4, 5)
    expected = x @ base.weight.T + base.bias + 3.0 * (x @ A.T @ B.T)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.delta_weight("default"), 3.0 * B @ A)


@pytest.mark.parametrize("kind", ["linear", "linear-no-bias", "conv1d"])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3)])
def test_decoding_path_equals_the_formula(kind, shape, monkeypatch):
    """Few tokens without gradients (decoding) take the thin inference path; it computes the same formula, and
    dropout still applies in training mode."""
    from transformers.pytorch_utils import Conv1D

    from peftkit.layers.lora.decode import ThinPlan

    torch.manual_seed(5)
    base = Conv1D(48, 64) if kind == "conv1d" else torch.nn.Linear(64, 48, bias=kind == "linear")
    model = peftkit.adapt(torch.nn.Sequential(copy.deepcopy(base)),
                          peftkit.LoraConfig(r=4, alpha=12, dropout=0.3, target_modules=["0"]))
    randomize(model)
    layer = model.base_model[0]
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    x = torch.randn(*shape, 64)
    expected = base(x) + 3.0 * (x @ A.T @ B.T)
    used = []
    thin = ThinPlan.__call__
    monkeypatch.setattr(ThinPlan, "__call__", lambda self, *a: used.append(1) or thin(self, *a))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert used, "the decoding path was not taken"
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))  # training mode: the adapter's dropout is applied


def test_dropout_only_on_the_adapter_branch():
    torch.manual_seed(0)
    model = peftkit.adapt(torch.nn.Sequential(torch.nn.Linear(8, 8)), peftkit.LoraConfig(r=2, dropout=0.5, target_modules=["0"]))
    x = torch.randn(16, 8)
    model.train()
    # with B = 0 the adapter branch is zero, so dropout (adapter branch only) must not change the output
    torch.testing.assert_close(model(x), model.base_model[0].base_layer(x))
    randomize(model)
    assert not torch.allclose(model(x), model(x))  # dropout is active in training
    model.eval()
    torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_adapter(dtype):
    from conftest import tiny_bert

    base = tiny_bert().to(dtype)
    model = peftkit.adapt(base, peftkit.LoraConfig(r=4, target_modules=["query", "value"]))
    randomize(model)
    layer = model.base_model.bert.encoder.layer[0].attention.self.query
    assert layer.lora_A["default"].weight.dtype == torch.float32
    out = model(input_ids=torch.randint(0, 100, (2, 5))).logits
    assert out.dtype == dtype and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    from conftest import tiny_bert

    inputs = {"input_ids": torch.randint(0, 100, (2, 9)), "labels": torch.tensor([0, 2])}

    def grads(checkpointing):
        model = peftkit.adapt(tiny_bert(), peftkit.LoraConfig(r=4, target_modules=["query", "value"]))
        randomize(model)
        if checkpointing:
            model.enable_gradient_checkpointing(reentrant=reentrant)
        model.train()
        model(**inputs).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-5, rtol=1e-4)


def test_user_config_is_never_modified():
    from conftest import tiny_gpt2

    config = peftkit.LoraConfig(r=4, target_modules=["c_attn"])
    before = config.to_dict()
    model = peftkit.adapt(tiny_gpt2(), config)
    assert config.to_dict() == before
    with pytest.raises(Exception):
        config.r = 5  # frozen
    assert model.adapters["default"].config == config


def test_decoding_plan_follows_every_change_of_the_layer(monkeypatch):
    """The thin decoding path caches its choice and tensors per layer; every change of the layer (another active
    adapter, B trained in place, merge/unmerge, disabled, an adapter deleted and re-created under the same name, a
    replaced parameter, a new scaling, a mixed batch, autocast) must show in the next output."""
    from peftkit.layers.lora.decode import ThinPlan

    torch.manual_seed(11)
    base = torch.nn.Linear(64, 48)
    config = peftkit.LoraConfig(r=4, alpha=8, target_modules=["0"])
    model = peftkit.adapt(torch.nn.Sequential(copy.deepcopy(base)), config, adapter_name="a")
    model.add_adapter(config, adapter_name="b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    model.eval()
    layer = model.base_model[0]
    x = torch.randn(1, 1, 64)
    calls = []
    thin = ThinPlan.__call__
    monkeypatch.setattr(ThinPlan, "__call__", lambda self, *a: calls.append(1) or thin(self, *a))

    def expected(name: str | None) -> torch.Tensor:
        out = base(x)
        if name is not None:
            A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
            out = out + layer.scaling[name] * (x @ A.T @ B.T)
        return out

    def check(name: str | None, thin_taken: bool = True) -> None:
        calls.clear()
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected(name), atol=1e-5, rtol=1e-5)
        assert bool(calls) == thin_taken

    with torch.no_grad():  # the adapters change the output, and differently: the checks below mean something
        assert not torch.allclose(expected("a"), expected("b"), atol=1e-3)
        assert not torch.allclose(expected("a"), expected(None), atol=1e-3)
    model.set_adapter("a")
    check("a")
    check("a")  # the cached plan
    model.set_adapter("b")
    check("b")
    with torch.no_grad():
        layer.lora_B["b"].weight.mul_(-3.0)  # an optimizer step changes B in place
    check("b")
    model.merge(["b"])
    check("b", thin_taken=False)  # merged: the base weight carries it
    model.unmerge()
    check("b")
    with model.disable_adapters():
        check(None, thin_taken=False)
    check("b")
    model.delete_adapter("b")
    model.add_adapter(config, adapter_name="b")
    randomize(model, "b", seed=3)
    model.set_adapter("b")
    check("b")
    layer.lora_A["b"].weight = torch.nn.Parameter(torch.randn(4, 64))  # a replaced parameter object
    check("b")
    layer.scaling["b"] = 5.0
    check("b")
    with torch.no_grad(), model.mixed_batch(["a"]):
        torch.testing.assert_close(model(x), expected("a"), atol=1e-5, rtol=1e-5)
    check("b")
    want = expected("b").detach()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model(x).float(), want, atol=0.05, rtol=0.05)
