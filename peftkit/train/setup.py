"""What a training run is built from: the model folder, the data files (read and checked up front by the task),
the task model with its training method applied, and the learning-rate schedule."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..tasks import Datasets, Task
from ..tasks.data import DataError
from .config import RunConfig
from ..methods import get_method


def resolve_model(path: str) -> str:
    from ..tasks.models import PACKAGED, named_model

    named = named_model(path)
    if named is not None:
        return str(named)
    if not Path(path).is_dir():
        raise DataError(f"model {path!r}: no such folder (a transformers model folder, or one of the packaged ones: "
                        f"{', '.join(PACKAGED)})")
    return path


def resolve_data(config: RunConfig) -> RunConfig:
    if config.train_file is None:
        from ..tasks.demo import DATA_DIR

        return config.model_copy(update={"train_file": str(DATA_DIR / "intents_train.csv"),
                                         "test_file": config.test_file or str(DATA_DIR / "intents_test.csv")})
    return config


def load_datasets(config: RunConfig, task: Task) -> Datasets:
    """Read and check every file before anything is written (the task's errors name file, line and column)."""
    return task.load_datasets(config)


# ---------------------------------------------------------------------------------------------- model
def build_model(config: RunConfig, model_path: str, task: Task, vocabulary, prepare: bool = True,
                run_info: dict | None = None) -> nn.Module:
    """The task's fresh model; with ``prepare``, the training method applied and the run's options set (bf16
    storage of the frozen base, fast mode, gradient checkpointing)."""
    model = task.build_model(model_path, config, vocabulary)
    if not prepare:
        return model
    method = get_method(config.method)
    model = method.prepare(model, config.method_config(run_info or {}))
    if config.bf16 and method.adapter:
        model.cast_frozen(torch.bfloat16)
    if config.fast:
        from ..fast import fast_training

        fast_training(model)
    if config.gradient_checkpointing:
        _enable_checkpointing(model)
    return model


def _enable_checkpointing(model: nn.Module) -> None:
    target = model.base_model if hasattr(model, "enable_gradient_checkpointing") else model
    if hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing(reentrant=False)
        return
    inner = getattr(target, "encoder", target)
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def schedule(config: RunConfig, total_steps: int):
    warmup = int(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if config.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor
