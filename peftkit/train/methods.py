"""Training methods by name: how ``peftkit train --method NAME`` prepares, saves and reloads a model.

Every adapter method of the library (``peftkit.methods``) is a training method automatically: its config section
(``RunConfig.<name>``) builds the library config, ``peftkit.adapt`` applies it and ``save_adapter`` saves it.
``dora`` is LoRA with ``use_dora``; ``full`` (plain fine-tuning, the baseline) is the one method without an
adapter; ``head`` trains on the frozen body's pooled features (optionally cached). New methods plug in by
registering; nothing here branches on method names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"


@dataclass(frozen=True)
class TrainingMethod:
    name: str
    default_lr: float
    prepare: Callable[[nn.Module, object, dict], nn.Module]  # (task model, RunConfig, run info) -> model to train
    save: Callable[[nn.Module, Path], None]  # writes into the run folder
    load: Callable[[nn.Module, Path], nn.Module]  # (fresh task model, run folder) -> trained model
    merged: Callable[[nn.Module], nn.Module]  # trained model -> plain model without adapter wrappers
    adapter: bool = True  # whether only adapters train (then the frozen base can be stored in bf16)
    # (model, batch, example keys, config, store) -> logits; None: the model's own forward
    logits: Callable | None = None


_METHODS: dict[str, TrainingMethod] = {}
DEFAULT_LR = {"lora": 5e-4, "dora": 5e-4, "adalora": 1e-3, "bottleneck": 1e-3, "bitfit": 1e-3, "head": 1e-3}


def register(method: TrainingMethod) -> None:
    _METHODS[method.name] = method


def available() -> list[str]:
    _register_adapter_methods()
    return sorted(_METHODS)


def get(name: str) -> TrainingMethod:
    _register_adapter_methods()
    if name not in _METHODS:
        raise KeyError(f"unknown training method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


# ------------------------------------------------------------------------------------ adapter methods
def _register_adapter_methods() -> None:
    from ..methods import available_methods

    for name in [*available_methods(), "dora"]:
        if name not in _METHODS:
            register(_adapter_method(name))


def _adapter_method(name: str) -> TrainingMethod:
    import peftkit

    def prepare(model: nn.Module, config, run_info: dict) -> nn.Module:
        return peftkit.adapt(model, getattr(config, name).library_config(run_info))

    return TrainingMethod(
        name=name,
        default_lr=DEFAULT_LR.get(name, 5e-4),
        prepare=prepare,
        save=lambda model, run: model.save_adapter(run / ADAPTER_DIR),
        load=lambda model, run: peftkit.load_adapter(model, run / ADAPTER_DIR),
        merged=lambda model: model.merge_and_unload(),
        logits=_head_logits if name == "head" else None,
    )


# ------------------------------------------------------------------------------------------- head-only
def feature_split(task: nn.Module):
    """(features(batch), classify(features)) of a classifier whose head reads pooled features."""
    from ..tasks.heads import PooledForSequenceClassification
    from .config import ConfigProblem

    if isinstance(task, PooledForSequenceClassification):
        return (lambda batch: task.features(**batch)), (lambda feats: task.classify(feats).logits)
    body = getattr(task, "base_model", None)
    if body is not None and body is not task and hasattr(task, "classifier") and hasattr(task, "dropout"):
        def features(batch):
            out = body(**batch)
            if getattr(out, "pooler_output", None) is None:
                raise ConfigProblem("head.cache_features needs pooled features: use pooling cls or mean")
            return out.pooler_output

        return features, (lambda feats: task.classifier(task.dropout(feats)))
    raise ConfigProblem(f"head-only training cannot split {type(task).__name__} into body and head; use pooling cls or mean")


def _head_logits(model: nn.Module, batch: dict, keys: list, config, store: dict) -> torch.Tensor:
    """The frozen body runs in eval mode under no_grad (its features cached across epochs if asked); only the
    head sees gradients. Eval mode makes the features deterministic, so caching them changes nothing."""
    task = getattr(model, "base_model", model)
    features, classify = feature_split(task)
    cache = config.head.cache_features
    if cache and keys and all(key in store for key in keys):
        feats = torch.stack([store[key] for key in keys])
    else:
        was_training = task.training
        task.eval()
        with torch.no_grad():
            feats = features(batch)
        task.train(was_training)
        if cache:
            for key, row in zip(keys, feats):
                store[key] = row.detach().clone()
    return classify(feats)


# ---------------------------------------------------------------------------------------------- full
def _full_prepare(model: nn.Module, config, run_info: dict) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def _full_save(model: nn.Module, run: Path) -> None:
    from ..io import write_safetensors

    write_safetensors(run / MODEL_DIR / "model.safetensors", dict(model.state_dict()))


def _full_load(model: nn.Module, run: Path) -> nn.Module:
    from safetensors.torch import load_file

    from ..io import AdapterFileError, check_and_copy

    path = run / MODEL_DIR / "model.safetensors"
    if not path.is_file():
        raise AdapterFileError(f"{path} is missing")
    state = dict(model.state_dict(keep_vars=True))
    check_and_copy({f"base_model.model.{k}": v for k, v in state.items()}, load_file(str(path)), str(path))
    return model


register(TrainingMethod("full", 5e-5, _full_prepare, _full_save, _full_load, lambda model: model, adapter=False))
