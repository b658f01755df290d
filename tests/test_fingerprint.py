"""The base fingerprint tells bases apart by every value (at bf16 precision), and only the frozen base counts."""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit
from peftkit.fingerprint import base_fingerprint

from conftest import randomize, tiny_bert


def test_same_base_same_fingerprint_and_adapted_model_records_it():
    a, b = tiny_bert(seed=0), tiny_bert(seed=0)
    assert base_fingerprint(a) == base_fingerprint(b)
    assert peftkit.AdaptedModel(b).base_fingerprint == base_fingerprint(a)
    assert base_fingerprint(tiny_bert(seed=1)) != base_fingerprint(a)


def test_values_beyond_the_first_1024_of_each_tensor_count():
    base = tiny_bert()
    before = base_fingerprint(base)
    other = copy.deepcopy(base)
    with torch.no_grad():
        for param in other.parameters():
            if param.numel() > 1024:
                param.view(-1)[1024:] += 0.01
    assert any(p.numel() > 1024 for p in other.parameters())
    assert base_fingerprint(other) != before


def test_one_value_of_one_tensor_counts():
    base = tiny_bert()
    before = base_fingerprint(base)
    with torch.no_grad():
        base.bert.encoder.layer[1].intermediate.dense.weight.view(-1)[-1] += 0.05
    assert base_fingerprint(base) != before


def test_a_few_adam_steps_at_lr_2e5_change_it():
    """A slightly fine-tuned variant: one matrix of the base, 3 real Adam steps at lr 2e-5 (each value moves by
    about 6e-5, below bf16's step for most weights, yet enough values cross a rounding boundary)."""
    base = tiny_bert()
    before = base_fingerprint(base)
    tuned = copy.deepcopy(base).train()
    weight = tuned.bert.encoder.layer[1].intermediate.dense.weight
    for param in tuned.parameters():
        param.requires_grad_(param is weight)
    optimizer = torch.optim.Adam([weight], lr=2e-5)
    torch.manual_seed(0)
    for _ in range(3):
        out = tuned(input_ids=torch.randint(0, 100, (4, 9)), labels=torch.randint(0, 3, (4,)))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    change = (weight.detach() - base.bert.encoder.layer[1].intermediate.dense.weight).abs().max().item()
    assert 0 < change < 1e-4  # a genuinely small fine-tuning step
    assert base_fingerprint(tuned) != before


def test_bf16_cast_keeps_it():
    base = tiny_bert()
    before = base_fingerprint(base)
    model = peftkit.adapt(copy.deepcopy(base), peftkit.LoraConfig(r=2, target_modules=["query"]))
    model.cast_frozen(torch.bfloat16)
    assert model.base_model.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert base_fingerprint(model.base_model) == before
    assert base_fingerprint(base.to(torch.bfloat16)) == before


def test_task_heads_modules_to_save_and_adapter_parameters_do_not_count():
    base = tiny_bert()
    before = base_fingerprint(base)
    model = peftkit.adapt(copy.deepcopy(base), peftkit.LoraConfig(r=2, target_modules=["query", "value"],
                                                                   modules_to_save=["pooler.dense"]))
    randomize(model)
    with torch.no_grad():
        model.base_model.classifier.weight.normal_()  # another random task head
    assert base_fingerprint(model.base_model) == before
    assert model.base_fingerprint == before


def test_sharded_parameters_are_refused():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group is already running")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        layer = torch.nn.Linear(4, 4)
        fully_shard(layer, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(RuntimeError, match="sharded"):
            base_fingerprint(layer)
        assert peftkit.AdaptedModel(torch.nn.Sequential(layer)).base_fingerprint is None
    finally:
        dist.destroy_process_group()


def test_an_adapter_from_a_fine_tuned_variant_is_refused_on_load(tmp_path):
    base = tiny_bert()
    model = peftkit.adapt(copy.deepcopy(base), peftkit.LoraConfig(r=2, target_modules=["query"]))
    randomize(model)
    model.save_adapter(tmp_path)
    peftkit.AdaptedModel(copy.deepcopy(base)).load_adapter(tmp_path, check_base=True)
    variant = copy.deepcopy(base)
    with torch.no_grad():
        variant.bert.encoder.layer[0].output.dense.weight.view(-1)[-5:] += 1e-3
    with pytest.raises(peftkit.io.AdapterFileError, match="another base model"):
        peftkit.AdaptedModel(variant).load_adapter(tmp_path, check_base=True)


def test_an_old_scheme_fingerprint_is_not_compared(tmp_path):
    from safetensors.torch import load_file, save_file

    model = peftkit.adapt(tiny_bert(), peftkit.LoraConfig(r=2, target_modules=["query"]))
    randomize(model)
    model.save_adapter(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file(load_file(path), path, metadata={"format": "pt", "base_fingerprint": "0123456789abcdef"})
    with pytest.warns(UserWarning, match="older peftkit"):
        peftkit.AdaptedModel(tiny_bert(seed=5)).load_adapter(tmp_path, check_base=True)
