"""Adapter files in Hugging Face PEFT's format, written atomically and read strictly.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. Tensor keys are
``base_model.model.<module path>.<suffix>`` (e.g. ``...query.lora_A.weight``), never containing the adapter
name. ``_entries`` is the one function that maps an adapter's live parameters to those keys; saving reads through
it (``saved_state``) and loading writes through it (``check_and_load``), so the two cannot drift apart. A layer
whose file values differ from its parameters (a trained base bias saved as base + δ) converts both ways itself.
The key prefix ``base_model.model.`` lives here only: methods' file hooks see keys without it (``file_state``,
``strip_prefix``).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

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
class OutputError(OSError):
    """An output that cannot be written (full disk, read-only or missing folder); the message names the path."""


def output_error(err: OSError, path: str | os.PathLike) -> OutputError:
    """``err`` restated as a one-line message naming the path and what to do."""
    if isinstance(err, OutputError):
        return err
    where = err.filename or path
    reason = err.strerror or str(err)
    return OutputError(err.errno, f"cannot write {str(where)!r}: {reason}. Nothing was left half-written; free disk "
                                  "space, or choose a writable output folder, and run again")


def _new_name(path: Path, kind: str) -> Path:
    # pid first so that recovery can tell a dead writer's leftovers from a live one's
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see a partial file.

    The file gets the ordinary mode (0666 less the umask), like any file the user creates."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_name(path, "tmp")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # not mkstemp: that forces 0600
        mode = os.stat(tmp).st_mode & 0o777  # 0666 less the umask
        write(str(tmp))
        os.chmod(tmp, mode)  # a writer may have replaced the file (safetensors creates it 0600)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(err, OSError):
            raise output_error(err, path) from None
        raise
    _fsync_dir(path.parent)


def write_dir(directory: Path, fill: Callable[[Path], None], keep_others: bool = False) -> None:
    """Write a folder whole: ``fill`` writes into a fresh hidden sibling, which is then swapped in for the old
    folder (old renamed aside, new renamed into place, old removed). A crash at any point leaves either the
    old or the new complete folder once ``recover_dir`` has run (every writer and reader of run folders calls it).

    ``keep_others``: entries of the old folder that ``fill`` does not write (e.g. other adapters' sub-folders)
    are carried into the new one as hard links (copies where links are impossible)."""
    directory = Path(directory)
    recover_dir(directory)
    tmp = _new_name(directory, "tmp")
    aside = None
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        fill(tmp)
        if keep_others and directory.is_dir():
            _carry_over(directory, tmp)
        _fsync_tree(tmp)  # copied files too: the new folder is on disk before it replaces the old one
        if directory.exists():
            aside = _new_name(directory, "old")
            os.replace(directory, aside)
        os.replace(tmp, directory)
    except BaseException as err:
        if aside is not None and not directory.exists():
            with contextlib.suppress(OSError):
                os.replace(aside, directory)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise output_error(err, directory) from None
        raise
    _fsync_dir(directory.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _carry_over(old: Path, new: Path) -> None:
    for entry in old.iterdir():
        if entry.name.startswith(".") or (new / entry.name).exists():
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(source, target) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def recover_dir(directory: Path) -> None:
    """Finish or undo a folder swap that a crash interrupted: bring the old folder back if the new one never
    arrived, drop an old folder left beside the new one, and drop dead writers' temporary folders."""
    directory = Path(directory)
    parent = directory.parent
    if not parent.is_dir():
        return
    leftovers = [p for p in parent.glob(f".{glob.escape(directory.name)}.*-*") if p.is_dir()]
    for path in sorted(leftovers):
        kind, _, rest = path.name[len(directory.name) + 2:].partition("-")
        if kind == "old":
            if not directory.exists():
                os.replace(path, directory)
            else:
                shutil.rmtree(path, ignore_errors=True)
        elif kind == "del" or (kind == "tmp" and not _alive(rest.split("-")[0])):
            shutil.rmtree(path, ignore_errors=True)


def remove_dir(directory: Path) -> None:
    """Delete a folder so that no reader ever sees it half-deleted: rename it aside first."""
    directory = Path(directory)
    if directory.exists():
        gone = _new_name(directory, "del")
        os.replace(directory, gone)
        shutil.rmtree(gone, ignore_errors=True)


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False  # our own leftover from an earlier, failed attempt
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _fsync_tree(root: Path) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(folder))


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

    def write(tmp: str) -> None:
        try:
            save_file(plain, tmp, metadata={"format": "pt", **(metadata or {})})
        except Exception as err:  # safetensors reports a failed write as SafetensorError "... (os error N)"
            found = re.search(r"os error (\d+)", str(err))
            if found is None:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(path)) from None

    atomic_write(path, write)


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
