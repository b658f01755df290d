"""Resumable checkpoints, written atomically and read without pickle.

A checkpoint is a folder ``checkpoints/step-000123`` holding ``tensors.safetensors`` (trainable weights, optimizer
moments, RNG state) and ``state.json`` (positions, scheduler, history). It is written under a temporary name and
renamed when complete, so a run killed at any moment leaves either the whole checkpoint or none of it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from ..io import recover_dir, remove_dir, write_dir, write_json, write_safetensors

PREFIX = "step-"


def save(directory: Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any], keep: int) -> Path:
    root = Path(directory)
    final = root / f"{PREFIX}{step:09d}"

    def fill(tmp: Path) -> None:
        write_safetensors(tmp / "tensors.safetensors", tensors)
        write_json(tmp / "state.json", state)

    write_dir(final, fill)
    for old in complete(root)[:-keep]:
        remove_dir(old)
    return final


def complete(directory: Path) -> list[Path]:
    root = Path(directory)
    if not root.is_dir():
        return []
    for path in list(root.glob(f".{PREFIX}*-*")):  # leftovers of an interrupted swap (see io.write_dir)
        recover_dir(root / path.name[1:].split(".")[0])
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    return load_file(str(path / "tensors.safetensors")), json.loads((path / "state.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------- state helpers
def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors and JSON."""
    state = optimizer.state_dict()
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        plain["state"][str(pid)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{key}"] = value
            else:
                plain["state"][str(pid)][key] = value
    return tensors, plain


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], plain: dict) -> None:
    state: dict = {}
    for pid, entries in plain["state"].items():
        state[int(pid)] = dict(entries)
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    version, internal, gauss = random.getstate()
    return {"rng.torch": torch.get_rng_state()}, {"python": [version, list(internal), gauss]}


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
