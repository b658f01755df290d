"""Library checks the server relies on: adapter modes, adapter names, ranks, and the values in adapter files."""

from __future__ import annotations

import json
import time

import pytest
import torch

import peftkit
from peftkit.io import AdapterContentError

from conftest import MLP, randomize
from serve_helpers import edit_weights


def test_new_adapter_modules_follow_the_model_mode():
    """Adapters added after .eval() used to be created in training mode: dropout on at inference."""
    torch.manual_seed(0)
    model = peftkit.adapt(MLP().eval(), peftkit.LoraConfig(r=4, dropout=0.5, target_modules=["lin0", "lin1"]))
    assert not model.training  # the AdaptedModel takes the wrapped model's mode
    model.add_adapter(peftkit.LoraConfig(r=4, dropout=0.5, target_modules=["lin0", "lin1"]), "second")
    model.set_adapter("second")
    randomize(model, "second")
    assert not any(m.training for m in model.modules())
    x = torch.randn(8, 10)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    model.add_adapter(peftkit.LoraConfig(r=4, dropout=0.5, target_modules=["lin0"]), "third")
    assert all(m.training for m in model.modules())  # and in training mode, new modules train


def test_adapter_names_have_a_length_limit():
    model = peftkit.adapt(MLP(), peftkit.LoraConfig(r=2, target_modules=["lin0"]))
    with pytest.raises(ValueError, match="5000 characters; the limit is 100"):
        model.add_adapter(peftkit.LoraConfig(r=2, target_modules=["lin0"]), "a" * 5000)
    model.add_adapter(peftkit.LoraConfig(r=2, target_modules=["lin0"]), "a" * 100)


@pytest.mark.parametrize("rank", [10**6, 10**9])
def test_a_rank_the_layer_cannot_use_is_refused_before_allocating(rank):
    model = peftkit.adapt(MLP(), peftkit.LoraConfig(r=2, target_modules=["lin0"]))
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"'lin1'.*r=%d.*between 1 and 256" % rank):
        model.add_adapter(peftkit.LoraConfig(r=rank, target_modules=["lin1"]), "huge")
    assert time.perf_counter() - started < 1.0  # nothing was allocated
    assert "huge" not in model.adapters and list(model.adapters) == ["default"]
    assert "lora_A" not in dict(model.base_model.lin1.named_children())  # the layer was left unwrapped
    model.add_adapter(peftkit.LoraConfig(r=64, target_modules=["lin1"]), "wide")  # above min(in, out), still valid


def saved_adapter(tmp_path):
    torch.manual_seed(0)
    model = peftkit.adapt(MLP(), peftkit.LoraConfig(r=2, target_modules=["lin0", "lin1"]))
    randomize(model)
    model.save_adapter(tmp_path)
    return tmp_path


def test_non_float_tensors_in_an_adapter_file_are_refused(tmp_path):
    folder = saved_adapter(tmp_path)
    edit_weights(folder, lambda t: {k: (v * 10).to(torch.int8) if "lin1.lora_A" in k else v for k, v in t.items()})
    with pytest.raises(AdapterContentError, match=r"must be floating point.*lin1\.lora_A\.weight: torch\.int8"):
        peftkit.load_adapter(MLP(), folder)


def test_non_finite_weights_in_an_adapter_file_are_refused(tmp_path):
    folder = saved_adapter(tmp_path)

    def poison(tensors):
        tensors = dict(tensors)
        key = next(k for k in tensors if "lin0.lora_B" in k)
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0], tensors[key][1, 1] = float("nan"), float("inf")
        return tensors

    edit_weights(folder, poison)
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterContentError, match=r"NaN or infinite.*lin0\.lora_B\.weight: 2 of 40 values"):
        peftkit.load_adapter(model, folder)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is left as it was
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 2
