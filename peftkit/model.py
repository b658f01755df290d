"""AdaptedModel: a base model with named adapters injected into it.

``adapt(model, config)`` wraps the targeted modules of any ``nn.Module`` in adapter layers, freezes the rest
and returns an ``AdaptedModel`` whose forward takes the same arguments as the model. Adapters can be added,
activated (several at once: their deltas add up), disabled for a while, merged into the weights, saved,
loaded and deleted.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from . import adapter_files, fingerprint, io
from .config import AdapterConfig
from .layers.base import AdapterLayer
from .layers.modules_to_save import ModulesToSave
from .merging import MergePlan
from .methods import Injection, Method, method_for_config
from .names import AdapterExistsError, AdapterNameError, check_adapter_name  # noqa: F401  (public here too)
from .tree import set_submodule, unique_parameters

from .mixing import BASE  # noqa: E402  (in a mixed batch: the plain base model; a reserved adapter name)


@dataclass
class AdapterRecord:
    config: AdapterConfig
    method: Method
    injection: Injection
    trainable: bool = True


@dataclass(frozen=True)
class TrainableParameters:
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable: {100 * self.share:.4f}%"


def count_parameters(module: nn.Module) -> TrainableParameters:
    """Trainable and total parameters of any module (a tied weight counts once)."""
    params = unique_parameters(module)
    return TrainableParameters(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


class AdaptedModel(nn.Module):
    """A model with adapters. ``forward`` is the base model's forward; attributes fall through to it."""

    def __init__(self, model: nn.Module) -> None:
        if isinstance(model, AdaptedModel):
            raise TypeError("the model is already an AdaptedModel; call adapt() on it to add another adapter")
        super().__init__()
        self.base_model = model
        self.adapters: dict[str, AdapterRecord] = {}
        self._active: tuple[str, ...] = ()
        self._requires_grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
        # taken once, before any training: base parameters that a method trains in place must not change it
        try:
            self.base_fingerprint: str | None = fingerprint.base_fingerprint(model)
        except (RuntimeError, NotImplementedError):  # meta or sharded parameters: no fingerprint to record
            self.base_fingerprint = None
        for param in model.parameters():
            param.requires_grad_(False)
        self.training = model.training  # adopt the wrapped model's mode (from_pretrained returns eval mode)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "adapters", "_active"):
                raise
            return getattr(self.base_model, name)

    def forward(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """The base model's forward. ``adapter_names`` (one per row of the batch; ``"base"`` for none) runs a mixed
        batch: every row through its own adapter, in one forward (inference only)."""
        if adapter_names is not None:
            with self.mixed_batch(adapter_names):
                return self.base_model(*args, **kwargs)
        output = self.base_model(*args, **kwargs)
        if self.training and getattr(output, "loss", None) is not None:
            extra = self.regularization()  # as PEFT does for AdaLoRA: only when the model computed a loss
            if extra is not None:
                output.loss = output.loss + extra
        return output

    # ------------------------------------------------------------------------------------------- adapters
    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        for path, module in self.base_model.named_modules():
            if isinstance(module, AdapterLayer):
                yield path, module

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    def add_adapter(self, config: AdapterConfig, adapter_name: str = "default", trainable: bool = True) -> None:
        """Inject a new adapter. The first adapter becomes active; later ones wait for ``set_adapter``."""
        self._mixed_layers = None  # the set of adapter layers changes: mixed_batch walks the tree again
        check_adapter_name(adapter_name, self.adapters)
        method = method_for_config(config)
        config = copy.deepcopy(config)
        before = {id(m) for m in self.base_model.modules()}
        try:
            injection = method.inject(self.base_model, config, adapter_name)
        except Exception:
            self._remove_everywhere(adapter_name)
            raise
        # new modules are created in training mode; they follow this model's mode (no dropout after .eval())
        for module in self.base_model.modules():
            if id(module) not in before:
                module.training = self.training
        self.adapters[adapter_name] = AdapterRecord(config, method, injection, trainable)
        self.set_adapter(list(self._active) or [adapter_name])
        self._warn_about_unsaved_fresh_weights(adapter_name)

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Activate one adapter, or several whose outputs add up. Inactive adapters are frozen."""
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            self._require(name)
        if self.merged_adapters and set(names) != set(self._active):
            warnings.warn("unmerging the merged adapters before switching the active ones", stacklevel=2)
            self.unmerge()
        self._active = tuple(names)
        for _, layer in self.adapter_layers():
            layer.set_active(names)
        self._update_requires_grad()

    def _update_requires_grad(self) -> None:
        for name, record in self.adapters.items():
            train = record.trainable and name in self._active
            for param in self._adapter_params(name):
                param.requires_grad_(train)

    def _adapter_params(self, name: str) -> list[torch.Tensor]:
        return list(io.adapter_state(self.base_model, name).values())

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter; layers it leaves without adapters are unwrapped (the base module is put back)."""
        self._mixed_layers = None  # the set of adapter layers changes: mixed_batch walks the tree again
        self._require(name)
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the weights; call unmerge() before deleting it")
        for _, layer in self.adapter_layers():
            if name in layer.adapter_names:
                layer.delete_adapter(name)
        self._drop_empty_layers()
        del self.adapters[name]
        remaining = [n for n in self._active if n != name] or list(self.adapters)[:1]
        self._active = ()
        if remaining:
            self.set_adapter(remaining)

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator["AdaptedModel"]:
        """Run the plain base model inside the block; the previous state (incl. merges) is restored on exit."""
        saved = [(layer, layer.disabled, list(layer.merged_adapters)) for _, layer in self.adapter_layers()]
        for layer, _, _ in saved:
            layer.unmerge()
            layer.disabled = True
        try:
            yield self
        finally:
            for layer, was_disabled, merged in saved:
                layer.disabled = was_disabled
                if merged:  # (a layer that cannot merge refuses even an empty list)
                    layer.merge(merged)

    # -------------------------------------------------------------------------------------------- merging
    @property
    def merged_adapters(self) -> list[str]:
        names: dict[str, None] = {}
        for _, layer in self.adapter_layers():
            names.update(dict.fromkeys(layer.merged_adapters))
        return list(names)

    def merge(self, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights; forward then costs nothing extra.

        One transaction: every layer's new values are computed and checked first, then all are written; a refusal
        (an adapter that cannot be merged, a weight tied to another module, or with ``safe=True`` a non-finite
        value) changes nothing. ``merge_and_unload`` unties tied weights instead of refusing.
        """
        self._merge(adapter_names, safe, untie=False)

    def _merge(self, adapter_names: Sequence[str] | None, safe: bool, untie: bool) -> None:
        names = list(adapter_names) if adapter_names is not None else list(self._active)
        for name in names:
            self._require(name)
        already = [n for n in names if n in self.merged_adapters]
        if already:
            warnings.warn(f"adapter(s) {already} already merged; merging again changes nothing", stacklevel=3)
        names = [n for n in names if n not in already]
        layers = [(path, layer, [n for n in names if n in layer.adapter_names])
                  for path, layer in self.adapter_layers() if set(names) & set(layer.adapter_names)]
        MergePlan(self.base_model, layers, safe=safe, untie=untie).commit()

    def unmerge(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def merge_and_unload(self, safe: bool = False) -> nn.Module:
        """Merge the active adapters and return the plain base model (wrappers removed, trained heads kept).

        A weight tied to another module (GPT-2's ``wte`` and ``lm_head``) is untied: the other module keeps the
        original weight and a transformers config gets ``tie_word_embeddings = False``, so that the merged model,
        saved and reloaded, computes what the adapted one did."""
        self._merge(None, safe, untie=True)
        return self._unwrap(merged=True)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the plain base model."""
        return self._unwrap(merged=False)

    def _unwrap(self, merged: bool) -> nn.Module:
        self._mixed_layers = None  # every adapter layer goes: mixed_batch walks the tree again next time
        for path, layer in reversed(list(self.adapter_layers())):
            set_submodule(self.base_model, path, layer.unwrapped(merged))
        for name, param in self.base_model.named_parameters():
            param.requires_grad_(self._requires_grad_before.get(name, True))
        self.adapters.clear()
        self._active = ()
        return self.base_model

    # --------------------------------------------------------------------------------------------- files
    def save_adapter(self, path: str | Path, adapter_name: str | None = None) -> None:
        """Save in Hugging Face PEFT's format: 'default' in ``path``, any other adapter in ``path/<name>``."""
        adapter_files.save(self, path, adapter_name)

    def load_adapter(self, path: str | Path, adapter_name: str = "default", trainable: bool = False,
                     resize_heads: bool = False, check_base: bool = False, rename=None,
                     base_fingerprint: str | None = None) -> None:
        """Add an adapter from a folder (strict: any key or shape difference is an error and nothing stays).

        ``resize_heads``: a saved Linear task head with another number of outputs (labels) than the base model's
        head gets its own head of that size, so that one base can serve tasks with different label sets.
        ``check_base``: refuse an adapter whose recorded base-model fingerprint (peftkit files record one) differs
        from this model's. ``rename(key)``: the module path of a file key (without PEFT's prefix) in this model, for
        a file saved from a model that keeps the same modules under other names (the server's shared encoder);
        ``base_fingerprint``: the fingerprint ``check_base`` expects instead of this model's."""
        adapter_files.load(self, path, adapter_name, trainable, resize_heads, check_base, rename, base_fingerprint)

    def _remove_everywhere(self, adapter_name: str) -> None:
        """Undo a partial injection: drop the adapter from every layer and unwrap layers left empty."""
        for _, layer in self.adapter_layers():
            if adapter_name in layer.adapter_names:
                layer.delete_adapter(adapter_name)
        self._drop_empty_layers()

    def _drop_empty_layers(self) -> None:
        self._mixed_layers = None  # the set of adapter layers changes: mixed_batch walks the tree again
        for path, layer in reversed(list(self.adapter_layers())):
            if not layer.adapter_names:
                set_submodule(self.base_model, path, layer.unwrapped(merged=False))

    def mixed_batch(self, adapter_names: Sequence[str]) -> contextlib.AbstractContextManager["AdaptedModel"]:
        """Route row i of every forward inside the block through adapter ``adapter_names[i]`` (see ``peftkit.mixing``)."""
        from .mixing import mixed_batch  # imported here: this method is all of model.py that mixing concerns

        return mixed_batch(self, adapter_names)

    # ----------------------------------------------------------------------------------- training hooks
    def _training_records(self):
        for name in self._active:
            record = self.adapters[name]
            if record.trainable:
                yield record

    def regularization(self) -> torch.Tensor | None:
        """Extra loss terms of the active trainable adapters (AdaLoRA's orthogonality penalty); None if none."""
        terms = [term for r in self._training_records() if (term := r.method.regularization(r.injection)) is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def after_optimizer_step(self, step: int) -> None:
        """Call after each optimizer step (0-based), before zeroing gradients: AdaLoRA's rank budget step."""
        for record in self._training_records():
            record.method.after_optimizer_step(record.injection, step)

    def method_states(self) -> list[tuple[str, Any]]:
        """(adapter name, resumable training state) of every adapter whose method keeps one (AdaLoRA's rank
        allocator); each state has ``state_dict()`` and ``load_state_dict(tensors, plain)``."""
        return [(name, state) for name, record in self.adapters.items()
                if (state := record.method.training_state(record.injection)) is not None]

    # ------------------------------------------------------------------------------------------- helpers
    def trainable_parameters(self) -> TrainableParameters:
        return count_parameters(self)

    def targeted_modules(self, adapter_name: str = "default") -> list[str]:
        return list(self._require(adapter_name).injection.targets)

    def cast_frozen(self, dtype: torch.dtype = torch.bfloat16) -> "AdaptedModel":
        """Cast the frozen base weights (and floating buffers) to ``dtype``; trainable parameters stay as they are
        (fp32 master weights). Train under ``torch.autocast(device, dtype)`` afterwards: the adapters then compute
        in ``dtype`` and receive fp32 gradients."""
        trainable = {id(p) for p in self.parameters() if p.requires_grad}
        with torch.no_grad():
            for module in self.modules():
                for name, param in list(module.named_parameters(recurse=False)):
                    if id(param) not in trainable and param.is_floating_point():
                        param.data = param.data.to(dtype)
                for name, buffer in list(module.named_buffers(recurse=False)):
                    if buffer is not None and buffer.is_floating_point():
                        setattr(module, name, buffer.to(dtype))
        return self

    def enable_gradient_checkpointing(self, reentrant: bool = False) -> None:
        """Turn on activation checkpointing of a transformers model (non-reentrant by default).

        Reentrant checkpointing only passes gradients through if the block inputs require grad, so with a frozen
        embedding we make the embedding output require grad.
        """
        kwargs = {"use_reentrant": reentrant}
        if hasattr(self.base_model, "activation_checkpointing_enable"):  # transformers >= 5.x
            self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(self.base_model, "gradient_checkpointing_enable"):
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise TypeError(f"{type(self.base_model).__name__} is not a transformers model with activation checkpointing")
        if reentrant:
            self.base_model.enable_input_require_grads()

    def _require(self, name: str) -> AdapterRecord:
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r}; adapters: {list(self.adapters) or 'none'}")
        return self.adapters[name]

    def _warn_about_unsaved_fresh_weights(self, adapter_name: str) -> None:
        """Weights that from_pretrained initialised at random are lost on reload unless saved with the adapter."""
        base = {n: p for n, p in self.base_model.named_parameters()}
        if not any(getattr(p, "_is_hf_initialized", False) for p in base.values()):
            return  # not loaded by transformers' from_pretrained: nothing tells fresh weights apart
        adapter_ids = {id(t) for name in self.adapters for t in self._adapter_params(name)}
        saved_ids = {id(t) for t in self._adapter_params(adapter_name)}
        covered = {id(p) for path, layer in self.adapter_layers() if adapter_name in layer.adapter_names
                   and isinstance(layer, ModulesToSave) for p in layer.base_layer.parameters()}
        fresh = sorted({n.replace(".base_layer", "").rsplit(".", 1)[0] for n, p in base.items()
                        if not getattr(p, "_is_hf_initialized", False) and id(p) not in adapter_ids
                        and id(p) not in saved_ids and id(p) not in covered})
        if fresh:
            warnings.warn(
                f"module(s) {fresh} were initialised at random by from_pretrained (not in the checkpoint) and are "
                f"neither trained nor saved with adapter {adapter_name!r}: a reloaded model would get other random "
                f"weights. Add them to modules_to_save.",
                stacklevel=3,
            )

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={list(self._active)}"


def adapt(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> AdaptedModel:
    """Inject an adapter into ``model`` (any ``nn.Module``); on an ``AdaptedModel`` this adds another adapter."""
    adapted = model if isinstance(model, AdaptedModel) else AdaptedModel(model)
    try:
        adapted.add_adapter(config, adapter_name)
    except Exception:
        if adapted is not model:
            adapted.unload()  # leave the user's model as it was
        raise
    return adapted


def load_adapter(
    model: nn.Module, path: str | Path, adapter_name: str = "default", trainable: bool = False,
    resize_heads: bool = False,
) -> AdaptedModel:
    """Load an adapter folder (peftkit's or Hugging Face PEFT's) into a model or an ``AdaptedModel``."""
    adapted = model if isinstance(model, AdaptedModel) else AdaptedModel(model)
    try:
        adapted.load_adapter(path, adapter_name, trainable=trainable, resize_heads=resize_heads)
    except Exception:
        if adapted is not model:
            adapted.unload()
        raise
    return adapted
