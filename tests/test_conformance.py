"""The method conformance matrix: every registered adapter method (and its variants) x tiny models.

The cases are enumerated from the registry (``peftkit.available_methods()``) when the module is collected, so a
newly registered method is checked by every test below without an edit here. What a method promises is read
from its declarations where there are any (a layer's ``mergeable``/``supports_mixed``, the method's
``identity_at_init``/``adapter``/``reserved_names`` if it states them); the small tables in conformance_cases.py hold
config overrides (variants, settings a model needs) and the few (method, model) pairs that must be refused.

Checked for each case where the method applies:
  identity at init; the trainable set exactly as declared (names and counts, gradients reach it); save -> load
  into a fresh model -> identical outputs (non-zero weights); disable/enable; delete restores the base exactly;
  merge/unmerge equivalence or a clear refusal; a mixed batch whose rows equal each adapter alone or a clear
  refusal. Where the method does not apply, ``adapt`` must refuse with a clear error and leave the model as it was.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit import io
from peftkit.layers.base import AdapterLayer, logical_path
from peftkit.layers.modules_to_save import ModulesToSave

from conftest import MLP, run
from conformance_cases import (APPLYING, CASES, EXTRA_METHODS, REFUSING, adapted, assert_base_unchanged, base_output,
                               base_snapshot, can_mix, close, field_names, fresh, inputs, layers_of, output, perturb,
                               template, unregister)

applying = pytest.mark.parametrize("case", APPLYING, ids=[c.id for c in APPLYING])


@pytest.fixture(autouse=True, scope="module")
def _extra_methods_registered():
    for name, method in EXTRA_METHODS.items():
        if name not in peftkit.available_methods():
            peftkit.register_method(method)
    yield
    unregister(EXTRA_METHODS)


def test_the_matrix_covers_every_registered_method():
    covered = {c.method for c in CASES}
    assert covered == set(peftkit.available_methods())
    assert APPLYING and all(any(c.method == m for c in APPLYING) for m in covered
                            if getattr(peftkit.get_method(m), "adapter", True))


# ----------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", REFUSING, ids=[c.id for c in REFUSING])
def test_refuses_where_it_does_not_apply(case):
    base = fresh(case)
    before = base_snapshot(base)
    grads = {n: p.requires_grad for n, p in base.named_parameters()}
    with pytest.raises(case.refusal()) as err:
        peftkit.adapt(base, case.config())
    assert len(str(err.value)) > 20, f"refusal without a useful message: {err.value!r}"
    assert isinstance(err.value, (TypeError, ValueError, NotImplementedError))
    # nothing stays behind: no wrapper, same weights, same requires_grad
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())
    assert_base_unchanged(dict(base.named_parameters()), before)
    assert {n: p.requires_grad for n, p in base.named_parameters()} == grads


@applying
def test_identity_at_init(case):
    if getattr(case.method_obj(), "identity_at_init", True) is False:
        pytest.skip(f"{case.method} declares identity_at_init = False")
    _, model = adapted(case)
    close(output(model, case), base_output(case))


@applying
def test_trainable_set_is_exactly_the_declared_one(case):
    base = fresh(case)
    base_params = {id(p): p for p in base.parameters()}  # before adapt wraps anything
    model = peftkit.adapt(base, case.config()).eval()
    perturb(model, "default", seed=0)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    declared = io.adapter_state(model.base_model, "default")
    assert declared, "the adapter has no parameters"
    assert {id(p) for p in trainable.values()} == {id(p) for p in declared.values()}
    assert not set(base_params) & {id(p) for p in trainable.values()}, "a base parameter trains"

    # every trainable tensor sits in a targeted module or a trained-whole task head, under the adapter's name
    targets = set(model.targeted_modules("default"))
    saved = set()
    for path, layer in layers_of(model, "default"):
        if isinstance(layer, ModulesToSave):
            saved.add(logical_path(path))
    expected_heads = set(case.spec.heads) if "modules_to_save" in field_names(type(case.config())) else set()
    assert {p.rsplit(".", 1)[-1] for p in saved} == expected_heads
    reserved = getattr(case.method_obj(), "reserved_names", None)
    for name in trainable:
        assert ".default." in f".{name}.", f"trainable {name} is not named after its adapter"
        owner = next(((logical_path(p), layer) for p, layer in layers_of(model, "default")
                      if name.startswith(f"base_model.{p}.")), None)
        assert owner is not None, f"trainable {name} is not in an adapter layer"
        assert owner[0] in targets | saved, f"trainable {name} is outside the targets {sorted(targets)} and heads"
        if reserved and not isinstance(owner[1], ModulesToSave):
            parts = name.split(".")  # <module path>.<container>.default[.<suffix>]
            first = parts[len(parts) - 1 - parts[::-1].index("default") - 1]
            assert first in reserved, f"{name}: {first!r} is not among {case.method}'s reserved names"
    assert all(any(n.startswith(f"base_model.{t}.") for n in trainable) for t in targets), "a target has nothing to train"

    counts = model.trainable_parameters()
    assert counts.trainable == sum(p.numel() for p in declared.values()) > 0
    assert counts.total == sum(p.numel() for p in base_params.values()) + counts.trainable

    # gradients reach exactly the trainable set
    run(model, inputs(case)).float().pow(2).mean().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, f"{name}: grad {param.grad is not None}"

    # a second, inactive adapter does not train
    model.add_adapter(case.config(), "other")
    assert all(not p.requires_grad for p in io.adapter_state(model.base_model, "other").values())
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in declared.values()}


@applying
def test_save_load_into_a_fresh_model(case, tmp_path):
    _, model = adapted(case, seed=1)
    expected = output(model, case)
    assert not torch.allclose(expected, base_output(case), atol=1e-4), "perturbed adapter changes nothing"
    model.save_adapter(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    torch.manual_seed(999)  # a fresh init of the adapter before the file's values replace it
    loaded = peftkit.load_adapter(fresh(case), tmp_path)
    close(output(loaded.eval(), case), expected)
    mine, theirs = io.adapter_state(model.base_model, "default"), io.adapter_state(loaded.base_model, "default")
    assert sorted(mine) == sorted(theirs)
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    # the file holds no adapter name: loaded again under another name beside the first, it computes the same
    loaded.load_adapter(tmp_path, "again")
    loaded.set_adapter("again")
    close(output(loaded, case), expected)


@applying
def test_disable_gives_the_base_and_enable_restores(case):
    _, model = adapted(case, seed=2)
    expected = output(model, case)
    with model.disable_adapters():
        close(output(model, case), base_output(case), atol=1e-6)
    assert torch.equal(output(model, case), expected)


@applying
def test_delete_restores_the_base_exactly(case):
    base, model = adapted(case, seed=3)
    snapshot = base_snapshot(template(case.model))
    model.delete_adapter("default")
    assert model.adapters == {} and not io.adapter_state(model.base_model, "default")
    assert not any("default" in n.split(".") for n, _ in model.named_parameters())
    assert model.trainable_parameters().trainable == 0
    assert_base_unchanged(_unwrapped_params(model), snapshot)
    assert torch.equal(output(model, case), base_output(case))


def _unwrapped_params(model: peftkit.AdaptedModel) -> dict[str, nn.Parameter]:
    """Base parameters by their original names, whether or not a (now empty) wrapper is still in place."""
    return {n.replace(".base_layer", "").removeprefix("base_model."): p for n, p in model.named_parameters()}


@applying
def test_merge_equals_unmerged_or_refuses(case, tmp_path):
    base, model = adapted(case, seed=4)
    params = _unwrapped_params(model)
    snapshot = base_snapshot(template(case.model))
    unmerged = output(model, case)
    mergeable = all(layer.mergeable for _, layer in layers_of(model, "default"))
    if not mergeable:
        for merge in (model.merge, model.merge_and_unload):
            with pytest.raises((NotImplementedError, ValueError)) as err:
                merge()
            assert "merge" in str(err.value)
            assert model.merged_adapters == []
            assert_base_unchanged(params, snapshot)
            assert torch.equal(output(model, case), unmerged)
        return
    model.merge()
    merged = output(model, case)
    with model.disable_adapters():  # unmerges for the block, merges again on exit
        close(output(model, case), base_output(case), atol=1e-5)
    close(output(model, case), merged, atol=1e-6)
    close(merged, unmerged, atol=1e-4)
    # a trained-whole head has nothing to fold: its copy simply stays in use
    folds = any(not isinstance(layer, ModulesToSave) for _, layer in layers_of(model, "default"))
    assert model.merged_adapters == (["default"] if folds else [])
    if folds:  # a merged adapter's weights are not exact on their own: saving and deleting wait for unmerge
        for refused in (lambda: model.save_adapter(tmp_path), lambda: model.delete_adapter("default")):
            with pytest.raises(ValueError, match="unmerge"):
                refused()
    model.unmerge()
    assert model.merged_adapters == []
    assert_base_unchanged(params, snapshot, atol=1e-6)
    close(output(model, case), unmerged)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    close(output(plain, case), unmerged, atol=1e-4)


@applying
def test_mixed_batch_rows_equal_each_adapter_alone_or_refuses(case):
    _, model = adapted(case, "a", seed=5)
    model.add_adapter(case.config(), "b")
    perturb(model, "b", seed=6)
    model.eval()
    rows = ["a", "base", "b", "a"]
    alone = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        alone[name] = output(model, case)
    alone["base"] = base_output(case)
    assert not torch.allclose(alone["a"], alone["b"], atol=1e-4)
    model.set_adapter("a")

    declared = all(can_mix(layer, ["a", "b"]) for _, layer in model.adapter_layers()
                   if {"a", "b"} & set(layer.adapter_names))
    if not declared:
        with pytest.raises(NotImplementedError) as err:
            output(model, case, adapter_names=rows)
        assert "one at a time" in str(err.value) or "batch" in str(err.value), err.value
        assert torch.equal(output(model, case), alone["a"])  # the refusal left the model as it was
        return
    mixed = output(model, case, adapter_names=rows)
    for i, name in enumerate(rows):
        close(mixed[i], alone[name][i])
    assert torch.equal(output(model, case), alone["a"])

    # "b" deleted and added again with other weights: the next mixed batch uses the new ones, not a cached copy
    model.delete_adapter("b")
    model.add_adapter(case.config(), "b")
    perturb(model, "b", seed=7)
    model.eval().set_adapter("b")
    alone["b"] = output(model, case)
    model.set_adapter("a")
    mixed = output(model, case, adapter_names=rows)
    for i, name in enumerate(rows):
        close(mixed[i], alone[name][i])


# ------------------------------------------------------------------------------------- library bugs found
def test_parallel_bottleneck_on_a_module_of_two_widths_is_refused_clearly():
    """Found by this matrix: the adapter was accepted, then every forward failed with a raw matmul shape error."""
    model = MLP().eval()  # lin0: 10 -> 20
    before = base_snapshot(model)
    with pytest.raises(peftkit.TargetError, match=r"'lin0'.*input \(10 features\).*output \(20\)"):
        peftkit.adapt(model, peftkit.BottleneckConfig(variant="parallel", target_modules=["lin0"]))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert_base_unchanged(dict(model.named_parameters()), before)
