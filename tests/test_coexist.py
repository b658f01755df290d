"""Adapters of different methods on one base: LoRA, DoRA, bottleneck, BitFit and a bias='all' LoRA nest on the same
modules in any order, and each gives exactly its own model's outputs, alone, in mixed batches and in the server."""

from __future__ import annotations

import json

import pytest
import torch

import peftkit

from conftest import randomize, run, tiny_bert

X = {"input_ids": torch.tensor([[5, 17, 3, 44, 9, 2], [8, 1, 66, 23, 7, 0], [4, 4, 90, 12, 3, 6],
                                [31, 2, 7, 7, 50, 1], [9, 9, 9, 1, 2, 3], [2, 3, 4, 5, 6, 7]]),
     "attention_mask": torch.ones(6, 6, dtype=torch.long)}

# all of them adapt the same modules (query, value, the feed-forward output), so their layers nest
CONFIGS = {
    "plain": peftkit.LoraConfig(r=2, target_modules=["query", "value", "output.dense"]),
    "dora": peftkit.LoraConfig(r=2, target_modules=["query", "output.dense"], use_dora=True),
    "bottleneck": peftkit.BottleneckConfig(variant="houlsby", reduction_factor=4),
    "bitfit": peftkit.BitFitConfig(),
    "ball": peftkit.LoraConfig(r=2, target_modules=["value", "output.dense"], bias="all"),
}


def _alone(build, configs, folder, inputs):
    expected = {}
    for i, (name, config) in enumerate(configs.items()):
        model = peftkit.adapt(build(), config)
        randomize(model, seed=10 + i, scale=0.2)
        expected[name] = run(model, inputs) if inputs is not None else model
        model.save_adapter(folder / name)
    return expected


@pytest.mark.parametrize("order", ["forward", "reversed"])
def test_every_method_on_one_base_gives_its_own_outputs(tmp_path, order):
    expected = _alone(tiny_bert, CONFIGS, tmp_path, X)
    reference = tiny_bert()
    shared = peftkit.AdaptedModel(tiny_bert()).eval()
    names = list(CONFIGS) if order == "forward" else list(reversed(CONFIGS))
    for name in names:
        shared.load_adapter(tmp_path / name, name)
    for name in names:
        shared.set_adapter(name)
        torch.testing.assert_close(run(shared, X), expected[name], atol=1e-5, rtol=1e-5)
    # a mixed batch of the methods that mix; DoRA refuses clearly
    rows = ["plain", "bottleneck", "bitfit", "ball", "base", "plain"]
    mixed = run(shared, {**X, "adapter_names": rows})
    for row, name in enumerate(rows):
        torch.testing.assert_close(mixed[row], (expected[name] if name != "base" else run(reference, X))[row],
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="DoRA"):
        run(shared, {**X, "adapter_names": ["dora", "plain", "base", "bitfit", "ball", "bottleneck"]})
    # saved from the nest: each file reloads alone to the same outputs
    for name in names:
        shared.save_adapter(tmp_path / "again", name)
        alone = peftkit.load_adapter(tiny_bert(), tmp_path / "again" / name if name != "default" else tmp_path, name)
        torch.testing.assert_close(run(alone, X), expected[name], atol=1e-5, rtol=1e-5)
    # deleting some leaves the others exact; unloading restores the base bit for bit
    for name in names[:2]:
        shared.delete_adapter(name)
    for name in names[2:]:
        shared.set_adapter(name)
        torch.testing.assert_close(run(shared, X), expected[name], atol=1e-5, rtol=1e-5)
    plain = shared.unload()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in reference.state_dict().items())
    assert set(plain.state_dict()) == set(reference.state_dict())


def test_adding_methods_in_memory_in_any_order():
    for order in (list(CONFIGS), list(reversed(CONFIGS))):
        model = peftkit.AdaptedModel(tiny_bert())
        for name in order:
            model.add_adapter(CONFIGS[name], name)
        paths = [p for p, _ in model.adapter_layers()]
        assert any(p.endswith("query.base_layer") for p in paths)  # nested, not refused
        reference = run(tiny_bert(), X)
        for name in order:
            model.set_adapter(name)
            torch.testing.assert_close(run(model, X), reference, atol=1e-5, rtol=1e-5)  # fresh adapters: identity
        merged = peftkit.AdaptedModel(tiny_bert())
        merged.add_adapter(CONFIGS["ball"], "ball")
        merged.add_adapter(CONFIGS["plain"], "plain")
        randomize(merged, "ball", scale=0.2)
        expected = run(merged, X)
        torch.testing.assert_close(run(merged.merge_and_unload(), X), expected, atol=1e-5, rtol=1e-5)


def test_server_answers_each_request_with_its_own_adapter(tmp_path):
    from peftkit.tasks import data as D
    from peftkit.tasks.heads import build_classifier
    from peftkit.serve.model import ServedModel
    from workflow_helpers import tiny_model_dir

    model_dir = tiny_model_dir(tmp_path)
    root = tmp_path / "adapters"
    configs = {"plain": CONFIGS["plain"], "dora": CONFIGS["dora"], "bottleneck": CONFIGS["bottleneck"],
               "bitfit": CONFIGS["bitfit"], "ball": CONFIGS["ball"]}
    models = {}
    for i, (name, config) in enumerate(configs.items()):
        torch.manual_seed(i)
        model = peftkit.adapt(build_classifier(model_dir, 3, "mean"), config).eval()
        randomize(model, seed=20 + i, scale=0.3)
        model.save_adapter(root / name / "adapter")
        (root / name / "labels.json").write_text(json.dumps({"labels": ["a", "b", "c"]}))
        (root / name / "config.yaml").write_text(f"model: {model_dir}\nmethod: x\npooling: mean\n")
        models[name] = model
    served = ServedModel(model_dir, root, pooling="mean")
    assert not served.discover()
    texts = {"plain": "where is my card", "dora": "open on sunday?", "bottleneck": "refund the broken item please",
             "bitfit": "hours", "ball": "my wallet was stolen yesterday"}
    rows = [(name, text, None) for name, text in texts.items()]
    probabilities = served.infer(rows)
    for (name, text, _), got in zip(rows, probabilities):
        batch = D.collate(served.tokenizer, D.encode(served.tokenizer, [D.Example(text, None, None, 0)], served.max_length))
        with torch.no_grad():
            own = torch.softmax(models[name](**batch).logits[0].float(), -1)
        torch.testing.assert_close(got, own, atol=1e-5, rtol=1e-5)
    # without DoRA the batch runs as one mixed forward
    rows = [row for row in rows if row[0] != "dora"]
    names = [r[0] for r in rows]
    features = [f for _, text, _ in rows for f in D.encode(served.tokenizer, [D.Example(text, None, None, 0)], served.max_length)]
    with torch.inference_mode():
        logits = served._forward(features, names)
    for row, (name, text, _) in enumerate(rows):
        torch.testing.assert_close(torch.softmax(logits[row, :3].float(), -1), served.infer([(name, text, None)])[0],
                                   atol=1e-5, rtol=1e-5)
