"""General helpers for a module tree, independent of any adapter method."""

from __future__ import annotations

from torch import nn


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the sub-module at the dotted ``path`` of ``model`` with ``module``."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def unique_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``module`` once (a tied weight counts once)."""
    return list({id(p): p for p in module.parameters()}.values())
