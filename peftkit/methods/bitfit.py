"""BitFit: only the biases (and the task head) train. Every Linear, GPT-2 Conv1D, LayerNorm and Conv2d that has
a bias gets a per-adapter bias change (``peftkit/layers/bitfit.py``); ``target_modules`` narrows that down.
Saved as ``adapter_config.json`` (``peft_type: BITFIT``) + ``adapter_model.safetensors`` (the δb vectors).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from torch import nn

from ..config import AdapterConfig, option
from ..layers.bitfit import BITFIT_LAYERS
from ..targets import Selection, TargetError, TargetSpec, base_modules, select
from .adapter import AdapterMethod
from .registry import Injection, register_method
from .common import add_modules_to_save, resolve_modules_to_save, task_of, wrap


@dataclasses.dataclass(frozen=True)
class BitFitConfig(AdapterConfig):
    method = "bitfit"

    target_modules: TargetSpec = option(None, "modules whose bias trains (default: every module with a bias, "
                                        "except the task head)")
    exclude_modules: TargetSpec = option(None, "modules whose bias stays frozen")
    modules_to_save: Sequence[str] | None = option(None, "modules trained whole and saved with the adapter (the "
                                                   "task head is added by itself)")


class BitFitMethod(AdapterMethod):
    name = "bitfit"
    config_cls = BitFitConfig
    peft_type = "BITFIT"
    default_lr = 1e-3
    reserved_names = frozenset({"bias_delta", "weight_delta"})

    @staticmethod
    def supports(module: nn.Module) -> bool:
        return BITFIT_LAYERS.lookup(module) is not None and getattr(module, "bias", None) is not None

    def inject(self, model: nn.Module, config: BitFitConfig, adapter_name: str) -> Injection:
        saved = resolve_modules_to_save(model, config.modules_to_save)
        spec = config.target_modules
        if spec is None:  # every module that has a bias
            spec = [p for p, m in base_modules(model) if self.supports(m) and p not in saved]
            if not spec:
                raise TargetError(f"{type(model).__name__} has no Linear/LayerNorm/Conv biases for BitFit to tune "
                                  "(LLaMA-style models have none); choose another method")
        targets = select(model, Selection(spec, config.exclude_modules, modules_to_save=tuple(saved)), self.supports,
                         "BitFit")
        for path in targets:
            wrap(model, path, BITFIT_LAYERS).add_adapter(adapter_name)
        add_modules_to_save(model, saved, adapter_name)
        return Injection(targets=targets, saved_modules=saved, task_type=task_of(model)[0])

    def file_config(self, model: nn.Module, config: BitFitConfig, injection: Injection) -> dict[str, Any]:
        return {"peft_type": self.peft_type, "task_type": injection.task_type, "target_modules": list(injection.targets),
                "exclude_modules": None, "modules_to_save": list(injection.saved_modules) or None}


register_method(BitFitMethod())
