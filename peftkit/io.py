"""Adapter files in Hugging Face PEFT's format, written atomically (``atomic.py``) and read strictly.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. Tensor keys are
``base_model.model.<module path>.<suffix>`` (e.g. ``...query.lora_A.weight``), never containing the adapter
name. ``_entries`` is the one function that maps an adapter's live parameters to those keys; saving reads through
it (``saved_state``) and loading writes through it (``check_and_load``), so the two cannot drift apart. A layer
whose file values differ from its parameters (a trained base bias saved as base + δ) converts both ways itself.
The key prefix ``base_model.model.`` lives here only: methods' file hooks see keys without it (``file_state``,
``strip_prefix``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import write_dir, write_json, write_safetensors
from .layers.base import AdapterLayer, logical_path

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "pytorch_adapter.bin", "adapter_model.pt")


class AdapterFileError(ValueError):
    """An adapter folder that is missing, unreadable, or does not fit the model."""


class AdapterContentError(AdapterFileError):
    """An adapter file whose values cannot be used: non-float tensors, NaN or infinite weights."""


def _entries(base_model: nn.Module, adapter_name: str) -> dict[str, tuple[AdapterLayer, str]]:
    """File key -> (adapter layer, suffix) for one adapter."""
    entries: dict[str, tuple[AdapterLayer, str]] = {}
    for path, module in base_model.named_modules():
        if isinstance(module, AdapterLayer) and adapter_name in module.adapter_names:
            for suffix in module.adapter_tensors(adapter_name):
                key = f"{PREFIX}{logical_path(path)}.{suffix}"
                if key in entries:  # two nested layers claiming one key would silently lose a tensor
                    raise RuntimeError(f"adapter {adapter_name!r}: two layers write the file key {key!r}")
                entries[key] = (module, suffix)
    return entries


def adapter_state(base_model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """File key -> live parameter for one adapter (the single source of truth for save and load)."""
    return {key: layer.adapter_tensors(adapter_name)[suffix]
            for key, (layer, suffix) in _entries(base_model, adapter_name).items()}


def saved_state(base_model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """File key -> the value to write: each layer's ``saved_tensors`` (e.g. a trained base bias as base + δ)."""
    return {key: layer.saved_tensors(adapter_name)[suffix]
            for key, (layer, suffix) in _entries(base_model, adapter_name).items()}


def file_state(base_model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """``saved_state`` keyed without the file prefix (``<module path>.<suffix>``): what a method's
    ``export_tensors`` receives; ``add_prefix`` gives the file's keys."""
    return {key[len(PREFIX):]: value for key, value in saved_state(base_model, adapter_name).items()}


def add_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {PREFIX + key: value for key, value in tensors.items()}


def strip_prefix(found: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A file's tensors keyed without the prefix (files written with or without it, never a mix, are accepted)."""
    return {key[len(PREFIX):]: value for key, value in with_prefix(found, source).items()}


# ------------------------------------------------------------------------------------------------- writing
def write_adapter(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], metadata: dict[str, str]) -> None:
    """Both files of an adapter folder replaced together (a folder swap), never one without the other."""

    def fill(tmp: Path) -> None:
        write_safetensors(tmp / WEIGHTS_NAME, tensors, metadata)
        write_json(tmp / CONFIG_NAME, config)

    write_dir(directory, fill, keep_others=True)


# ------------------------------------------------------------------------------------------------- reading
def find_adapter_dir(path: str | os.PathLike, adapter_name: str) -> Path:
    """The folder holding the adapter: ``path/<adapter_name>`` if ``save_adapter`` put it there, else ``path``."""
    root = Path(path)
    if not root.exists():
        raise AdapterFileError(f"adapter path {str(root)!r} does not exist")
    if (root / adapter_name / CONFIG_NAME).is_file():
        return root / adapter_name
    if (root / CONFIG_NAME).is_file():
        return root
    subfolders = sorted(p.name for p in root.iterdir() if (p / CONFIG_NAME).is_file()) if root.is_dir() else []
    hint = (
        f"; it holds adapters in sub-folders: {', '.join(subfolders)} (pass adapter_name=... or the sub-folder path)"
        if subfolders else ""
    )
    raise AdapterFileError(f"no {CONFIG_NAME} in {str(root)!r}{hint}")


def read_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{path}: cannot read the adapter config ({err})") from None
    if not isinstance(values, dict) or "peft_type" not in values:
        raise AdapterFileError(f"{path}: not an adapter config (a JSON object with a 'peft_type' key is expected)")
    return values


def read_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        pickled = [name for name in PICKLE_NAMES if (Path(directory) / name).is_file()]
        if pickled:
            raise AdapterFileError(
                f"{directory}: only {pickled[0]} is there; peftkit reads safetensors only, because pickle files can run "
                "code when loaded. Convert it once in a trusted environment: "
                "safetensors.torch.save_file(torch.load(f, weights_only=True), 'adapter_model.safetensors')"
            )
        raise AdapterFileError(f"{directory}: {WEIGHTS_NAME} is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises several error types for damaged files
        raise AdapterFileError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    return tensors, metadata


def check_and_load(base_model: nn.Module, adapter_name: str, found: dict[str, torch.Tensor], source: str) -> None:
    """Set the adapter's parameters from ``found`` only if keys and shapes agree exactly; otherwise raise, touching
    nothing. Each value goes through its layer's ``load_tensor`` (the inverse of ``saved_tensors``)."""
    entries = _entries(base_model, adapter_name)
    expected = {key: layer.adapter_tensors(adapter_name)[suffix] for key, (layer, suffix) in entries.items()}
    found = with_prefix(found, source)
    check_keys(expected, found, source)
    check_values({k: found[k] for k, param in expected.items() if param.is_floating_point()}, source)
    for key, (layer, suffix) in entries.items():
        layer.load_tensor(adapter_name, suffix, found[key])


def check_and_copy(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``found`` into ``expected`` only if keys and shapes agree exactly; otherwise raise, touching nothing."""
    found = with_prefix(found, source)
    check_keys(expected, found, source)
    check_values({k: found[k] for k, param in expected.items() if param.is_floating_point()}, source)
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(found[key].to(dtype=param.dtype, device=param.device))


def check_model_state(model: nn.Module, found: dict[str, torch.Tensor], source: str) -> None:
    """Copy a whole model's saved state (keys as in ``state_dict()``) into ``model``, strictly as ``check_and_copy``."""
    expected = {PREFIX + key: value for key, value in model.state_dict(keep_vars=True).items()}
    check_and_copy(expected, found, source)


def check_keys(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Raise ``AdapterFileError`` listing every missing, unexpected and mis-shaped key."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected if k in found and found[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for title, items in (("missing from the file", missing), ("in the file but not in the model", unexpected),
                             ("with different shapes", mismatched)):
            if items:
                shown = "\n    ".join(items[:8]) + (f"\n    ... and {len(items) - 8} more" if len(items) > 8 else "")
                parts.append(f"  {len(items)} key(s) {title}:\n    {shown}")
        raise AdapterFileError(
            f"{source}: the adapter file does not match the model built from its config; nothing was loaded.\n"
            + "\n".join(parts)
            + "\n  (Was it saved for another base model, or is adapter_config.json out of step with the weights?)"
        )


def check_values(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse, for weights that are floating point in the model, tensors that a cast would silently turn into
    floats (integers, booleans) and values that are not finite."""
    not_float = [f"{k}: {t.dtype}" for k, t in tensors.items() if not t.is_floating_point()]
    if not_float:
        raise AdapterContentError(
            f"{source}: adapter weights must be floating point; {len(not_float)} tensor(s) are not "
            f"({_listed(not_float)}); nothing was loaded. Re-save the adapter from its trained float weights"
        )
    broken = [f"{k}: {int((~torch.isfinite(t)).sum())} of {t.numel()} values" for k, t in tensors.items()
              if not bool(torch.isfinite(t).all())]
    if broken:
        raise AdapterContentError(
            f"{source}: {len(broken)} tensor(s) hold NaN or infinite values ({_listed(broken)}); nothing was loaded. "
            "The training run probably diverged: retrain with a lower learning rate, or use an earlier checkpoint"
        )


def _listed(items: list[str], shown: int = 8) -> str:
    return "; ".join(items[:shown]) + (f"; ... and {len(items) - shown} more" if len(items) > shown else "")


def with_prefix(found: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Accept keys written without PEFT's ``base_model.model.`` prefix, but never a mix of both forms."""
    prefixed = [k for k in found if k.startswith(PREFIX)]
    if len(prefixed) == len(found):
        return found
    if not prefixed:
        return {PREFIX + k: v for k, v in found.items()}
    bare = [k for k in found if not k.startswith(PREFIX)]
    raise AdapterFileError(
        f"{source}: {len(prefixed)} keys start with {PREFIX!r} and {len(bare)} do not (e.g. {bare[0]!r}); "
        "a file must use one form"
    )
