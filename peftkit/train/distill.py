"""Self-distillation during adapter training.

Teacher ``base``: the same network with its adapters disabled (``AdaptedModel.disable_adapters``), so no second
copy of the weights is held. Its classifier head is new (random), so its logits mean nothing: the student is
pulled towards the base model's hidden states instead (MSE or cosine distance), a regulariser against forgetting.
Teacher ``<run folder>``: a trained model (e.g. a full fine-tuning run) loaded beside the student; the loss is
Hinton et al.'s (1 − λ)·CE + λ·T²·KL(softmax(teacher/T) ‖ softmax(student/T)).
The teacher always runs in eval mode under ``torch.no_grad()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError


class Distiller:
    def __init__(self, section, student: nn.Module, labels) -> None:
        self.section = section
        self.student = student
        self.teacher = None
        if section.teacher != "base":
            from .run import Run

            run = Run(section.teacher)
            if run.labels.names != labels.names:
                raise ConfigError(f"distill.teacher {section.teacher}: its labels {run.labels.names[:10]} differ from "
                                    f"this run's {labels.names[:10]}")
            self.teacher = run.model.eval()
            for param in self.teacher.parameters():
                param.requires_grad_(False)
        self.mode = section.resolved_mode
        if self.teacher is None and not hasattr(student, "disable_adapters"):
            raise ConfigError("distill.teacher base needs an adapter method (the teacher is the network with adapters off)")

    @property
    def needs_hidden(self) -> bool:
        return self.mode == "hidden"

    def teacher_outputs(self, batch: dict):
        with torch.no_grad():
            if self.teacher is not None:
                return self.teacher(**batch, output_hidden_states=self.needs_hidden)
            was_training = self.student.training
            self.student.eval()
            try:
                with self.student.disable_adapters():
                    return self.student(**batch, output_hidden_states=self.needs_hidden)
            finally:
                self.student.train(was_training)

    def loss_sum(self, student_out, batch: dict, labels: torch.Tensor) -> torch.Tensor:
        """Σ over the batch of (1 − λ)·CE + λ·distillation term."""
        section = self.section
        logits = student_out.logits.float()
        ce = F.cross_entropy(logits, labels, reduction="sum")
        teacher = self.teacher_outputs(batch)
        if self.mode == "logits":
            t = section.temperature
            kl = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher.logits.float() / t, -1),
                          log_target=True, reduction="none").sum(-1)
            term = (t * t) * kl.sum()
        else:
            term = self.hidden_distance(student_out.hidden_states, teacher.hidden_states, batch.get("attention_mask"))
        return (1 - section.alpha) * ce + section.alpha * term

    def hidden_distance(self, student, teacher, mask) -> torch.Tensor:
        """Σ over examples of the mean distance between the chosen layers' hidden states (padding ignored)."""
        layers = self.section.layers or [-1]
        total = 0.0
        for index in layers:
            s, t = student[index].float(), teacher[index].float()
            if self.section.hidden_loss == "mse":
                per_token = (s - t).pow(2).mean(-1)
            else:
                per_token = 1 - F.cosine_similarity(s, t, dim=-1)
            if mask is None:
                per_example = per_token.mean(-1)
            else:
                weights = mask.to(per_token.dtype)
                per_example = (per_token * weights).sum(-1) / weights.sum(-1).clamp(min=1)
            total = total + per_example.sum()
        return total / len(layers)
