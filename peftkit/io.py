"""Adapter files in Hugging Face PEFT's format, written atomically and read strictly.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. Tensor keys are
``base_model.model.<module path>.<suffix>`` (e.g. ``...query.lora_A.weight``), never containing the adapter
name. ``adapter_state`` is the one function that maps an adapter's live parameters to those keys; saving
reads through it and loading writes through it, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .fingerprint import base_fingerprint  # noqa: F401  (re-exported: peftkit.serve imports it from here)
from .layers.base import AdapterLayer, logical_path

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "pytorch_adapter.bin", "adapter_model.pt")


class AdapterFileError(ValueError):
    """An adapter folder that is missing, unreadable, or does not fit the model."""


class AdapterContentError(AdapterFileError):
    """An adapter file whose values cannot be used: non-float tensors, NaN or infinite weights."""


def adapter_state(base_model: nn.Module, adapter_name: str, trained_base_params: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """File key -> live parameter for one adapter (the single source of truth for save and load)."""
    state: dict[str, torch.Tensor] = {}
    for path, module in base_model.named_modules():
        if isinstance(module, AdapterLayer) and adapter_name in module.adapter_names:
            for suffix, tensor in module.adapter_tensors(adapter_name).items():
                state[f"{PREFIX}{logical_path(path)}.{suffix}"] = tensor
    for name in trained_base_params:
        state[PREFIX + name] = base_model.get_parameter(name)
    return state


# ------------------------------------------------------------------------------------------------- writing
def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    # contiguous, unaliased CPU copies (safetensors refuses shared storage)
    plain = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(plain, tmp, metadata={"format": "pt", **(metadata or {})}))


def write_adapter(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], metadata: dict[str, str]) -> None:
    directory = Path(directory)
    write_safetensors(directory / WEIGHTS_NAME, tensors, metadata)
    write_json(directory / CONFIG_NAME, config)


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


def check_and_copy(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``found`` into ``expected`` only if keys and shapes agree exactly; otherwise raise, touching nothing."""
    found = with_prefix(found, source)
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
    check_values({k: found[k] for k, param in expected.items() if param.is_floating_point()}, source)
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(found[key].to(dtype=param.dtype, device=param.device))


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
