"""Adapters that train base parameters (LoRA bias='all'/'lora_only', bottleneck LayerNorms) keep them per adapter:
the shared base never changes. Their files stay PEFT's (full bias values), and PEFT's own files load."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import peftkit
from peftkit.layers.bitfit import BiasDelta

from conftest import randomize, run, tiny_bert

peft = pytest.importorskip("peft")

X = {"input_ids": torch.tensor([[5, 17, 3, 44, 9, 2], [8, 1, 66, 23, 7, 0], [4, 4, 90, 12, 3, 6],
                                [31, 2, 7, 7, 50, 1], [9, 9, 9, 1, 2, 3]]),
     "attention_mask": torch.ones(5, 6, dtype=torch.long)}

CONFIGS = {
    "ball": peftkit.LoraConfig(r=2, target_modules=["query"], bias="all"),
    "bonly": peftkit.LoraConfig(r=2, target_modules=["value", "intermediate.dense"], bias="lora_only"),
    "norms": peftkit.BottleneckConfig(variant="houlsby", reduction_factor=4, train_layer_norms=True),
    "plain": peftkit.LoraConfig(r=2, target_modules=["query", "value"]),
}


def _alone(tmp_path, seed=0):
    """Each adapter trained (randomised) on its own copy of the base, saved; its outputs there."""
    expected = {}
    for i, (name, config) in enumerate(CONFIGS.items()):
        model = peftkit.adapt(tiny_bert(), config)
        randomize(model, seed=seed + i, scale=0.2)
        expected[name] = run(model, X)
        model.save_adapter(tmp_path / name)
    return expected


def test_base_training_adapters_coexist_and_leave_the_base_untouched(tmp_path):
    expected = _alone(tmp_path)
    reference = tiny_bert()
    base_out = run(reference, X)
    shared = peftkit.AdaptedModel(tiny_bert())
    for name in CONFIGS:
        shared.load_adapter(tmp_path / name, name)
    for name in CONFIGS:
        shared.set_adapter(name)
        torch.testing.assert_close(run(shared, X), expected[name], atol=1e-5, rtol=1e-5)
    # one mixed batch: every row through its own adapter, the base row the base (the heads' batched matmul
    # sums in another order than nn.Linear: last-bit differences)
    names = ["ball", "bonly", "plain", "norms", "base"]
    mixed = run(shared.eval(), {**X, "adapter_names": names})
    for row, name in enumerate(names[:-1]):
        torch.testing.assert_close(mixed[row], expected[name][row], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[4], base_out[4], atol=1e-7, rtol=0)
    with shared.disable_adapters():
        assert torch.equal(run(shared, X), base_out)
    shared.delete_adapter("ball")
    shared.set_adapter("plain")
    torch.testing.assert_close(run(shared, X), expected["plain"], atol=1e-5, rtol=1e-5)
    plain = shared.unload()
    after = plain.state_dict()
    assert set(after) == set(reference.state_dict())
    assert all(torch.equal(after[k], v) for k, v in reference.state_dict().items())
    assert torch.equal(run(plain, X), base_out)


def test_disable_adapters_gives_the_base_exactly_without_a_warning():
    reference = tiny_bert()
    model = peftkit.adapt(tiny_bert(), peftkit.LoraConfig(r=2, bias="all"))
    randomize(model, scale=0.2)
    assert not torch.allclose(run(model, X), run(reference, X))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with model.disable_adapters():
            assert torch.equal(run(model, X), run(reference, X))


def test_the_trainable_set_is_the_declared_one():
    model = peftkit.adapt(tiny_bert(), peftkit.LoraConfig(r=2, target_modules=["query"], bias="all"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    biased = [n for n, m in tiny_bert().named_modules() if getattr(m, "bias", None) is not None and n != "classifier"]
    deltas = [n for n in trainable if "bias_delta" in n]
    assert len(deltas) == len(biased) and len(deltas) == sum(1 for _, l in model.adapter_layers() if isinstance(l, BiasDelta))
    assert all("lora_" in n or "bias_delta" in n or "classifier.modules_to_save" in n for n in trainable)
    norms = peftkit.adapt(tiny_bert(), peftkit.BottleneckConfig(variant="pfeiffer", train_layer_norms=True))
    trainable = [n for n, p in norms.named_parameters() if p.requires_grad]
    layer_norms = [n for n, m in tiny_bert().named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert sum("weight_delta" in n for n in trainable) == len(layer_norms) == sum("LayerNorm.bias_delta" in n for n in trainable)
    assert all("adapter_" in n or "_delta" in n or "classifier.modules_to_save" in n for n in trainable)
    model.set_adapter("default")  # re-applying the state changes nothing
    assert all(not p.requires_grad for n, p in model.named_parameters() if "delta" not in n and "lora_" not in n
               and "modules_to_save" not in n)


def test_bias_all_file_from_peftkit_loads_in_peft(tmp_path):
    model = peftkit.adapt(tiny_bert(), peftkit.LoraConfig(r=4, alpha=8, bias="all"))
    randomize(model, scale=0.2)
    expected = run(model, X)
    model.save_adapter(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    torch.testing.assert_close(run(theirs, X), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_peft_bias_file_of_a_seq_cls_model_loads_in_peftkit(tmp_path, bias):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS", bias=bias)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if param.requires_grad:  # LoRA factors, the head and (trained in place by PEFT) the base biases
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    expected = run(theirs, X)
    theirs.save_pretrained(tmp_path)
    reference = tiny_bert()
    ours = peftkit.load_adapter(tiny_bert(), tmp_path)
    torch.testing.assert_close(run(ours, X), expected, atol=1e-5, rtol=1e-5)
    with ours.disable_adapters():
        assert torch.equal(run(ours, X), run(reference, X))
    # and back: peftkit's save of it loads in PEFT with the same outputs
    ours.save_adapter(tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "again").eval()
    torch.testing.assert_close(run(again, X), expected, atol=1e-5, rtol=1e-5)


def test_peft_dead_target_entries_load_with_a_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS"),
                                     adapter_name="a0")
        theirs.add_adapter("a1", peft.LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if ".a1" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    theirs.set_adapter("a1")
    expected = run(theirs.eval(), X)
    theirs.save_pretrained(tmp_path)
    import json
    assert "classifier.modules_to_save.a0" in json.loads((tmp_path / "a1" / "adapter_config.json").read_text())["target_modules"]
    with pytest.warns(UserWarning, match=r"match no module of this model; ignored"):
        ours = peftkit.load_adapter(tiny_bert(), tmp_path, adapter_name="a1")
    torch.testing.assert_close(run(ours, X), expected, atol=1e-5, rtol=1e-5)
    # a user's own config keeps the near-miss error
    with pytest.raises(peftkit.TargetError, match="'quary' matches no module.*query"):
        peftkit.adapt(tiny_bert(), peftkit.LoraConfig(target_modules=["query", "quary"]))
