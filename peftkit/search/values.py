"""The run config as a plain mapping (what a trial's YAML file holds): the base config of the search, dotted keys
set on it, and the list of every key a search space may name."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ..methods import available_methods
from ..train.config import RunConfig, method_section

#: keys a search cannot sample: each trial has its own folder, and trials run quietly
FIXED_KEYS = ("output_dir", "quiet")
#: config keys naming files: made absolute so that best.yaml trains from any folder
PATH_KEYS = ("model", "train_file", "dev_file", "test_file")


def base_values(config: RunConfig) -> dict[str, Any]:
    """The resolved config as a mapping (the chosen method's section only), with existing paths made absolute."""
    import yaml

    values = yaml.safe_load(config.to_yaml())
    for key in PATH_KEYS:
        value = values.get(key)
        if isinstance(value, str) and value and Path(value).exists():
            values[key] = str(Path(value).resolve())
    return values


def with_values(base: dict[str, Any], sampled: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the dotted ``sampled`` keys set. A sampled method other than the base's starts from its own
    section's defaults: the base method's section is dropped (the config refuses another method's settings)."""
    values = copy.deepcopy(base)
    method = sampled.get("method", values.get("method"))
    if method != values.get("method"):
        values.pop(values.get("method"), None)
    for key, value in sampled.items():
        parts = key.split(".")
        node = values
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}  # e.g. distill: null in the base
            node = node[part]
        node[parts[-1]] = value
    values["method"] = method
    return values


def lookup(values: dict[str, Any], key: str) -> Any:
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def valid_keys() -> list[str]:
    """Every dotted key a space may name: the run config's fields and the keys of each section (methods, distill)."""
    keys = []
    for name, field in RunConfig.model_fields.items():
        if name in FIXED_KEYS:
            continue
        keys.append(name)
        section = next((c for c in (field.annotation, *getattr(field.annotation, "__args__", ()))
                        if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if section is not None:
            keys += [f"{name}.{sub}" for sub in section.model_fields]
    for method in available_methods():
        keys += [f"{method}.{sub}" for sub in method_section(method).model_fields]
    return keys
