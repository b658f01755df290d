"""The cases of the method conformance matrix (tests/test_conformance.py): tiny models, the per-case config
table, the enumeration of the method registry, and the helpers the checks share."""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

import peftkit
import peftkit.methods
from peftkit import io
from peftkit.layers.base import AdapterLayer

from conftest import MLP, run, tiny_bert, tiny_llama

#: modules that register test-only methods (e.g. "toy_method.method"); imported before the registry is enumerated
EXTRA_METHOD_MODULES: tuple[str, ...] = ("toy_method.method",)

# ------------------------------------------------------------------------------------------------ models
def tiny_gpt2_cls(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=3,
                        pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2ForSequenceClassification(config).eval()


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[], nn.Module]
    make_inputs: Callable[[torch.Generator], dict]
    heads: tuple[str, ...]  # the task head a method with modules_to_save trains whole (found by itself)
    custom: bool = False  # not a transformers model: no default targets or placements


def _tokens(generator: torch.Generator) -> dict:
    return {"input_ids": torch.randint(1, 100, (4, 3), generator=generator)}  # 4 rows, 3 tokens, no padding id


MODELS: dict[str, ModelSpec] = {
    "bert": ModelSpec(tiny_bert, _tokens, ("classifier",)),
    "gpt2": ModelSpec(tiny_gpt2_cls, _tokens, ("score",)),
    "llama": ModelSpec(tiny_llama, _tokens, ()),
    "mlp": ModelSpec(MLP, lambda g: {"x": torch.randn(4, 10, generator=g)}, (), custom=True),
}

# ----------------------------------------------------------------------------------- per-case config table
#: variants of each built-in method: label -> config overrides. A method not listed here (newly registered) runs
#: once with its config's defaults plus target_modules="all-linear" if its config has that field.
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "lora": {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}},
    "dora": {"dora": {}},  # (once DoRA is its own registry entry, the lora "dora" variant above is left out)
    "adalora": {"adalora": {"total_step": 10}},  # total_step is required (the CLI fills it in)
    "bottleneck": {v: {"variant": v} for v in ("houlsby", "pfeiffer", "parallel")},
    "bitfit": {"bitfit": {}},
    "head": {"head": {}},
    "full": {"full": {}},  # (no adapter: every model must refuse it)
}
#: overrides for one (method, model) pair. Default for a custom model: target_modules="all-linear" if the field exists
MODEL_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    # placed by name ("all-linear" is a LoRA notion); lin1 is square, which the parallel variant needs (see the xfail)
    ("bottleneck", "mlp"): {"target_modules": ["lin1"]},
}
#: (method, model) pairs the method does not apply to, and the error adapt() must raise
REFUSALS: dict[tuple[str, str], type[Exception]] = {
    ("bitfit", "llama"): peftkit.TargetError,  # LLaMA has no biases
    ("head", "llama"): peftkit.TargetError,  # a causal LM has no fresh task head
    ("head", "mlp"): peftkit.TargetError,
}


@dataclass(frozen=True)
class Case:
    method: str
    variant: str
    model: str
    overrides: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.variant}-{self.model}"

    @property
    def spec(self) -> ModelSpec:
        return MODELS[self.model]

    def method_obj(self):
        # test-only methods are registered only while the matrix runs: look them up here outside that window
        return EXTRA_METHODS.get(self.method) or peftkit.get_method(self.method)

    def config(self):
        return self.method_obj().config_cls(**self.overrides)

    def refusal(self) -> type[Exception] | None:
        if getattr(self.method_obj(), "adapter", True) is False:  # e.g. full fine-tuning: no adapter to inject
            return Exception
        if self.method not in VARIANTS:  # a newly registered method declares nothing: what does adapt() say?
            return _probe_refusal(self)
        return REFUSALS.get((self.method, self.model))


def _probe_refusal(case: "Case") -> type[Exception] | None:
    """For a method without declarations: TargetError if adapt() refuses this model as a target (the refusal
    test then checks that the refusal is clear and leaves the model as it was), else None (every check runs)."""
    try:
        peftkit.adapt(case.spec.build(), case.config())
    except peftkit.TargetError:
        return peftkit.TargetError
    return None


def field_names(config_cls) -> set[str]:
    return {f.name for f in dataclasses.fields(config_cls)}


def register_extra_methods() -> dict[str, Any]:
    """Import the test-only method modules (each registers its method); name -> method object."""
    before = set(peftkit.available_methods())
    for module in EXTRA_METHOD_MODULES:
        importlib.import_module(module)
    return {name: peftkit.get_method(name) for name in set(peftkit.available_methods()) - before}


def unregister(names) -> None:
    remove = getattr(peftkit.methods, "unregister_method", None)
    if remove is not None:  # (without one, test-only methods simply stay registered)
        for name in names:
            remove(name)


def enumerate_cases() -> list[Case]:
    names = peftkit.available_methods()
    cases = []
    for name in names:
        fields = field_names(peftkit.get_method(name).config_cls)
        known = name in VARIANTS  # a built-in: its defaults know the transformers models' module names
        for label, overrides in VARIANTS.get(name, {name: {}}).items():
            if label in names and label != name:  # e.g. "dora" registered as its own method: covered there
                continue
            for model, spec in MODELS.items():
                extra = dict(overrides)
                if (spec.custom or not known) and "target_modules" in fields:
                    extra["target_modules"] = "all-linear"
                extra.update(MODEL_OVERRIDES.get((name, model), {}))
                cases.append(Case(name, label, model, extra))
    return cases


EXTRA_METHODS = register_extra_methods()
CASES = enumerate_cases()
APPLYING = [c for c in CASES if c.refusal() is None]
REFUSING = [c for c in CASES if c.refusal() is not None]
unregister(EXTRA_METHODS)  # registered again only while this module's tests run (other modules must not see them)

# --------------------------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def template(model: str) -> nn.Module:
    return MODELS[model].build().eval()


def fresh(case: Case) -> nn.Module:
    """A new base model with the same weights as every other model of this kind (a deep copy of one template)."""
    return copy.deepcopy(template(case.model))


def inputs(case: Case) -> dict:
    return case.spec.make_inputs(torch.Generator().manual_seed(1234))


def output(model: nn.Module, case: Case, **extra) -> torch.Tensor:
    with torch.no_grad():
        return run(model, {**inputs(case), **extra}).detach().clone()


@functools.lru_cache(maxsize=None)
def _base_output(model: str) -> torch.Tensor:
    return output(template(model), Case("", "", model))


def base_output(case: Case) -> torch.Tensor:
    return _base_output(case.model)


def adapted(case: Case, name: str = "default", seed: int | None = None) -> tuple[nn.Module, peftkit.AdaptedModel]:
    """(the base model, adapted with the case's config under ``name``); ``seed``: perturb every adapter tensor."""
    base = fresh(case)
    model = peftkit.adapt(base, case.config(), name).eval()
    if seed is not None:
        perturb(model, name, seed)
    return base, model


def perturb(model: peftkit.AdaptedModel, name: str, seed: int, scale: float = 0.2) -> None:
    """Non-zero random values in every adapter tensor, so that no check passes because a tensor is zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in io.adapter_state(model.base_model, name).values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)


def layers_of(model: peftkit.AdaptedModel, name: str) -> list[tuple[str, AdapterLayer]]:
    return [(path, layer) for path, layer in model.adapter_layers() if name in layer.adapter_names]


def can_mix(layer: AdapterLayer, names: list[str]) -> bool:
    """What a layer declares about joining a mixed batch with ``names``."""
    return layer.mixed_refusal([n for n in names if n in layer.adapter_names]) is None


def base_snapshot(base: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own parameters by their original names (taken before adapt wraps any module)."""
    return {name: param.detach().clone() for name, param in base.named_parameters()}


def assert_base_unchanged(params: dict[str, nn.Parameter], snapshot: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    for name, before in snapshot.items():
        now = params[name].detach()
        if atol:
            torch.testing.assert_close(now, before, atol=atol, rtol=0, msg=f"base parameter {name} changed")
        else:
            assert torch.equal(now, before), f"base parameter {name} changed"


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5)
