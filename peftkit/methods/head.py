"""Head-only tuning ("softmax tuning", linear probing): every base weight stays frozen; only the task head trains.

The head is found as for LoRA (``classifier``/``score`` of a transformers classification model, or named with
``modules_to_save``) and saved with the adapter. With the body frozen and nothing before the head requiring grad,
autograd records nothing for the body: its forward costs what inference costs. ``peftkit train`` goes further
(``train_logits``): the body runs under no_grad, and with ``cache_features`` its pooled features are computed once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..config import AdapterConfig, ConfigError, option
from ..targets import TargetError
from .adapter import AdapterMethod
from .registry import Injection, register_method
from .common import add_modules_to_save, resolve_modules_to_save, task_of


@dataclasses.dataclass(frozen=True)
class HeadConfig(AdapterConfig):
    method = "head"

    modules_to_save: Sequence[str] | None = option(None, "the modules to train (default: the model's task head)")
    #: training-time only (``peftkit train``), not written to files
    cache_features: bool = option(False, "compute the frozen body's pooled features once, train the head on them")


class HeadMethod(AdapterMethod):
    name = "head"
    config_cls = HeadConfig
    peft_type = "HEAD"
    default_lr = 1e-3

    def inject(self, model: nn.Module, config: HeadConfig, adapter_name: str) -> Injection:
        saved = resolve_modules_to_save(model, config.modules_to_save)
        if not saved:
            raise TargetError(
                f"head-only tuning found no task head on {type(model).__name__}: name the module(s) to train with "
                "modules_to_save=[...]"
            )
        add_modules_to_save(model, saved, adapter_name)
        return Injection(saved_modules=saved, task_type=task_of(model)[0])

    def file_config(self, model: nn.Module, config: HeadConfig, injection: Injection) -> dict[str, Any]:
        return {"peft_type": self.peft_type, "task_type": injection.task_type,
                "modules_to_save": list(injection.saved_modules)}

    def config_from_file(self, values: dict[str, Any], source: str) -> HeadConfig:
        return HeadConfig.from_dict({"modules_to_save": values.get("modules_to_save")}, source=source)

    def train_logits(self, model: nn.Module, batch: dict, keys: list, config: HeadConfig, store: dict) -> torch.Tensor:
        """The frozen body runs in eval mode under no_grad (its features cached across epochs if asked); only the
        head sees gradients. Eval mode makes the features deterministic, so caching them changes nothing."""
        task = getattr(model, "base_model", model)
        features, classify = feature_split(task)
        cache = config.cache_features
        if cache and keys and all(key in store for key in keys):
            feats = torch.stack([store[key] for key in keys])
        else:
            was_training = task.training
            task.eval()
            with torch.no_grad():
                feats = features(batch)
            task.train(was_training)
            if cache:
                for key, row in zip(keys, feats):
                    store[key] = row.detach().clone()
        return classify(feats)


def feature_split(task: nn.Module) -> tuple[Callable, Callable]:
    """(features(batch), classify(features)) of a classifier whose head reads pooled features: a model with
    ``features``/``classify`` methods (peftkit's pooled classifiers), or a transformers model whose ``classifier``
    reads the pooler output through ``dropout``."""
    if callable(getattr(task, "features", None)) and callable(getattr(task, "classify", None)):
        return (lambda batch: task.features(**batch)), (lambda feats: task.classify(feats).logits)
    body = getattr(task, "base_model", None)
    if body is not None and body is not task and hasattr(task, "classifier") and hasattr(task, "dropout"):
        def features(batch):
            out = body(**batch)
            if getattr(out, "pooler_output", None) is None:
                raise ConfigError("head.cache_features needs pooled features: use pooling cls or mean")
            return out.pooler_output

        return features, (lambda feats: task.classifier(task.dropout(feats)))
    raise ConfigError(f"head-only training cannot split {type(task).__name__} into body and head; use pooling cls or mean")


register_method(HeadMethod())
