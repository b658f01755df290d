"""Full fine-tuning, the baseline of ``peftkit train``: every weight trains; no adapter, no adapter file.

It is a registered method so that the CLI treats it like any other (its config section, default learning rate,
save and load), but it builds no adapter: ``adapt(model, FullConfig())`` refuses. The trained weights are saved
whole as ``model/model.safetensors`` inside the run folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from ..config import AdapterConfig, ConfigError
from .registry import Injection, Method, register_method

WEIGHTS_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class FullConfig(AdapterConfig):
    """Full fine-tuning has no settings of its own."""

    method = "full"


class FullMethod(Method):
    name = "full"
    config_cls = FullConfig
    peft_type = None
    default_lr = 5e-5
    adapter = False
    artifact = "model"

    def inject(self, model: nn.Module, config: FullConfig, adapter_name: str) -> Injection:
        raise ConfigError("full fine-tuning trains the model's own weights and adds no adapter, so it cannot be passed "
                          "to adapt(); train the model directly (or use peftkit train --method full)")

    def prepare(self, model: nn.Module, config: FullConfig) -> nn.Module:
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    def save(self, model: nn.Module, folder: Path) -> None:
        from ..atomic import write_safetensors

        write_safetensors(Path(folder) / self.artifact / WEIGHTS_FILE, dict(model.state_dict()))

    def load(self, model: nn.Module, folder: Path) -> nn.Module:
        from safetensors.torch import load_file

        from ..io import AdapterFileError, check_model_state

        path = Path(folder) / self.artifact / WEIGHTS_FILE
        if not path.is_file():
            raise AdapterFileError(f"{path} is missing")
        check_model_state(model, load_file(str(path)), str(path))
        return model

    def merged(self, model: nn.Module) -> nn.Module:
        return model


register_method(FullMethod())
