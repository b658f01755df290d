"""Merging is one transaction over every layer type, and merge_and_unload unties tied embeddings correctly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit
from peftkit.layers import AdapterLayer

from conftest import MLP, EmbeddingNet, randomize, run, tiny_bert, tiny_gpt2


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        bits = (lambda t: t.contiguous().view(torch.uint8)) if value.is_floating_point() else (lambda t: t)
        assert torch.equal(bits(after[name]), bits(value)), name  # bit for bit (NaN included)


# ------------------------------------------------------------------------------------------ tied embeddings
def tiny_tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


TIED = {
    "gpt2": (tiny_gpt2, ["wte", "c_attn"], "transformer.wte"),
    "llama": (tiny_tied_llama, ["embed_tokens", "q_proj"], "model.embed_tokens"),
}


@pytest.mark.parametrize("arch", list(TIED))
def test_merge_and_unload_unties_tied_embeddings_and_survives_a_reload(arch, tmp_path):
    build, targets, embedding = TIED[arch]
    base = build()
    assert base.lm_head.weight is base.get_submodule(embedding).weight  # tied to begin with
    original = base.lm_head.weight.detach().clone()
    model = peftkit.adapt(base, peftkit.LoraConfig(r=4, alpha=8, target_modules=targets))
    randomize(model, scale=0.5)
    inputs = {"input_ids": torch.randint(0, 100, (2, 11))}
    with torch.no_grad():
        expected = run(model, inputs)
        with model.disable_adapters():
            assert not torch.allclose(run(model, inputs), expected, atol=1e-3)  # the adapter changes the logits

    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    emb = plain.get_submodule(embedding).weight
    assert plain.lm_head.weight is not emb and plain.lm_head.weight.data_ptr() != emb.data_ptr()
    assert torch.equal(plain.lm_head.weight, original)  # the output layer keeps the original weight
    assert not torch.allclose(emb, original)  # the adapter went into the embedding
    assert plain.config.tie_word_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(run(plain, inputs), expected, atol=1e-5, rtol=1e-5)

    plain.save_pretrained(tmp_path)
    reloaded = type(plain).from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight.data_ptr() != reloaded.get_submodule(embedding).weight.data_ptr()  # not re-tied
    with torch.no_grad():
        torch.testing.assert_close(run(reloaded, inputs), expected, atol=1e-5, rtol=1e-5)


def test_plain_merge_of_a_tied_weight_is_refused_and_changes_nothing():
    model = peftkit.adapt(tiny_gpt2(), peftkit.LoraConfig(r=4, target_modules=["c_attn", "wte"]))
    randomize(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"tied.*merge_and_unload\(\) unties"):
        model.merge()
    assert model.merged_adapters == []
    assert_unchanged(model, before)  # c_attn was not merged either
    assert model.base_model.lm_head.weight is model.base_model.transformer.wte.base_layer.weight


class TiedNet(nn.Module):
    """A plain module (no transformers config) whose output layer reuses the embedding matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, 30, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.emb(ids))))


def test_merge_and_unload_unties_a_plain_module():
    torch.manual_seed(0)
    model = peftkit.adapt(TiedNet(), peftkit.LoraConfig(r=2, target_modules=["emb", "mix"]))
    randomize(model)
    ids = torch.randint(0, 30, (3, 5))
    with torch.no_grad():
        expected = model(ids)
    plain = model.merge_and_unload()
    assert plain.out.weight is not plain.emb.weight
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), expected, atol=1e-5, rtol=1e-5)


def test_adapters_on_both_holders_of_a_tied_weight_are_refused():
    model = peftkit.adapt(tiny_gpt2(), peftkit.LoraConfig(r=2, target_modules=["wte", "lm_head", "c_attn"]))
    randomize(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="share one weight"):
        model.merge_and_unload()
    assert model.merged_adapters == []
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------- one transaction
def bert_inputs():
    torch.manual_seed(3)
    return {"input_ids": torch.randint(0, 100, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}


def with_head(config_kwargs):
    return dict(config_kwargs, modules_to_save=["classifier"])


METHODS = {
    "lora+head": lambda: peftkit.LoraConfig(r=4, alpha=8, target_modules=["query", "value", "intermediate.dense"],
                                           modules_to_save=["classifier"]),
    "dora": lambda: peftkit.LoraConfig(r=4, alpha=8, use_dora=True, target_modules=["query", "output.dense"]),
    "adalora": lambda: peftkit.AdaLoraConfig(init_r=4, target_r=2, target_modules=["query", "value"], total_step=10),
    "bitfit": lambda: peftkit.BitFitConfig(),
    "head": lambda: peftkit.HeadConfig(),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_safe_merge_equals_unmerged_and_unmerge_restores(method):
    base = tiny_bert()
    model = peftkit.adapt(copy.deepcopy(base), METHODS[method]())
    randomize(model, scale=0.2)
    inputs = bert_inputs()
    weights = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        unmerged = run(model, inputs)
        model.merge(safe=True)
        torch.testing.assert_close(run(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge()
        assert model.merged_adapters == []
        torch.testing.assert_close(run(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    for name, param in model.base_model.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], atol=1e-6, rtol=0)


def test_safe_merge_of_an_embedding_adapter():
    torch.manual_seed(0)
    model = peftkit.adapt(EmbeddingNet(), peftkit.LoraConfig(r=3, target_modules=["emb", "proj"]))
    randomize(model)
    ids = torch.randint(0, 50, (3, 6))
    with torch.no_grad():
        unmerged = model(ids)
        model.merge(safe=True)
        torch.testing.assert_close(model(ids), unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge()
        torch.testing.assert_close(model(ids), unmerged, atol=1e-5, rtol=1e-5)


def test_non_finite_bitfit_delta_is_refused_and_nothing_changes():
    model = peftkit.adapt(tiny_bert(), peftkit.LoraConfig(r=2, target_modules=["query"]))
    peftkit.adapt(model, peftkit.BitFitConfig(), "bias_only")
    model.set_adapter(["default", "bias_only"])
    randomize(model, "default")
    randomize(model, "bias_only", seed=1)
    with torch.no_grad():
        model.base_model.bert.encoder.layer[1].output.dense.bias_delta["bias_only"][3] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite.*output.dense"):
        model.merge(safe=True)
    assert model.merged_adapters == []
    assert_unchanged(model, before)  # neither the LoRA weights nor any other bias moved


def test_overflow_in_the_base_dtype_is_refused_everywhere():
    """ΔW finite in fp32 but beyond fp16's range in one of three layers: nothing is merged anywhere."""
    torch.manual_seed(0)
    model = peftkit.adapt(MLP().half(), peftkit.LoraConfig(r=2, target_modules=["lin0", "lin1", "lin2"]))
    randomize(model)
    with torch.no_grad():
        model.base_model.lin1.lora_B["default"].weight.fill_(300.0)
        model.base_model.lin1.lora_A["default"].weight.fill_(300.0)  # s·B·A = 2·300·300·... > 65504
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite.*lin1"):
        model.merge(safe=True)
    assert model.merged_adapters == []
    assert_unchanged(model, before)


def test_a_bottleneck_adapter_among_mergeable_ones_refuses_and_changes_nothing():
    model = peftkit.adapt(tiny_bert(), peftkit.LoraConfig(r=2, target_modules=["query", "value"]))
    peftkit.adapt(model, peftkit.BottleneckConfig(variant="pfeiffer", reduction_factor=4), "bottle")
    model.set_adapter(["default", "bottle"])
    randomize(model, "default")
    randomize(model, "bottle", seed=1)
    before = snapshot(model)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    assert model.merged_adapters == []
    assert_unchanged(model, before)
    model.merge(["default"])  # the mergeable one alone still merges
    assert model.merged_adapters == ["default"]


def test_layer_proposals_write_nothing_until_committed():
    model = peftkit.adapt(tiny_bert(), peftkit.LoraConfig(r=2, target_modules=["query"], use_dora=True))
    randomize(model)
    before = snapshot(model)
    layer = model.base_model.bert.encoder.layer[0].attention.self.query
    proposal = layer.propose_merge(["default"])
    assert proposal.names == ["default"] and len(proposal.updates) == 1
    assert_unchanged(model, before)
    proposal.commit()
    assert layer.merged_adapters == ["default"]
    owner, attr, value = proposal.updates[0]
    assert torch.equal(getattr(owner, attr), value)
