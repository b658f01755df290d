"""AdaLoRA: budget schedule, masking to budget, regulariser, pruned save / resized load, PEFT files."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.methods.adalora import AdaLoraConfig, RankAllocator

from conftest import MLP, randomize, run, tiny_bert, tiny_gpt2

BERT_X = {"input_ids": torch.tensor([[5, 17, 3, 44, 9, 2], [8, 1, 66, 23, 7, 0]])}


def test_budget_schedule_matches_the_reference_values():
    config = AdaLoraConfig(init_r=6, target_r=2, total_step=10, tinit=1, tfinal=2, target_modules=["lin0"])
    allocator = RankAllocator(config, {"lin0": None}, "default")
    assert [allocator.budget_schedule(step)[0] for step in range(11)] == [6, 6, 4, 3, 2, 2, 2, 2, 2, 2, 2]


def test_phases_that_do_not_fit_are_refused():
    with pytest.raises(peftkit.ConfigError, match=r"tinit \(8\) \+ tfinal \(2\) must be less than total_step \(10\)"):
        AdaLoraConfig(tinit=8, tfinal=2, total_step=10)
    with pytest.raises(peftkit.ConfigError, match="total_step"):
        AdaLoraConfig()


def train(model, steps, x):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for step in range(steps):
        loss = model(x).pow(2).mean() + model.regularization()
        loss.backward()
        optimizer.step()
        model.after_optimizer_step(step)
        optimizer.zero_grad()
    model.eval()


def test_identity_at_init_then_masking_keeps_exactly_the_budget():
    base = MLP()
    config = AdaLoraConfig(init_r=6, target_r=2, total_step=12, tinit=2, tfinal=3, target_modules=["lin0", "lin1"])
    model = peftkit.adapt(copy.deepcopy(base), config)
    x = torch.randn(16, 10)
    torch.testing.assert_close(model(x), base(x))
    train(model, 12, x)
    layers = [model.base_model.lin0, model.base_model.lin1]
    kept = sum(int((layer.lora_E["default"] != 0).sum()) for layer in layers)
    assert kept == 2 * 2  # target_r per matrix, over the two matrices
    pattern = model.adapters["default"].injection.state.rank_pattern
    assert sum(sum(v) for v in pattern.values()) == 4 and set(pattern) == {"lin0.lora_E", "lin1.lora_E"}


def test_orthogonality_regulariser_is_the_mean_frobenius_distance():
    model = peftkit.adapt(MLP(), AdaLoraConfig(init_r=3, target_r=2, total_step=5, orth_reg_weight=0.5, target_modules=["lin1"]))
    layer = model.base_model.lin1
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    expected = 0.5 * (torch.linalg.matrix_norm(A @ A.T - torch.eye(3)) + torch.linalg.matrix_norm(B.T @ B - torch.eye(3))) / 2
    torch.testing.assert_close(model.regularization(), expected)


def test_save_prunes_to_the_kept_ranks_and_load_resizes(tmp_path):
    base = MLP()
    state = copy.deepcopy(base.state_dict())
    config = AdaLoraConfig(init_r=6, target_r=2, total_step=10, tinit=1, tfinal=2, target_modules=["lin0", "lin1"])
    model = peftkit.adapt(base, config)
    x = torch.randn(16, 10)
    train(model, 10, x)
    expected = model(x)
    model.save_adapter(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and not any("ranknum" in k for k in tensors)
    for path in ("lin0", "lin1"):
        kept = sum(saved["rank_pattern"][f"{path}.lora_E"])
        assert tensors[f"base_model.model.{path}.lora_A"].shape == (kept, 10 if path == "lin0" else 20)
        assert tensors[f"base_model.model.{path}.lora_E"].shape == (kept, 1)
    fresh = MLP()
    fresh.load_state_dict(state)
    loaded = peftkit.load_adapter(fresh, tmp_path)
    assert loaded.base_model.lin0.ranknum["default"] == 6.0  # the scale stays alpha / init_r
    torch.testing.assert_close(loaded(x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("build,targets", [(tiny_bert, ["query", "value"]), (tiny_gpt2, ["c_attn"])])
def test_adalora_files_work_with_peft_both_ways(build, targets, tmp_path):
    import peft  # a test dependency: a missing peft fails here instead of skipping

    ids = BERT_X
    ours = peftkit.adapt(build(), AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=targets))
    randomize(ours, scale=0.1)
    with torch.no_grad():  # prune one triplet per matrix, as training would
        state = ours.adapters["default"].injection.state
        state.rank_pattern = {f"{p}.lora_E": [True, False, True, True] for p in ours.targeted_modules()}
        state.mask_using_rank_pattern()
    expected = run(ours, ids)
    ours.save_adapter(tmp_path / "ours")
    kwargs = {"task_type": "SEQ_CLS"} if build is tiny_bert else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    torch.testing.assert_close(run(theirs, ids), expected, atol=1e-5, rtol=1e-5)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build(), peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                                  target_modules=targets, **kwargs)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = peftkit.load_adapter(build(), tmp_path / "theirs")
    torch.testing.assert_close(run(loaded, ids), run(theirs, ids), atol=1e-5, rtol=1e-5)


def test_merge_equals_unmerged():
    model = peftkit.adapt(MLP(), AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["lin0", "lin1"]))
    randomize(model, scale=0.3)
    x = torch.randn(5, 10)
    expected = model(x)
    model.merge()
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
