"""Resumable checkpoints, written atomically and read without pickle.

``save_training`` / ``restore_training`` checkpoint a trainer and put it back. A checkpoint is a folder ``checkpoints/step-000123`` holding ``tensors.safetensors`` (trainable weights, optimizer
moments, RNG state) and ``state.json`` (positions, scheduler, history). It is written under a temporary name and
renamed when complete, so a run killed at any moment leaves either the whole checkpoint or none of it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from ..atomic import recover_dir, remove_dir, write_dir, write_json, write_safetensors

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
    for path in list(root.glob(f".{PREFIX}*-*")):  # leftovers of an interrupted swap (see atomic.write_dir)
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


# ------------------------------------------------------------------------------- a trainer's whole state
def save_training(trainer) -> Path | None:
    """Checkpoint a trainer: trainable weights, optimizer, scheduler, RNG, its position, the methods' own
    resumable state (e.g. AdaLoRA's rank allocator). A collective under FSDP; only the main process writes."""
    from . import distributed as dist
    from .guards import check_savable

    env = trainer.env
    with dist.gather_for_save(trainer.model, env, trainer.config.distributed):
        opt_tensors, opt_plain = optimizer_state(trainer.optimizer)
        # whole optimizer moments: under FSDP2 they are shards, and gathering them is a collective on every rank
        opt_tensors = {key: dist.full(value) for key, value in opt_tensors.items()}
        if not env.main:
            return None
        check_savable(trainer._trainable_tensors(), "checkpoint", trainer._advice())
        tensors = {f"param.{n}": p.detach().clone() for n, p in trainer._trainable_tensors()}
    rng_tensors, rng_plain = rng_state()
    method_plain = {}
    for name, state in method_states(trainer.model):
        method_tensors, method_plain[name] = state.state_dict()
        tensors.update({f"method.{name}.{key}": value for key, value in method_tensors.items()})
    state = dict(trainer.state, optimizer=opt_plain, scheduler=trainer.scheduler.state_dict(), rng=rng_plain,
                 world=env.world, methods=method_plain)
    state["scheduler"].pop("lr_lambdas", None)
    return save(trainer.folder.checkpoints_dir, trainer.state["step"], {**tensors, **opt_tensors, **rng_tensors},
                state, keep=trainer.config.keep_checkpoints)


def restore_training(trainer) -> None:
    """Put a trainer back where its last complete checkpoint left it (same number of processes)."""
    from ..config import ConfigError

    found = complete(trainer.folder.checkpoints_dir)
    if not found:
        raise FileNotFoundError(f"{trainer.folder.path}: no checkpoint to resume from")
    tensors, state = load(found[-1])
    if state.get("world", 1) != trainer.env.world:
        raise ConfigError(f"{found[-1]}: the checkpoint was written by {state.get('world')} process(es), this run "
                          f"has {trainer.env.world}; resume with the same number of processes")
    with torch.no_grad():
        for name, param in trainer.named_params.items():
            param.copy_(tensors[f"param.{name}"])
    restore_optimizer(trainer.optimizer, tensors, state.pop("optimizer"))
    scheduler_state = state.pop("scheduler")
    trainer.scheduler.load_state_dict({**scheduler_state, "lr_lambdas": [None]})
    restore_rng(tensors, state.pop("rng"))
    method_plain = state.pop("methods", {})
    for name, method_state in method_states(trainer.model):
        prefix = f"method.{name}."
        method_state.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                     method_plain.get(name, {}))
    state.pop("world", None)
    trainer.state.update(state)
    trainer._say(f"resumed from {found[-1].name} (step {trainer.state['step']}, epoch {trainer.state['epoch']})")


def method_states(model) -> list:
    """(adapter name, resumable method state) pairs, e.g. AdaLoRA's rank allocator."""
    return model.method_states() if hasattr(model, "method_states") else []
