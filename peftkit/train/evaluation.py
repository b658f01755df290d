"""Evaluation during training and the best-model bookkeeping: evaluate on dev, record the task's metrics in the
history and TensorBoard, keep the best model, count evaluations without improvement (early stopping), and stop a
run whose dev loss is not finite."""

from __future__ import annotations

import math

from . import distributed as dist
from .guards import TrainingDiverged


def is_better(metric: float, best: float | None, name: str) -> bool:
    """Whether ``metric`` improves on ``best`` (lower is better for the loss, higher for every other metric)."""
    return best is None or (metric < best if name == "loss" else metric > best)


def evaluate_and_keep_best(trainer) -> bool:
    """Evaluate on dev, keep the best model, checkpoint; True when early stopping triggers.

    Only the main process evaluates, except under FSDP, where every process takes part in the forward."""
    config, state, env, task = trainer.config, trainer.state, trainer.env, trainer.task
    stop = better = diverged = False
    result = trainer.evaluate("dev") if trainer.datasets.dev and (env.main or trainer.sharded) else None
    if env.main and result is not None:
        name = config.metric_for_best_model
        metric = result[name]
        diverged = not math.isfinite(result["loss"])  # a model with a NaN dev loss is never the best
        better = not diverged and is_better(metric, state["best"], name)
        state["history"].append({"step": state["step"], "dev_loss": result["loss"],
                                 **{f"dev_{key}": result[key] for key in task.curve_metrics}})
        trainer.board.scalars({"dev/loss": result["loss"], **{f"dev/{key}": result[key] for key in task.curve_metrics}},
                              state["step"])
        if better:
            state["best"], state["best_step"], state["bad_evals"] = metric, state["step"], 0
        else:
            state["bad_evals"] += 1
            stop = bool(config.early_stopping_patience and state["bad_evals"] >= config.early_stopping_patience)
        trainer._say(f"step {state['step']}: dev loss {result['loss']:.4f}, {task.summary(result)}"
                     + (" (best)" if better else ""))
    if dist.broadcast_flag(diverged, env):
        raise TrainingDiverged(f"training diverged at step {state['step']}: the dev loss is not finite. "
                               + trainer._advice())
    if dist.broadcast_flag(better, env):
        trainer._save_model(trainer.folder.best_dir)
    trainer._checkpoint()
    return dist.broadcast_flag(stop, env)
