"""Head-only tuning ("softmax tuning", linear probing): every base weight stays frozen; only the task head trains.

The head is found as for LoRA (``classifier``/``score`` of a transformers classification model, or named with
``modules_to_save``) and saved with the adapter. With the body frozen and nothing before the head requiring grad,
autograd records nothing for the body: its forward costs what inference costs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from torch import nn

from ..config import AdapterConfig
from ..targets import TargetError
from . import Injection, register_method
from .common import add_modules_to_save, resolve_modules_to_save, task_of


@dataclasses.dataclass(frozen=True)
class HeadConfig(AdapterConfig):
    method = "head"

    modules_to_save: Sequence[str] | None = None


class HeadMethod:
    name = "head"
    config_cls = HeadConfig
    peft_type = "HEAD"

    def inject(self, model: nn.Module, config: HeadConfig, adapter_name: str) -> Injection:
        saved = resolve_modules_to_save(model, config.modules_to_save)
        if not saved:
            raise TargetError(
                f"head-only tuning found no task head on {type(model).__name__}: name the module(s) to train with "
                "modules_to_save=[...]"
            )
        add_modules_to_save(model, saved, adapter_name)
        return Injection(saved_modules=saved, task_type=task_of(model)[0])

    def file_config(self, model: nn.Module, config: HeadConfig, injection: Injection) -> dict[str, Any]:
        return {"peft_type": self.peft_type, "task_type": injection.task_type,
                "modules_to_save": list(injection.saved_modules)}

    def config_from_file(self, values: dict[str, Any], source: str) -> HeadConfig:
        return HeadConfig.from_dict({"modules_to_save": values.get("modules_to_save")}, source=source)


register_method(HeadMethod())
