"""One forward, a different adapter per row: rows equal each adapter run alone; misuse is refused."""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit

from conftest import MLP, randomize, run, tiny_bert, tiny_gpt2


def three_adapters(build, **kw):
    base = build()
    model = peftkit.adapt(copy.deepcopy(base), peftkit.LoraConfig(r=4, target_modules="all-linear", **kw), "a")
    peftkit.adapt(model, peftkit.LoraConfig(r=2, alpha=6, target_modules=["query", "value"] if build is tiny_bert else ["c_attn"]), "b")
    if build is tiny_bert:  # BitFit on the LayerNorms (the Linear layers already hold LoRA)
        peftkit.adapt(model, peftkit.BitFitConfig(target_modules=["LayerNorm"]), "c")
    for seed, name in enumerate(model.adapters):
        randomize(model, name, seed=seed, scale=0.2)
    return base, model.eval()


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2])
def test_rows_equal_each_adapter_alone(build):
    base, model = three_adapters(build)
    names = list(model.adapters) + ["base"]
    ids = torch.randint(0, 100, (len(names) * 2, 9))
    rows = names * 2
    with torch.no_grad():
        mixed = run(model, {"input_ids": ids, "adapter_names": rows})
        for i, name in enumerate(rows):
            if name == "base":
                alone = run(base, {"input_ids": ids[i:i + 1]})
            else:
                model.set_adapter(name)
                alone = run(model, {"input_ids": ids[i:i + 1]})
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-5)


def test_heads_with_different_label_counts(tmp_path):
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    def config(labels):
        return BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=37, num_labels=labels)

    for labels, name in ((3, "three"), (5, "five")):
        model = peftkit.adapt(AutoModelForSequenceClassification.from_config(config(labels)),
                              peftkit.LoraConfig(r=4, target_modules=["query", "value"]))
        randomize(model, scale=0.2)
        model.save_adapter(tmp_path / name)
    torch.manual_seed(1)
    base = AutoModelForSequenceClassification.from_config(config(2))
    torch.manual_seed(0)
    reference = AutoModelForSequenceClassification.from_config(config(2)).state_dict()
    base.load_state_dict(reference)  # the same body weights the adapters were trained on
    served = peftkit.AdaptedModel(base)
    for name in ("three", "five"):
        served.load_adapter(tmp_path / name, name, resize_heads=True)
    served.eval()
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        mixed = served(input_ids=ids, adapter_names=["three", "five"]).logits
        served.set_adapter("three")
        three = served(input_ids=ids[:1]).logits
        served.set_adapter("five")
        five = served(input_ids=ids[1:]).logits
    assert mixed.shape == (2, 5) and three.shape == (1, 3)
    torch.testing.assert_close(mixed[0, :3], three[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], five[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(peftkit.AdapterFileError, match="different shapes"):  # without resize_heads: strict
        peftkit.load_adapter(AutoModelForSequenceClassification.from_config(config(2)), tmp_path / "three")


def test_misuse_is_refused():
    base, model = three_adapters(tiny_bert)
    ids = torch.randint(0, 100, (2, 5))
    with pytest.raises(KeyError, match=r"unknown adapter\(s\) \['nope'\]"):
        model(input_ids=ids, adapter_names=["a", "nope"])
    with pytest.raises(ValueError, match="2 entries for a batch of 3"):
        model(input_ids=torch.randint(0, 100, (3, 5)), adapter_names=["a", "b"])
    model.train()
    with pytest.raises(RuntimeError, match="inference"):
        model(input_ids=ids, adapter_names=["a", "b"])
    model.eval()
    model.set_adapter("a")
    model.merge()
    with pytest.raises(RuntimeError, match="merged"):
        model(input_ids=ids, adapter_names=["a", "b"])
    model.unmerge()
    peftkit.adapt(model, peftkit.LoraConfig(r=2, use_dora=True, target_modules=["key"]), "dora")
    with pytest.raises(NotImplementedError, match="DoRA"):
        model(input_ids=ids, adapter_names=["dora", "a"])
    assert all(layer.row_adapters is None for _, layer in model.adapter_layers())  # cleaned up after errors
    other = peftkit.adapt(tiny_bert(), peftkit.LoraConfig(target_modules=["query"]), "a")
    peftkit.adapt(other, peftkit.LoraConfig(target_modules=["word_embeddings"]), "emb")  # bottleneck layers mix now
    with pytest.raises(NotImplementedError, match="cannot apply different adapters"):
        other.eval()(input_ids=ids, adapter_names=["emb", "a"])


def test_a_batch_of_one_adapter_takes_the_usual_path_with_the_same_result():
    base, model = three_adapters(tiny_bert)
    ids = torch.randint(0, 100, (3, 9))
    with torch.no_grad():
        for name in ["a", "b", "base"]:
            mixed = run(model, {"input_ids": ids, "adapter_names": [name] * 3})
            if name == "base":
                alone = run(base, {"input_ids": ids})
            else:
                model.set_adapter(name)
                alone = run(model, {"input_ids": ids})
            torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=1e-5)
            assert (mixed - run(base, {"input_ids": ids})).abs().max() > 1e-3 or name == "base"
    assert model.active_adapters == ["b"]  # the block restores the active adapter


def test_a_batch_of_one_dora_adapter_runs_although_dora_cannot_be_mixed():
    base = tiny_bert()
    model = peftkit.adapt(copy.deepcopy(base), peftkit.LoraConfig(r=4, target_modules="all-linear", use_dora=True), "d")
    peftkit.adapt(model, peftkit.LoraConfig(r=2, target_modules="all-linear"), "l")
    for seed, name in enumerate(model.adapters):
        randomize(model, name, seed=seed, scale=0.2)
    model.eval()
    ids = torch.randint(0, 100, (3, 9))
    with torch.no_grad():
        model.set_adapter("d")
        alone = run(model, {"input_ids": ids})
        model.set_adapter("l")
        torch.testing.assert_close(run(model, {"input_ids": ids, "adapter_names": ["d"] * 3}), alone, atol=1e-5, rtol=1e-5)
        with pytest.raises(NotImplementedError, match="DoRA"):
            run(model, {"input_ids": ids, "adapter_names": ["d", "l", "d"]})


def test_unload_then_reload_under_the_same_name_serves_the_new_weights(tmp_path):
    """Caches of a mixed batch (stacked adapter weights, the list of adapter layers) must not outlive an adapter:
    deleting 'b' and loading other weights as 'b' gives rows equal to the new 'b' alone."""
    base, model = three_adapters(tiny_bert)
    ids = torch.randint(0, 100, (4, 9))
    rows = ["a", "b", "c", "base"]
    with torch.no_grad():
        run(model, {"input_ids": ids, "adapter_names": rows})  # builds the caches
    model.delete_adapter("b")  # (also unwraps the layers it leaves empty)
    peftkit.adapt(model, peftkit.LoraConfig(r=2, alpha=6, target_modules=["query", "value"]), "b")
    randomize(model, "b", seed=99, scale=0.2)
    model.eval()
    with torch.no_grad():
        mixed = run(model, {"input_ids": ids, "adapter_names": rows})
        model.set_adapter("b")
        alone = run(model, {"input_ids": ids[1:2]})
    torch.testing.assert_close(mixed[1:2], alone, atol=1e-5, rtol=1e-5)


def test_unload_then_reload_the_same_set_of_names_serves_the_new_weights(tmp_path):
    """unload() removes every adapter; loading a set with the same names again (other weights) must serve the new
    weights: no cache keyed by adapter names may survive the unload."""
    base, model = three_adapters(tiny_bert)
    ids = torch.randint(0, 100, (4, 9))
    rows = ["a", "b", "c", "base"]
    for name in ("a", "b", "c"):
        model.save_adapter(tmp_path / "old", name)
    with torch.no_grad():
        run(model, {"input_ids": ids, "adapter_names": rows})  # builds the caches
    model.unload()
    for seed, name in enumerate(("a", "b", "c"), start=50):  # the same names and shapes, other weights
        peftkit.load_adapter(model, tmp_path / "old" / name, name)
        randomize(model, name, seed=seed, scale=0.2)
    model.eval()
    with torch.no_grad():
        mixed = run(model, {"input_ids": ids, "adapter_names": rows})
        for i, name in enumerate(rows[:3]):
            model.set_adapter(name)
            torch.testing.assert_close(mixed[i:i + 1], run(model, {"input_ids": ids[i:i + 1]}), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[3:4], run(base, {"input_ids": ids[3:4]}), atol=1e-5, rtol=1e-5)


def test_mixing_asks_each_layer_and_a_refusal_names_the_module():
    """The router has no list of what cannot mix: it asks every layer about the batch's adapters it holds."""
    base, model = three_adapters(tiny_bert)
    path = "bert.encoder.layer.1.attention.self.value"  # holds LoRA adapters 'a' and 'b'
    layer = model.base_model.get_submodule(path)
    asked = []

    def refuse_b(names):
        asked.append(sorted(names))
        return "this toy layer cannot mix adapter 'b'" if "b" in names else None

    layer.mixed_refusal = refuse_b
    ids = torch.randint(0, 100, (3, 6))
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match=rf"module '{path}': this toy layer cannot mix adapter 'b'; run"):
            model(input_ids=ids, adapter_names=["a", "b", "base"])
        assert asked == [["a", "b"]]
        assert all(layer.row_adapters is None for _, layer in model.adapter_layers())
        mixed = run(model, {"input_ids": ids, "adapter_names": ["a", "c", "base"]})  # without 'b' it agrees
        assert asked[-1] == ["a"]
        model.set_adapter("c")
        torch.testing.assert_close(mixed[1:2], run(model, {"input_ids": ids[1:2]}), atol=1e-5, rtol=1e-5)


def test_a_layer_that_cannot_mix_and_holds_none_of_the_batch_stays_out_of_it():
    """A trained LayerNorm copy (modules_to_save of adapter 'a') cannot mix; a batch of 'b' and 'c' must run past
    it on the base LayerNorm (it used to be routed too, and failed on the LayerNorm's missing out_features)."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0, self.norm, self.lin1 = torch.nn.Linear(10, 20), torch.nn.LayerNorm(20), torch.nn.Linear(20, 2)

        def forward(self, x):
            return self.lin1(self.norm(self.lin0(x)))

    torch.manual_seed(0)
    model = peftkit.adapt(Net(), peftkit.LoraConfig(r=2, target_modules=["lin0"], modules_to_save=["norm"]), "a")
    for name in ("b", "c"):
        peftkit.adapt(model, peftkit.LoraConfig(r=2, target_modules=["lin0"]), name)
    for seed, name in enumerate(model.adapters):
        randomize(model, name, seed=seed, scale=0.3)
    model.eval()
    x = torch.randn(2, 10)
    with torch.no_grad():
        mixed = model(x, adapter_names=["b", "c"])
        for row, name in enumerate(["b", "c"]):
            model.set_adapter(name)
            torch.testing.assert_close(mixed[row:row + 1], model(x[row:row + 1]), atol=1e-6, rtol=1e-6)
        with pytest.raises(NotImplementedError, match="module 'norm': ModulesToSave cannot apply different adapters"):
            model(x, adapter_names=["a", "b"])


def test_grouped_rows_with_uneven_groups_follow_every_change():
    """Decoding without gradients groups the rows by adapter and caches the groups per layer: uneven groups (padded),
    base rows, and every change (another row layout, B trained in place, a re-created adapter, a new scaling) must
    show in the next mixed forward."""
    torch.manual_seed(3)
    base = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 8))
    model = peftkit.adapt(copy.deepcopy(base), peftkit.LoraConfig(r=4, alpha=8, target_modules=["0", "2"]), "a")
    model.add_adapter(peftkit.LoraConfig(r=2, alpha=6, target_modules=["0"]), adapter_name="b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    model.eval()
    x = torch.randn(6, 1, 16)  # one token a row (decoding): the grouped path

    def alone(name: str, row: torch.Tensor) -> torch.Tensor:
        if name == "base":
            return base(row)
        model.set_adapter(name)
        return model(row)

    def check(rows: list[str]) -> None:
        with torch.no_grad():
            with model.mixed_batch(rows):
                mixed = model(x)
            for i, name in enumerate(rows):
                torch.testing.assert_close(mixed[i:i + 1], alone(name, x[i:i + 1]), atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        assert not torch.allclose(alone("a", x), alone("b", x), atol=1e-3)
    check(["a", "a", "a", "b", "base", "a"])
    check(["a", "a", "a", "b", "base", "a"])  # the cached groups
    check(["b", "base", "b", "b", "a", "b"])  # another layout
    with torch.no_grad():
        model.base_model[0].lora_B["b"].weight.mul_(-2.0)  # trained in place
    check(["b", "base", "b", "b", "a", "b"])
    model.delete_adapter("b")
    model.add_adapter(peftkit.LoraConfig(r=2, alpha=6, target_modules=["0"]), adapter_name="b")
    randomize(model, "b", seed=5)
    check(["b", "base", "b", "b", "a", "b"])
    model.base_model[0].scaling["a"] = 7.0
    check(["b", "base", "b", "b", "a", "b"])
    x = torch.randn(6, 5, 16)  # long rows: the per-row gathered factors, the same answers
    check(["a", "a", "a", "b", "base", "a"])


def test_an_empty_mixed_batch_answers_an_empty_result():
    """A batch of no rows (zero tokens) gives an empty output of the right width, not a division by zero."""
    base = torch.nn.Sequential(torch.nn.Linear(16, 12))
    model = peftkit.adapt(base, peftkit.LoraConfig(r=4, alpha=8, target_modules=["0"]), "a").eval()
    with torch.no_grad(), model.mixed_batch([]):
        out = model(torch.randn(0, 1, 16))
    assert out.shape == (0, 1, 12)
