"""The registry of methods: name -> how to build, save and read an adapter of that kind.

A method is one module under ``peftkit/methods`` that defines a config class and a ``Method`` object and
registers it here. Everything else (``adapt``, ``load_adapter``, the CLI) looks methods up by name, by
config class or by the ``peft_type`` written in ``adapter_config.json``; nothing branches on method names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from ..config import AdapterConfig


@dataclass
class Injection:
    """What adding one adapter did to the model; kept by the adapted model for saving and bookkeeping."""

    targets: list[str] = field(default_factory=list)  # module paths wrapped by the method's layers
    saved_modules: list[str] = field(default_factory=list)  # modules trained fully (modules_to_save)
    task_type: str | None = None
    state: Any = None  # method-specific training state (e.g. AdaLoRA's rank allocator)


class Method(Protocol):
    name: str
    config_cls: type[AdapterConfig]
    peft_type: str  # the "peft_type" value in adapter_config.json

    def inject(self, model: nn.Module, config: AdapterConfig, adapter_name: str) -> Injection: ...

    def file_config(self, model: nn.Module, config: AdapterConfig, injection: Injection) -> dict[str, Any]: ...

    def config_from_file(self, values: dict[str, Any], source: str) -> AdapterConfig: ...

    # Optional hooks (looked up with getattr): regularization(injection) -> Tensor, added to the training loss;
    # after_optimizer_step(injection, step); export_tensors(tensors, injection) -> tensors, applied when saving;
    # import_tensors(tensors, config, injection) -> tensors, applied to a file's tensors (prefixed keys) before
    # they are checked against the model and loaded.
    # Base parameters that an adapter trains (biases, LayerNorms) are never changed in place: the method adds a
    # per-adapter change of them (layers/bitfit.py), so adapters sharing one base cannot affect each other.


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    _METHODS[method.name] = method
    return method


def _load_builtin() -> None:
    from . import adalora, bitfit, bottleneck, head, lora  # noqa: F401  (each registers itself)


def get_method(name: str) -> Method:
    _load_builtin()
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def method_for_config(config: AdapterConfig) -> Method:
    _load_builtin()
    for method in _METHODS.values():
        if type(config) is method.config_cls:
            return method
    raise TypeError(f"{type(config).__name__} is not the config of a registered method ({', '.join(sorted(_METHODS))})")


def method_for_peft_type(peft_type: str, source: str) -> Method:
    _load_builtin()
    for method in _METHODS.values():
        if method.peft_type == peft_type:
            return method
    known = sorted(m.peft_type for m in _METHODS.values())
    raise ValueError(f"{source}: peft_type {peft_type!r} is not supported by peftkit; it reads {', '.join(known)}")


def available_methods() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)
