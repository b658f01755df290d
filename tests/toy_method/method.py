"""A method defined outside peftkit, as a user (or a test) would: one layer file, this file, nothing else.

Importing this module registers the method ``toy``; ``peftkit.unregister_method("toy")`` removes it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from peftkit.config import AdapterConfig, option, require
from peftkit.io import AdapterFileError
from peftkit.methods import Injection, register_method
from peftkit.methods.adapter import AdapterMethod
from peftkit.methods.common import add_modules_to_save, resolve_modules_to_save, task_of, wrap
from peftkit.targets import Selection, TargetSpec, select

from toy_method.layer import TOY_LAYERS

SHARED_PREFIX = "toy_shared."


@dataclasses.dataclass(frozen=True)
class ToyConfig(AdapterConfig):
    method = "toy"

    target_modules: TargetSpec = option("all-linear", "modules that get a learned output scale")
    shared_std: float = option(1.0, "spread of the shared random matrix M (divided by √fan-in)")
    modules_to_save: tuple[str, ...] | None = option(None, "modules trained whole (the task head is added by itself)")

    def __post_init__(self) -> None:
        require(self.shared_std > 0, f"shared_std must be positive, got {self.shared_std!r}")


@dataclasses.dataclass
class SharedMatrices:
    """The adapter's shared tensors: one frozen random M per (out, in) shape of the targeted layers."""

    by_shape: dict[tuple[int, int], torch.Tensor]


class ToyMethod(AdapterMethod):
    name = "toy"
    config_cls = ToyConfig
    peft_type = "TOY"
    default_lr = 1e-2
    reserved_names = frozenset({"toy_scale"})

    def inject(self, model: nn.Module, config: ToyConfig, adapter_name: str) -> Injection:
        saved = resolve_modules_to_save(model, config.modules_to_save)
        targets = select(model, Selection(config.target_modules, modules_to_save=tuple(saved)),
                         lambda module: TOY_LAYERS.lookup(module) is not None, "toy")
        shared: dict[tuple[int, int], torch.Tensor] = {}
        for path in targets:
            layer = wrap(model, path, TOY_LAYERS)
            weight = layer.inner.weight
            shape = tuple(weight.shape)
            if shape not in shared:  # drawn at random: a reload gets its values from the file (import_tensors)
                shared[shape] = torch.randn(shape, device=weight.device) * config.shared_std / math.sqrt(shape[1])
            layer.add_adapter(adapter_name, shared[shape])
        add_modules_to_save(model, saved, adapter_name)
        return Injection(targets=targets, saved_modules=saved, task_type=task_of(model)[0],
                         state=SharedMatrices(shared))

    def export_tensors(self, tensors: dict[str, torch.Tensor], config: ToyConfig,
                       injection: Injection) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        for (rows, cols), matrix in injection.state.by_shape.items():
            out[f"{SHARED_PREFIX}{rows}x{cols}"] = matrix
        return out

    def import_tensors(self, tensors: dict[str, torch.Tensor], config: ToyConfig,
                       injection: Injection) -> dict[str, torch.Tensor]:
        rest = dict(tensors)
        for (rows, cols), matrix in injection.state.by_shape.items():
            key = f"{SHARED_PREFIX}{rows}x{cols}"
            if key not in rest or tuple(rest[key].shape) != (rows, cols):
                raise AdapterFileError(f"the file has no {rows}x{cols} shared matrix {key!r}")
            with torch.no_grad():
                matrix.copy_(rest.pop(key))  # in place: every layer holds this very tensor
        return rest

    def file_config(self, model: nn.Module, config: ToyConfig, injection: Injection) -> dict[str, Any]:
        return {"peft_type": self.peft_type, "task_type": injection.task_type, "target_modules": list(injection.targets),
                "shared_std": config.shared_std, "modules_to_save": list(injection.saved_modules) or None}


register_method(ToyMethod())
