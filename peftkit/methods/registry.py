"""The registry of methods: one ``Method`` object per method, the only place a method is described.

The built-in methods register themselves when ``peftkit`` is imported (its ``__init__`` imports each of them).

A method is one module (``peftkit/methods/<name>.py``, or any module of a user's) that defines a frozen config
dataclass and a ``Method`` subclass, and calls ``register_method`` on an instance. That object carries everything
the rest of peftkit needs: how to build the adapter (``inject``), how it reads and writes files (``file_config``,
``config_from_file``, the paired ``export_tensors``/``import_tensors``), its training hooks, its default learning
rate, the CLI recipe, and its reserved names. ``adapt``, ``load_adapter``, ``peftkit train`` and its config look
methods up here by name, by config class or by ``peft_type``; nothing branches on method names.

The CLI recipe (``Method.recipe``): the settings ``peftkit train`` uses when a key is not given, where they differ
from the library dataclass defaults. The library defaults follow Hugging Face PEFT (so that ``LoraConfig()`` means
what ``peft.LoraConfig()`` means); the recipe is what a training run from the command line should start from (e.g.
LoRA alpha 16, dropout 0.1 and every linear layer).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping

import torch
from torch import nn

from ..config import AdapterConfig

#: names peftkit itself uses for sub-modules and parameters of adapter layers (the methods add their own)
CORE_RESERVED_NAMES = frozenset({"base", "base_layer", "base_model", "modules_to_save", "original_module", "weight",
                                 "bias"})


@dataclass
class Injection:
    """What adding one adapter did to the model; kept by the adapted model for saving and bookkeeping."""

    targets: list[str] = field(default_factory=list)  # module paths wrapped by the method's layers
    saved_modules: list[str] = field(default_factory=list)  # modules trained fully (modules_to_save)
    task_type: str | None = None
    state: Any = None  # method-specific training state (e.g. AdaLoRA's rank allocator)


class Method:
    """One fine-tuning method. Subclasses set the class attributes and override the hooks they need.

    Base parameters that an adapter trains (biases, LayerNorms) are never changed in place: a method adds a
    per-adapter change of them (layers/bitfit.py), so adapters sharing one base cannot affect each other.
    """

    #: registry name (``method: NAME`` in a run config, ``peftkit.get_method(NAME)``)
    name: ClassVar[str] = ""
    #: the settings: a frozen dataclass whose fields all carry ``metadata={"help": ...}``; it is also the CLI schema
    config_cls: ClassVar[type[AdapterConfig]]
    #: the ``peft_type`` written to adapter_config.json; None: the method writes no adapter file
    peft_type: ClassVar[str | None] = None
    #: whether files of ``peft_type`` are read back through this method (False where another method reads them,
    #: e.g. DoRA's files are LoRA files)
    reads_files: ClassVar[bool] = True
    #: peak learning rate of ``peftkit train`` when the run config does not set one
    default_lr: ClassVar[float] = 5e-4
    #: the CLI recipe: ``peftkit train`` defaults that differ from the dataclass defaults (see the module docstring);
    #: a recipe value of None means "filled in by ``config_for_run`` from the run" (e.g. from its length)
    recipe: ClassVar[Mapping[str, Any]] = {}
    #: names of the method's parameters and containers inside adapter layers; an adapter may not be named like
    #: them. A trailing ``*`` reserves a prefix (``lora_*``)
    reserved_names: ClassVar[frozenset[str]] = frozenset()
    #: False only for a method that trains the model itself rather than an adapter (full fine-tuning)
    adapter: ClassVar[bool] = True
    #: whether a freshly added adapter leaves the model's outputs unchanged (before any training)
    identity_at_init: ClassVar[bool] = True
    #: folder of the method's output inside a training run
    artifact: ClassVar[str] = "adapter"
    #: optional ``(model, batch, example keys, config, store) -> logits`` used by ``peftkit train`` instead of the
    #: model's forward (head-only's cached features); ``store`` is a dict that lives as long as the run
    train_logits: ClassVar[Callable[..., torch.Tensor] | None] = None

    # ------------------------------------------------------------------------------------------- building
    def inject(self, model: nn.Module, config: AdapterConfig, adapter_name: str) -> Injection:
        raise NotImplementedError(f"method {self.name!r} does not build adapters")

    # --------------------------------------------------------------------------------------------- files
    def file_config(self, model: nn.Module, config: AdapterConfig, injection: Injection) -> dict[str, Any]:
        """The content of adapter_config.json (default: every config field, plus peft_type and task_type)."""
        return {"peft_type": self.peft_type, "task_type": injection.task_type, **config.to_dict(),
                "modules_to_save": list(injection.saved_modules) or None}

    def config_from_file(self, values: dict[str, Any], source: str) -> AdapterConfig:
        """The config of an adapter_config.json (unknown keys are reported and ignored)."""
        values = {k: v for k, v in values.items() if k not in ("peft_type", "task_type")}
        return self.config_cls.from_dict(values, source=source)

    def export_tensors(self, tensors: dict[str, torch.Tensor], config: AdapterConfig,
                       injection: Injection) -> dict[str, torch.Tensor]:
        """The tensors to write (keys are module paths + suffix, without the file prefix); identity by default.
        ``import_tensors`` is its inverse."""
        return tensors

    def import_tensors(self, tensors: dict[str, torch.Tensor], config: AdapterConfig,
                       injection: Injection) -> dict[str, torch.Tensor]:
        """A file's tensors (keys as in ``export_tensors``) before they are checked against the adapter's
        parameters and loaded. It may consume keys the parameters do not have (e.g. a method's shared tensors,
        set here), so that they are not refused as unexpected; identity by default."""
        return tensors

    # ------------------------------------------------------------------------------------------ training
    def regularization(self, injection: Injection) -> torch.Tensor | None:
        """An extra loss term while the adapter trains (AdaLoRA's orthogonality penalty); None: none."""
        return None

    def after_optimizer_step(self, injection: Injection, step: int) -> None:
        """Called after optimizer step ``step`` (0-based) while the adapter trains."""

    def training_state(self, injection: Injection) -> Any:
        """Resumable training state (with ``state_dict``/``load_state_dict``) or None."""
        return None

    def config_for_run(self, values: dict[str, Any], run_info: Mapping[str, Any] | None) -> AdapterConfig:
        """The library config of a ``peftkit train`` run from its section's values. ``run_info`` holds
        ``total_steps``; it is None when the run config is validated before the run's length is known."""
        return self.config_cls(**values)

    # ---------------------------------------------------------------------------- peftkit train's hooks
    # (adapter methods inherit them from ``AdapterMethod`` in ``adapter.py``; full fine-tuning writes its own)
    def prepare(self, model: nn.Module, config: AdapterConfig) -> nn.Module:
        """The model to train, built from the task model."""
        raise NotImplementedError(f"method {self.name!r} does not say how to prepare a model for training")

    def save(self, model: nn.Module, folder: Path) -> None:
        """Write the trained result into ``folder / self.artifact``."""
        raise NotImplementedError(f"method {self.name!r} does not say how to save a trained model")

    def load(self, model: nn.Module, folder: Path) -> nn.Module:
        """The trained model: ``save``'s output read back into a fresh task model."""
        raise NotImplementedError(f"method {self.name!r} does not say how to load a trained model")

    def merged(self, model: nn.Module) -> nn.Module:
        """The trained model as a plain model without adapter wrappers."""
        raise NotImplementedError(f"method {self.name!r} does not say how to merge a trained model")

    def __repr__(self) -> str:
        return f"<method {self.name!r}>"


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method to the registry (a name registered again is replaced)."""
    if not method.name or not isinstance(method.name, str):
        raise ValueError(f"{type(method).__name__}: a method needs a name")
    missing = [f.name for f in dataclasses.fields(method.config_cls) if "help" not in f.metadata]
    if missing:
        raise ValueError(f"{method.config_cls.__name__}: fields {missing} have no help text "
                         "(metadata={'help': ...}); it is the documentation of the CLI keys")
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method (registered by a test or a plugin) from the registry."""
    _METHODS.pop(name, None)


@contextlib.contextmanager
def registered(method: Method) -> Iterator[Method]:
    """Register ``method`` for the duration of the block."""
    previous = _METHODS.get(method.name)
    register_method(method)
    try:
        yield method
    finally:
        unregister_method(method.name)
        if previous is not None:
            _METHODS[previous.name] = previous


def artifact_dirs() -> list[str]:
    """The folder names the registered methods save their trained result under (``adapter``, ``model``)."""
    return sorted({method.artifact for method in _METHODS.values()})


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def method_for_config(config: AdapterConfig) -> Method:
    for method in _METHODS.values():
        if type(config) is method.config_cls:
            return method
    raise TypeError(f"{type(config).__name__} is not the config of a registered method ({', '.join(sorted(_METHODS))})")


def method_for_peft_type(peft_type: str, source: str) -> Method:
    for method in _METHODS.values():
        if method.peft_type == peft_type and method.reads_files:
            return method
    known = sorted({m.peft_type for m in _METHODS.values() if m.peft_type and m.reads_files})
    raise ValueError(f"{source}: peft_type {peft_type!r} is not supported by peftkit; it reads {', '.join(known)}")


def available_methods() -> list[str]:
    return sorted(_METHODS)


def reserved_names() -> frozenset[str]:
    """Names an adapter may not have: peftkit's own plus every registered method's (``x*``: a prefix)."""
    return CORE_RESERVED_NAMES.union(*(m.reserved_names for m in _METHODS.values()))


def help_of(config_cls: type, name: str) -> str:
    """The help text of a config field."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(config_cls) if f.name == name)
