"""AdaptedModel behaviour: several adapters, enable/disable, merge/unmerge/unload, delete, names, warnings."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import peftkit
from peftkit.layers import AdapterLayer

from conftest import CASES, MLP, randomize, run, tiny_bert, tiny_gpt2


def two_adapters(case):
    base = case.model()
    model = peftkit.adapt(copy.deepcopy(base), peftkit.LoraConfig(r=4, alpha=8, target_modules=mergeable_targets(case)))
    peftkit.adapt(model, peftkit.LoraConfig(r=2, alpha=4, use_rslora=True, target_modules=mergeable_targets(case)), "other")
    randomize(model, "default", seed=1)
    randomize(model, "other", seed=2)
    return base, model


def mergeable_targets(case):
    # merging an Embedding adapter into GPT-2's tied wte would change lm_head too; covered separately below
    return ["c_attn", "c_fc"] if case.name == "gpt2" else case.targets


def test_switching_adapters_and_summing_several(case):
    base, model = two_adapters(case)
    inputs = case.inputs()
    y_base = run(base, inputs)
    assert model.active_adapters == ["default"]  # adding an adapter does not activate it
    y_default = run(model, inputs)
    model.set_adapter("other")
    y_other = run(model, inputs)
    assert not torch.allclose(y_default, y_other) and not torch.allclose(y_default, y_base)
    model.set_adapter("default")
    assert torch.equal(run(model, inputs), y_default)  # switching back is exact

    # trainability follows the active adapter
    for name, param in model.named_parameters():
        if ".other" in name:
            assert not param.requires_grad
        elif ".default" in name:
            assert param.requires_grad

    model.set_adapter(["default", "other"])
    both = run(model, inputs)
    assert not torch.allclose(both, y_default) and not torch.allclose(both, y_other)


def test_several_active_adapters_add_their_deltas():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5))
    model = peftkit.adapt(copy.deepcopy(base), peftkit.LoraConfig(r=2, alpha=4, target_modules=["0"]))
    peftkit.adapt(model, peftkit.LoraConfig(r=3, alpha=3, target_modules=["0"]), "b")
    randomize(model, "default", 1)
    randomize(model, "b", 2)
    layer = model.base_model[0]
    model.set_adapter(["default", "b"])
    x = torch.randn(7, 6)
    expected = base(x) + x @ layer.delta_weight("default").T + x @ layer.delta_weight("b").T
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_disable_adapters_restores_previous_state(case):
    base, model = two_adapters(case)
    inputs = case.inputs()
    y_base, y_adapted = run(base, inputs), run(model, inputs)
    with model.disable_adapters():
        torch.testing.assert_close(run(model, inputs), y_base, atol=1e-6, rtol=0)
    torch.testing.assert_close(run(model, inputs), y_adapted)
    # nested: disabled inside stays disabled after the inner block, until the outer block ends
    with model.disable_adapters():
        with model.disable_adapters():
            pass
        torch.testing.assert_close(run(model, inputs), y_base, atol=1e-6, rtol=0)
    torch.testing.assert_close(run(model, inputs), y_adapted)


def test_merge_equivalence_unmerge_and_idempotence(case):
    base, model = two_adapters(case)
    inputs = case.inputs()
    weights_before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model.set_adapter(["default", "other"])
    unmerged = run(model, inputs)
    model.merge()
    assert set(model.merged_adapters) == {"default", "other"}
    tol = 1e-4 if case.name != "conv" else 1e-3
    torch.testing.assert_close(run(model, inputs), unmerged, atol=tol, rtol=1e-4)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge()
    torch.testing.assert_close(run(model, inputs), unmerged, atol=tol, rtol=1e-4)
    # disabling while merged unmerges first
    with model.disable_adapters():
        torch.testing.assert_close(run(model, inputs), run(base, inputs), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(run(model, inputs), unmerged, atol=tol, rtol=1e-4)
    model.unmerge()
    assert model.merged_adapters == []
    torch.testing.assert_close(run(model, inputs), unmerged, atol=1e-5, rtol=1e-4)
    state = {n.replace(".base_layer", ""): p for n, p in model.base_model.named_parameters() if "lora_" not in n and "modules_to_save" not in n}
    for name, before in weights_before.items():
        torch.testing.assert_close(state[name], before, atol=1e-6, rtol=0)


def test_sequential_merge_equals_batch_merge(case):
    _, seq = two_adapters(case)
    _, batch = two_adapters(case)
    inputs = case.inputs()
    seq.set_adapter(["default", "other"])
    batch.set_adapter(["default", "other"])
    seq.merge(["default"])
    seq.merge(["other"])
    batch.merge()
    torch.testing.assert_close(run(seq, inputs), run(batch, inputs), atol=1e-5, rtol=1e-4)


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    model = peftkit.adapt(MLP(), peftkit.LoraConfig(r=2, target_modules=["lin0", "lin1"]))
    randomize(model)
    with torch.no_grad():
        model.base_model.lin1.lora_B["default"].weight[0, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="non-finite"):
        model.merge(safe=True)
    assert model.merged_adapters == []
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name  # lin0 was not merged either


def test_merge_and_unload_gives_a_plain_model_that_saves(tmp_path):
    base = tiny_bert()
    model = peftkit.adapt(copy.deepcopy(base), peftkit.LoraConfig(r=4, target_modules="all-linear"))
    randomize(model)
    inputs = {"input_ids": torch.randint(0, 100, (2, 7))}
    expected = run(model, inputs)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert type(plain) is type(base)
    assert plain.state_dict().keys() == base.state_dict().keys()
    torch.testing.assert_close(run(plain, inputs), expected, atol=1e-5, rtol=1e-4)
    assert all(p.requires_grad for p in plain.parameters())  # restored to the state before adapt()
    plain.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = type(base).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(run(reloaded, inputs), expected, atol=1e-5, rtol=1e-4)


def test_unload_gives_back_the_base(case):
    base, model = two_adapters(case)
    inputs = case.inputs()
    model.merge()
    plain = model.unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert len(plain.state_dict()) == len(base.state_dict())
    torch.testing.assert_close(run(plain, inputs), run(base, inputs), atol=1e-5, rtol=1e-4)


def test_merge_into_tied_embedding_is_refused():
    model = peftkit.adapt(tiny_gpt2(), peftkit.LoraConfig(r=4, target_modules=["c_attn", "wte"]))
    randomize(model)
    with pytest.raises(ValueError, match="tied"):
        model.merge()
    assert model.merged_adapters == []


def test_delete_adapter():
    base, model = two_adapters(CASES[0])
    model.set_adapter(["default", "other"])
    model.merge(["other"])
    with pytest.raises(ValueError, match="merged"):
        model.delete_adapter("other")
    assert "other" in model.adapters and model.merged_adapters == ["other"]
    model.unmerge()
    model.delete_adapter("other")
    assert list(model.adapters) == ["default"] and model.active_adapters == ["default"]
    assert not any(".other" in n for n, _ in model.named_parameters())
    for _, layer in model.adapter_layers():
        assert "other" not in layer.adapter_names and "other" not in getattr(layer, "scaling", {})
    model.delete_adapter("default")
    assert model.active_adapters == [] and not any(p.requires_grad for p in model.parameters())
    x = CASES[0].inputs()
    torch.testing.assert_close(run(model, x), run(base, x))
    with pytest.raises(KeyError, match="no adapter named"):
        model.delete_adapter("nope")


@pytest.mark.parametrize("bad", ["lora", "base_layer", "lora_A", "a.b", "", "base", "weight"])
def test_adapter_names_that_collide_are_refused(bad):
    model = MLP()
    with pytest.raises(ValueError, match="adapter name"):
        peftkit.adapt(model, peftkit.LoraConfig(target_modules=["lin0"]), bad)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())  # the model is left as it was


def test_adapter_names_that_are_substrings_of_module_names_work():
    model = peftkit.adapt(tiny_bert(), peftkit.LoraConfig(target_modules=["query"]), "query")
    peftkit.adapt(model, peftkit.LoraConfig(target_modules=["query"]), "self")
    assert set(model.adapters) == {"query", "self"}
    model.set_adapter(["query", "self"])
    model(input_ids=torch.randint(0, 100, (1, 4)))


def test_duplicate_adapter_name_is_refused():
    model = peftkit.adapt(MLP(), peftkit.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="already exists"):
        peftkit.adapt(model, peftkit.LoraConfig(target_modules=["lin1"]))


def test_sequence_classification_head_is_saved_automatically():
    model = peftkit.adapt(tiny_bert(), peftkit.LoraConfig(target_modules=["query"]))
    assert model.adapters["default"].injection.saved_modules == ["classifier"]
    assert model.base_model.classifier.modules_to_save["default"].weight.requires_grad
    assert model.adapters["default"].injection.task_type == "SEQ_CLS"


def test_warns_when_a_fresh_head_would_be_lost(tmp_path):
    from transformers import AutoModelForSequenceClassification, BertModel

    tiny_bert().bert.save_pretrained(tmp_path)
    fresh = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peftkit.adapt(fresh, peftkit.LoraConfig(target_modules=["query"]))
    assert not [w for w in caught if "initialised at random" in str(w.message)]  # the head is saved automatically

    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = BertModel.from_pretrained(tmp_path)
            self.head = torch.nn.Linear(32, 2)  # random, and nothing marks it: not detectable
            self.fresh = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2)

        def forward(self, input_ids):
            return self.fresh(input_ids=input_ids).logits

    with pytest.warns(UserWarning, match=r"fresh\.classifier.*initialised at random"):
        peftkit.adapt(Custom(), peftkit.LoraConfig(target_modules=["query"]))


def test_failed_adapt_leaves_the_model_untouched():
    model = MLP()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(peftkit.TargetError):
        peftkit.adapt(model, peftkit.LoraConfig(target_modules=["lin0", "lin9"]))
    assert model.state_dict().keys() == before.keys()
    assert all(p.requires_grad for p in model.parameters())


def test_forward_signature_and_attribute_passthrough():
    model = peftkit.adapt(tiny_bert(), peftkit.LoraConfig(target_modules=["query"]))
    assert model.config.model_type == "bert"  # falls through to the base model
    out = model(input_ids=torch.randint(0, 100, (2, 4)), labels=torch.tensor([0, 1]))
    assert out.loss is not None and out.logits.shape == (2, 3)


@pytest.mark.parametrize("dtype,bits", [(torch.bfloat16, 8), (torch.float16, 11)])
def test_half_precision_merge_error_is_one_rounding(dtype, bits):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 48)).to(dtype)
    original = base[0].weight.detach().float().clone()
    model = peftkit.adapt(base, peftkit.LoraConfig(r=4, alpha=8, target_modules=["0"]))
    randomize(model, scale=0.1)
    delta = model.base_model[0].delta_weight("default")
    exact = original + delta
    model.merge()
    merged = model.base_model[0].base_layer.weight.detach().float()
    tiny = torch.finfo(dtype).smallest_normal  # below it, fp16 rounds with a fixed (subnormal) spacing
    assert ((merged - exact).abs() <= (exact.abs() + tiny) * 2.0**-bits).all()
    model.unmerge()
    restored = model.base_model[0].base_layer.weight.detach().float()
    assert ((restored - original).abs() <= (original.abs() + exact.abs() + 2 * tiny) * 2.0**-bits).all()
