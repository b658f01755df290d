"""Target selection: exact, suffix, regex, all-linear, layers_to_transform, exclusions, errors."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import TargetError

from conftest import MLP, tiny_bert, tiny_gpt2, tiny_llama


def targets(model, **config):
    return peftkit.adapt(model, peftkit.LoraConfig(**config)).targeted_modules()


def test_exact_and_suffix():
    assert targets(MLP(), target_modules=["lin1"]) == ["lin1"]
    names = targets(tiny_bert(), target_modules=["attention.self.query"])
    assert names == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"]
    # a suffix matches whole name segments only: "uery" is not "query"
    with pytest.raises(TargetError, match="closest module names: query"):
        targets(tiny_bert(), target_modules=["uery"])


def test_regex_is_a_full_match():
    names = targets(tiny_bert(), target_modules=r".*layer\.1\.attention\.self\.(query|key)")
    assert names == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.key"]
    with pytest.raises(TargetError, match="regular expression"):
        targets(tiny_bert(), target_modules=r"query")  # not a full path


def test_default_targets_by_model_type():
    assert {n.rsplit(".", 1)[-1] for n in targets(tiny_bert())} == {"query", "value"}
    assert {n.rsplit(".", 1)[-1] for n in targets(tiny_gpt2())} == {"c_attn"}
    assert {n.rsplit(".", 1)[-1] for n in targets(tiny_llama())} == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="target_modules is required"):
        targets(MLP())


def test_all_linear_excludes_output_head_and_saved_head():
    bert = targets(tiny_bert(), target_modules="all-linear")
    assert "classifier" not in bert and "bert.pooler.dense" in bert
    assert len(bert) == 2 * 6 + 1
    gpt2 = targets(tiny_gpt2(), target_modules="all-linear")
    assert "lm_head" not in gpt2 and len(gpt2) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    llama = targets(tiny_llama(), target_modules="all-linear")
    assert "lm_head" not in llama and len(llama) == 2 * 7


def test_layers_to_transform_and_pattern():
    names = targets(tiny_bert(), target_modules=["query", "value"], layers_to_transform=[1])
    assert names == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]
    names = targets(tiny_llama(), target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers")
    assert names == ["model.layers.0.self_attn.q_proj"]
    with pytest.raises(TargetError, match="layer indices present: \\[0, 1\\]"):
        targets(tiny_bert(), target_modules=["query"], layers_to_transform=[5])


def test_exclude_modules_list_and_regex():
    names = targets(tiny_bert(), target_modules="all-linear", exclude_modules=["pooler.dense", "intermediate.dense"])
    assert not any("pooler" in n or "intermediate" in n for n in names)
    names = targets(tiny_bert(), target_modules=["query", "value"], exclude_modules=r".*layer\.0\..*")
    assert all(".layer.1." in n for n in names) and len(names) == 2


def test_modules_to_save_overlap_is_excluded():
    names = targets(MLP(), target_modules=["lin1", "lin2"], modules_to_save=["lin2"])
    assert names == ["lin1"]


def test_unsupported_type_is_an_informative_error():
    with pytest.raises(TargetError, match="cannot wrap.*BertSelfAttention"):
        targets(tiny_bert(), target_modules=["attention.self"])


def test_unmatched_target_lists_close_names():
    with pytest.raises(TargetError) as err:
        targets(tiny_llama(), target_modules=["q_proj", "v_prj"])
    assert "'v_prj'" in str(err.value) and "v_proj" in str(err.value)


def test_adapting_again_reuses_the_wrapper():
    model = peftkit.adapt(MLP(), peftkit.LoraConfig(target_modules=["lin0"]))
    peftkit.adapt(model, peftkit.LoraConfig(target_modules=["lin0", "lin1"]), "second")
    layer = model.base_model.lin0
    assert set(layer.adapter_names) == {"default", "second"}
    assert isinstance(layer.base_layer, torch.nn.Linear)  # not wrapped twice
    assert model.targeted_modules("second") == ["lin0", "lin1"]
