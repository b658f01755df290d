"""What keeps a training run honest: non-finite steps are skipped (a few times), then the run stops as diverged,
and a model with non-finite weights is never saved."""

from __future__ import annotations

import math
import sys
from typing import Iterable

import torch


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the weights became non-finite (``peftkit train`` exits with status 3)."""


def non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity."""
    return [name for name, tensor in named if not bool(torch.isfinite(tensor.detach()).all())]


def check_savable(named: Iterable[tuple[str, torch.Tensor]], what: str, advice: str) -> None:
    """Refuse to write ``what`` when any trainable tensor is non-finite."""
    bad = non_finite(named)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise TrainingDiverged(f"training diverged: {len(bad)} trainable tensor(s) hold NaN or infinite values "
                               f"({shown}), so the {what} was not saved. {advice}")


class StepGuard:
    """Counts optimizer steps skipped because the loss or the gradient norm was non-finite."""

    def __init__(self, limit: int, state: dict, advice: str, say: bool) -> None:
        self.limit = limit
        self.state = state  # the trainer's resumable state: the count survives a resume
        self.advice = advice
        self.say = say

    @staticmethod
    def finite(loss: float, grad_norm: float) -> bool:
        return math.isfinite(loss) and math.isfinite(grad_norm)

    def skip(self, step: int, loss: float, grad_norm: float) -> None:
        """Record a skipped step; raise ``TrainingDiverged`` once more than ``limit`` steps were skipped."""
        skipped = self.state.get("skipped_steps", 0) + 1
        self.state["skipped_steps"] = skipped
        what = f"loss {loss:.4g}, gradient norm {grad_norm:.4g}"
        if skipped > self.limit:
            raise TrainingDiverged(
                f"training diverged at step {step}: {what}; {skipped} optimizer steps had a non-finite loss or "
                f"gradients, more than max_skipped_steps = {self.limit}. {self.advice}")
        if self.say:
            print(f"warning: step {step}: {what} is not finite; the step was skipped (no update); "
                  f"{skipped} of at most {self.limit} skipped (max_skipped_steps)", file=sys.stderr, flush=True)
