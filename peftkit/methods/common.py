"""Injection steps that several methods share: wrapping a module, task heads, modules_to_save, trained base biases."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..layers.base import AdapterLayer, LayerRegistry, find_layer
from ..layers.bitfit import BITFIT_LAYERS, DeltaForm
from ..layers.modules_to_save import ModulesToSave
from ..targets import TargetError, _close_matches, base_modules, matches
from ..tree import set_submodule

#: transformers class-name suffix -> (PEFT task_type, names of the freshly initialised task head)
TASK_HEADS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ForSequenceClassification": ("SEQ_CLS", ("classifier", "score")),
    "ForTokenClassification": ("TOKEN_CLS", ("classifier", "score")),
    "ForQuestionAnswering": ("QUESTION_ANS", ("qa_outputs",)),
    "ForCausalLM": ("CAUSAL_LM", ()),
    "LMHeadModel": ("CAUSAL_LM", ()),
}


HEAD_NAMES = frozenset(name for _, heads in TASK_HEADS.values() for name in heads)


def task_of(model: nn.Module) -> tuple[str | None, tuple[str, ...]]:
    """The PEFT task type of a transformers model and the names of its task head (by class name)."""
    class_name = type(model).__name__
    for suffix, (task, heads) in TASK_HEADS.items():
        if class_name.endswith(suffix):
            return task, heads
    return None, ()


def wrap(model: nn.Module, path: str, registry: LayerRegistry) -> AdapterLayer:
    """The adapter layer at ``path``: the existing wrapper, or a new one around the module found there."""
    current = model.get_submodule(path)
    inner = current.inner if isinstance(current, AdapterLayer) else current
    layer_cls = registry.lookup(inner)
    if isinstance(current, AdapterLayer) and layer_cls is not None:
        existing = find_layer(current, layer_cls)
        if existing is not None:
            return existing
        if isinstance(current, ModulesToSave):
            raise TypeError(f"module {path!r} is trained whole (modules_to_save); a {registry.method} adapter cannot wrap it")
    if layer_cls is None:
        raise TargetError(
            f"module {path!r} is a {type(current).__name__}, which {registry.method} cannot wrap; "
            f"supported layer types: {', '.join(registry.supported())}"
        )
    wrapper = layer_cls(current)
    set_submodule(model, path, wrapper)
    return wrapper


def resolve_modules_to_save(model: nn.Module, requested: Sequence[str] | None) -> list[str]:
    """Paths of the modules to train fully: the ones asked for plus the model's task head, if any."""
    _, heads = task_of(model)
    modules = list(base_modules(model))
    paths = [p for p, _ in modules]
    chosen: list[str] = []
    for name in list(requested or []):
        found = [p for p in paths if matches([name], p)]
        if not found and name not in HEAD_NAMES:  # PEFT lists every usual head name ("classifier", "score")
            raise TargetError(f"modules_to_save entry {name!r} matches no module{_close_matches(name, paths)}")
        chosen += found
    for head in heads:
        chosen += [p for p in paths if matches([head], p) and "." not in p]
    # keep the outermost modules only, each once
    unique = list(dict.fromkeys(chosen))
    return [p for p in unique if not any(p != q and p.startswith(q + ".") for q in unique)]


def add_modules_to_save(model: nn.Module, paths: Sequence[str], adapter_name: str) -> None:
    for path in paths:
        current = model.get_submodule(path)
        if not isinstance(current, ModulesToSave):
            if isinstance(current, AdapterLayer):
                raise TargetError(f"module {path!r} is already adapted, so it cannot also be in modules_to_save")
            current = ModulesToSave(current)
            set_submodule(model, path, current)
        current.add_adapter(adapter_name)


def add_bias_deltas(model: nn.Module, adapter_name: str, paths: Sequence[str], forms: dict[str, DeltaForm]) -> None:
    """Give ``adapter_name`` its own change of the bias (and LayerNorm weight) of each module in ``paths``,
    nested with any other adapter layers there; ``forms[path]`` says how the change is saved."""
    for path in paths:
        wrap(model, path, BITFIT_LAYERS).add_adapter(adapter_name, forms[path])


def bias_modules(model: nn.Module, targets: Sequence[str], mode: str) -> list[str]:
    """Paths of the modules whose bias trains with the adapter: none, those of the adapted layers, or all
    (except trained-whole modules such as the task head, whose copy trains anyway)."""
    if mode == "none":
        return []
    candidates = list(targets) if mode == "lora_only" else [p for p, _ in base_modules(model)]
    chosen = []
    for path in candidates:
        current = model.get_submodule(path)
        inner = current.inner if isinstance(current, AdapterLayer) else current
        if isinstance(current, ModulesToSave) or not isinstance(getattr(inner, "bias", None), nn.Parameter):
            continue
        if BITFIT_LAYERS.lookup(inner) is None:
            raise TargetError(
                f"bias={mode!r}: module {path!r} is a {type(inner).__name__}, whose bias peftkit cannot train per "
                f"adapter (supported: {', '.join(BITFIT_LAYERS.supported())}); use bias='lora_only' or 'none'"
            )
        chosen.append(path)
    return chosen
