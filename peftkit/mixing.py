"""Mixed-adapter batches: row i of every forward inside the block goes through adapter ``adapter_names[i]``.

The routing only: each adapter layer applies the rows itself (``row_adapters``) and answers itself whether the
adapters of a batch can be mixed (``AdapterLayer.mixed_refusal``); nothing here knows a method or a layer type.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:
    from .layers.base import AdapterLayer
    from .model import AdaptedModel

BASE = "base"  # in a mixed batch: the plain base model


def _layers(model: "AdaptedModel") -> list[tuple[str, "AdapterLayer"]]:
    """The model's adapter layers, cached on the model while its set of adapters stays the same (walking the
    module tree costs more than a mixed forward's LoRA math); the model drops the cache when layers change."""
    key = tuple(model.adapters)
    cached = getattr(model, "_mixed_layers", None)
    if cached is None or cached[0] != key:
        model._mixed_layers = cached = (key, list(model.adapter_layers()))
    return cached[1]


@contextlib.contextmanager
def mixed_batch(model: "AdaptedModel", adapter_names: Sequence[str]) -> Iterator["AdaptedModel"]:
    """Route row i of every forward inside the block through adapter ``adapter_names[i]`` (``"base"``: none). A
    batch whose rows all name one adapter runs the ordinary single-adapter path (any method, fused kernels
    included)."""
    names = list(adapter_names)
    unknown = sorted({n for n in names if n != BASE and n not in model.adapters})
    if unknown:
        raise KeyError(f"unknown adapter(s) {unknown}; adapters: {list(model.adapters) or 'none'} (or 'base')")
    if model.training:
        raise RuntimeError("mixed-adapter batches are for inference: call .eval() first")
    if model.merged_adapters:
        raise RuntimeError(f"adapters {model.merged_adapters} are merged: unmerge() before running mixed batches")
    layers = _layers(model)
    if len(set(names)) == 1:
        only = names[0]
        saved = [(layer, layer.active_adapters) for _, layer in layers]
        for _, layer in layers:
            layer.set_active([] if only == BASE else [only])
        try:
            yield model
        finally:
            for layer, active in saved:
                layer.active_adapters = active
        return
    wanted = set(names) - {BASE}
    routed, idle = [], []
    for path, layer in layers:
        held = [n for n in layer.adapter_names if n in wanted]
        refusal = layer.mixed_refusal(held)
        if refusal is None:
            routed.append(layer)
        elif held:
            raise NotImplementedError(f"module {path!r}: {refusal}; run those adapters one batch at a time (set_adapter)")
        else:  # cannot mix, holds none of the batch's adapters: it must not apply its active ones to any row
            idle.append((layer, layer.active_adapters))
    row_names = tuple(None if n == BASE else n for n in names)
    for layer, _ in idle:
        layer.active_adapters = ()
    for layer in routed:
        layer.row_adapters = row_names
    try:
        yield model
    finally:
        for layer in routed:
            layer.row_adapters = None
        for layer, active in idle:
            layer.active_adapters = active
