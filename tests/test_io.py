"""Saving and loading: round trips, sub-folders, strict key accounting, safetensors only, atomic writes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from peftkit import AdapterFileError, io
from peftkit.fingerprint import base_fingerprint

from conftest import CASES, MLP, randomize, run, tiny_bert


def fresh_base(case, base_state):
    """A new instance of the base model (other random init), given the same pretrained weights."""
    model = case.model(seed=99)
    model.load_state_dict(base_state)
    return model


def test_round_trip_reproduces_outputs(case, tmp_path):
    base = case.model()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = peftkit.adapt(base, peftkit.LoraConfig(r=4, alpha=16, use_rslora=True, target_modules=case.targets))
    randomize(model)
    inputs = case.inputs()
    expected = run(model, inputs)
    model.save_adapter(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert all(k.startswith("base_model.model.") and ".default" not in k for k in keys)

    loaded = peftkit.load_adapter(fresh_base(case, base_state), tmp_path)
    torch.testing.assert_close(run(loaded, inputs), expected, atol=1e-5, rtol=1e-5)
    original = io.adapter_state(model.base_model, "default")
    for key, value in io.adapter_state(loaded.base_model, "default").items():
        assert torch.equal(value, original[key]), key
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded frozen unless trainable=True
    trainable = peftkit.load_adapter(fresh_base(case, base_state), tmp_path, trainable=True)
    assert all(p.requires_grad for p in io.adapter_state(trainable.base_model, "default").values())


def test_adapter_name_makes_no_difference_and_subfolders(tmp_path):
    base = tiny_bert()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = peftkit.adapt(base, peftkit.LoraConfig(r=4, target_modules=["query", "value"]))
    peftkit.adapt(model, peftkit.LoraConfig(r=2, target_modules=["key"]), "query")  # a name that is also a module name
    randomize(model, "default", 1)
    randomize(model, "query", 2)
    x = {"input_ids": torch.randint(0, 100, (2, 6))}
    model.set_adapter("query")
    y_query = run(model, x)
    model.save_adapter(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "query" / "adapter_config.json").exists()
    expected_keys = {f"base_model.model.bert.encoder.layer.{i}.attention.self.key.lora_{m}.weight" for i in (0, 1) for m in "AB"}
    expected_keys |= {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert set(load_file(tmp_path / "query" / "adapter_model.safetensors").keys()) == expected_keys

    fresh = tiny_bert(seed=5)
    fresh.load_state_dict(state)
    loaded = peftkit.load_adapter(fresh, tmp_path, adapter_name="query")  # found in the sub-folder
    torch.testing.assert_close(run(loaded, x), y_query, atol=1e-6, rtol=0)
    fresh2 = tiny_bert(seed=6)
    fresh2.load_state_dict(state)
    other_name = peftkit.load_adapter(fresh2, tmp_path / "query", adapter_name="renamed")
    torch.testing.assert_close(run(other_name, x), y_query, atol=1e-6, rtol=0)

    # load into an existing adapted model next to what it has
    loaded.load_adapter(tmp_path, "default")
    assert set(loaded.adapters) == {"query", "default"}


def test_save_one_selected_adapter(tmp_path):
    model = peftkit.adapt(MLP(), peftkit.LoraConfig(target_modules=["lin0"]))
    peftkit.adapt(model, peftkit.LoraConfig(target_modules=["lin1"]), "b")
    model.save_adapter(tmp_path, adapter_name="b")
    assert os.listdir(tmp_path) == ["b"]
    with pytest.raises(AdapterFileError, match="sub-folders: b"):
        peftkit.load_adapter(MLP(), tmp_path)


def saved_mlp(tmp_path, **kw):
    model = peftkit.adapt(MLP(), peftkit.LoraConfig(r=4, target_modules=["lin0", "lin1"], **kw))
    randomize(model)
    model.save_adapter(tmp_path)
    return model


def rewrite(tmp_path, change):
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file(change(tensors), tmp_path / "adapter_model.safetensors")


def test_missing_key_is_an_error_and_nothing_is_loaded(tmp_path):
    saved_mlp(tmp_path)
    rewrite(tmp_path, lambda t: {k: v for k, v in t.items() if "lin1.lora_B" not in k})
    target = MLP()
    with pytest.raises(AdapterFileError, match="missing from the file:\n.*lin1.lora_B.weight"):
        peftkit.load_adapter(target, tmp_path)
    assert not any(type(m).__name__.startswith("Lora") for m in target.modules())


def test_unexpected_key_is_an_error(tmp_path):
    saved_mlp(tmp_path)
    rewrite(tmp_path, lambda t: {**t, "base_model.model.lin1.lora_magnitude_vector": torch.ones(20)})
    with pytest.raises(AdapterFileError, match="in the file but not in the model:\n.*lora_magnitude_vector"):
        peftkit.load_adapter(MLP(), tmp_path)


def test_shape_mismatch_is_an_error(tmp_path):
    saved_mlp(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match=r"different shapes:\n.*lin0.lora_A.weight: file \(4, 10\) vs model \(8, 10\)"):
        peftkit.load_adapter(MLP(), tmp_path)


def test_existing_adapters_survive_a_failed_load(tmp_path):
    saved_mlp(tmp_path)
    rewrite(tmp_path, lambda t: {k: v for k, v in t.items() if "lin0" not in k})
    model = peftkit.adapt(MLP(), peftkit.LoraConfig(target_modules=["lin2"]), "keep")
    randomize(model, "keep")
    x = torch.randn(3, 10)
    before = model(x)
    with pytest.raises(AdapterFileError):
        model.load_adapter(tmp_path, "new")
    assert list(model.adapters) == ["keep"] and model.active_adapters == ["keep"]
    assert type(model.base_model.lin0).__name__ == "Linear"
    torch.testing.assert_close(model(x), before)


def test_keys_without_prefix_are_accepted_but_not_a_mix(tmp_path):
    model = saved_mlp(tmp_path)
    x = torch.randn(3, 10)
    rewrite(tmp_path, lambda t: {k.removeprefix("base_model.model."): v for k, v in t.items()})
    fresh = MLP()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.base_model.state_dict().items() if "lora" not in k})
    torch.testing.assert_close(peftkit.load_adapter(fresh, tmp_path)(x), model(x))
    rewrite(tmp_path, lambda t: {("base_model.model." + k if "lin0" in k else k): v for k, v in t.items()})
    with pytest.raises(AdapterFileError, match="one form"):
        peftkit.load_adapter(MLP(), tmp_path)


def test_only_safetensors_is_read(tmp_path):
    saved_mlp(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="safetensors only"):
        peftkit.load_adapter(MLP(), tmp_path)


def test_corrupt_files_are_reported(tmp_path):
    saved_mlp(tmp_path)
    data = (tmp_path / "adapter_model.safetensors").read_bytes()
    (tmp_path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
        peftkit.load_adapter(MLP(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="cannot read the adapter config"):
        peftkit.load_adapter(MLP(), tmp_path)
    with pytest.raises(AdapterFileError, match="does not exist"):
        peftkit.load_adapter(MLP(), tmp_path / "nowhere")


def test_unknown_config_keys_warn_and_unsupported_features_fail(tmp_path):
    saved_mlp(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "some_future_option": 3}))
    with pytest.warns(UserWarning, match="some_future_option"):
        peftkit.load_adapter(MLP(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": True}))
    with pytest.raises(ValueError, match="lora_bias"):
        peftkit.load_adapter(MLP(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ValueError, match="PREFIX_TUNING.*not supported"):
        peftkit.load_adapter(MLP(), tmp_path)


def test_config_dict_round_trip_and_copies():
    import copy
    import pickle

    config = peftkit.LoraConfig(r=4, target_modules=["a", "b"], rank_pattern={"a": 2})
    assert peftkit.LoraConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert pickle.loads(pickle.dumps(config)) == config and copy.deepcopy(config) == config
    with pytest.raises(peftkit.ConfigError, match="r must be a positive integer"):
        peftkit.LoraConfig(r=0)
    with pytest.raises(peftkit.ConfigError, match="dropout"):
        peftkit.LoraConfig(dropout=1.5)


def test_bias_all_is_saved_and_restored(tmp_path):
    base = MLP()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = peftkit.adapt(base, peftkit.LoraConfig(r=2, target_modules=["lin0"], bias="all"))
    randomize(model)
    # trained as per-adapter changes; the base biases themselves stay frozen and untouched
    assert model.base_model.lin2.bias_delta["default"].requires_grad and model.base_model.lin0.bias_delta["default"].requires_grad
    assert not model.base_model.lin2.weight.requires_grad and not model.base_model.lin2.bias.requires_grad
    with torch.no_grad():
        model.base_model.lin2.bias_delta["default"].add_(1.0)
    x = torch.randn(3, 10)
    expected = model(x)
    model.save_adapter(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert {"base_model.model.lin0.base_layer.bias", "base_model.model.lin2.bias"} <= set(keys)
    fresh = MLP()
    fresh.load_state_dict(state)
    torch.testing.assert_close(peftkit.load_adapter(fresh, tmp_path)(x), expected)


def test_writes_are_atomic(tmp_path, monkeypatch):
    model = saved_mlp(tmp_path)
    good = (tmp_path / "adapter_model.safetensors").read_bytes()
    randomize(model, seed=7)

    import safetensors.torch

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_adapter(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good  # the previous save is intact
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files left


def test_base_fingerprint_detects_another_base(tmp_path):
    base = tiny_bert()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    before = base_fingerprint(base)
    model = peftkit.adapt(base, peftkit.LoraConfig(r=2, target_modules=["query"]))
    assert base_fingerprint(model.base_model) == before  # adapters and the task head do not count
    randomize(model)
    model.save_adapter(tmp_path)
    same = tiny_bert(seed=8)
    same.load_state_dict(state)
    with torch.no_grad():
        same.classifier.weight.normal_()  # another random head: still the same base
    peftkit.AdaptedModel(same).load_adapter(tmp_path, check_base=True)
    other = tiny_bert(seed=9)  # same architecture, other weights
    with pytest.raises(AdapterFileError, match="saved from another base model"):
        peftkit.AdaptedModel(other).load_adapter(tmp_path, check_base=True)


def test_base_fingerprint_survives_bf16_cast_and_in_place_training(tmp_path):
    base = tiny_bert()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = peftkit.adapt(base, peftkit.BottleneckConfig(variant="houlsby", reduction_factor=4, train_layer_norms=True))
    model.cast_frozen(torch.bfloat16)  # a bf16 base, as `bf16: true` training uses
    randomize(model)
    with torch.no_grad():  # LayerNorms trained in place
        for name, param in model.named_parameters():
            if "LayerNorm" in name and param.requires_grad:
                param.add_(0.5)
    model.save_adapter(tmp_path)
    fresh = tiny_bert(seed=8)
    fresh.load_state_dict(state)
    peftkit.AdaptedModel(fresh).load_adapter(tmp_path, check_base=True)  # the fp32 base it was trained from
