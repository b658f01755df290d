"""Training methods by name: how ``peftkit train --method NAME`` prepares, saves and reloads a model.

Every adapter method of the library (``peftkit.methods``) is a training method automatically: it is applied with
``peftkit.adapt`` and saved with ``save_adapter``. ``full`` (plain fine-tuning, the baseline) is the one special
case, registered here. New methods plug in by registering in either place; nothing here branches on names.
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
    prepare: Callable[[nn.Module, object], nn.Module]  # (task model, RunConfig) -> model to train
    save: Callable[[nn.Module, Path], None]  # writes into the run folder
    load: Callable[[nn.Module, Path], nn.Module]  # (fresh task model, run folder) -> trained model
    merged: Callable[[nn.Module], nn.Module]  # trained model -> plain model without adapter wrappers
    adapter: bool = True  # whether the frozen base can be stored in bf16 (only adapters train)


_METHODS: dict[str, TrainingMethod] = {}
DEFAULT_LR = {"lora": 5e-4, "head": 1e-3}


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

    for name in available_methods():
        if name not in _METHODS:
            register(_adapter_method(name))


def _adapter_method(name: str) -> TrainingMethod:
    import peftkit

    def prepare(model: nn.Module, config) -> nn.Module:
        section = getattr(config, name, None)
        library = section.library_config() if hasattr(section, "library_config") else \
            peftkit.get_method(name).config_cls(**(section.model_dump() if section is not None else {}))
        return peftkit.adapt(model, library)

    return TrainingMethod(
        name=name,
        default_lr=DEFAULT_LR.get(name, 5e-4),
        prepare=prepare,
        save=lambda model, run: model.save_adapter(run / ADAPTER_DIR),
        load=lambda model, run: peftkit.load_adapter(model, run / ADAPTER_DIR),
        merged=lambda model: model.merge_and_unload(),
    )


# ---------------------------------------------------------------------------------------------- full
def _full_prepare(model: nn.Module, config) -> nn.Module:
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
