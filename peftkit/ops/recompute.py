"""Inputs that LoRA's backward needs, kept cheaply.

∂A needs the layer input x. Most of those inputs are not otherwise kept by the frozen base model, so saving them
is where LoRA's extra memory comes from. When x is the output of a LayerNorm, the LayerNorm node already keeps its
input, mean and 1/std for its own backward, and x = (input - mean) · rstd · w + b rebuilds it exactly (bit for
bit: the same float operations as the kernel) at the cost of one elementwise pass; then x is not stored at all.
GELU outputs are rebuilt the same way from the GELU node's input (an erf per element, done chunk by chunk while
the chunk is in cache: measured at +0.5% of a MiniLM step, for 150 MB less memory). Under activation
checkpointing nothing is rebuilt: the checkpoint already owns those tensors.

A rebuilt input is read through the node's documented saved-tensor attributes (``node._saved_input``), so
activation checkpointing and saved-tensor hooks see the access like any other.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

_ENABLED = {"on": True}


def rebuild_inputs(enabled: bool) -> None:
    """Turn rebuilding of layer inputs on (the default) or off (store every input: more memory, no rebuild)."""
    _ENABLED["on"] = bool(enabled)


def _layer_norm_rows(node, rows: slice, width: int) -> torch.Tensor:
    inputs = node._saved_input.reshape(-1, width)[rows]
    out = (inputs - node._saved_result1.reshape(-1, 1)[rows]).mul_(node._saved_result2.reshape(-1, 1)[rows])
    weight, bias = node._saved_weight, node._saved_bias
    if weight is not None:
        out.mul_(weight)
    if bias is not None:
        out.add_(bias)
    return out


def _layer_norm_applies(node, x: torch.Tensor) -> bool:
    return list(node._saved_normalized_shape) == [x.shape[-1]] and node._saved_input.dtype == x.dtype


def _gelu_rows(node, rows: slice, width: int) -> torch.Tensor:
    return F.gelu(node._saved_self.reshape(-1, width)[rows], approximate=node._saved_approximate)


def _gelu_applies(node, x: torch.Tensor) -> bool:
    return node._saved_self.dtype == x.dtype


#: autograd node class name -> (applies(node, x), rows(node, rows, width))
RECIPES: dict[str, tuple[Callable, Callable]] = {
    "NativeLayerNormBackward0": (_layer_norm_applies, _layer_norm_rows),
    "GeluBackward0": (_gelu_applies, _gelu_rows),
}


def _saved_tensor_hooks_active() -> bool:
    """True under activation checkpointing (or any saved-tensor hooks): the checkpoint then owns the saved
    tensors, and rebuilding x would unpack the LayerNorm's inputs a second time."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return True if top is None else top(False) is not None


class SavedInput:
    """A layer input kept for backward: the tensor itself, or a recipe to rebuild it from its graph node.

    ``source`` is the tensor whose ``grad_fn`` made x (x itself unless x was detached for the call).
    """

    def __init__(self, ctx, x: torch.Tensor, source: torch.Tensor | None = None) -> None:
        source = x if source is None else source
        self.width = x.shape[-1]
        self.rows = x.numel() // self.width
        self.node, self._rows_fn = source.grad_fn, None
        recipe = RECIPES.get(type(self.node).__name__) if self.node is not None else None
        if recipe is not None and _ENABLED["on"] and not _saved_tensor_hooks_active() and recipe[0](self.node, x):
            self._rows_fn = recipe[1]
            self.count = 0
        else:
            self.node = None
            self.count = 1
            ctx.saved_input_tensor = x.reshape(-1, self.width)  # handed to save_for_backward, then dropped

    def tensors(self, ctx) -> tuple[torch.Tensor, ...]:
        """What the caller must pass to ``ctx.save_for_backward`` (first); no reference is kept here."""
        return (ctx.__dict__.pop("saved_input_tensor"),) if self.count else ()

    def restore(self, saved: tuple[torch.Tensor, ...]) -> "RestoredInput":
        """x in backward. The result is not kept on the autograd context: holding the unpacked tensor there
        would keep it alive until the whole backward ends (under checkpointing: every layer's input)."""
        return RestoredInput(saved[0] if self.count else None, self.node, self._rows_fn, self.rows, self.width)


class RestoredInput:
    def __init__(self, x, node, rows_fn, rows: int, width: int) -> None:
        self._x, self.node, self._rows_fn, self.rows, self.width = x, node, rows_fn, rows, width

    def rows_of(self, rows: slice) -> torch.Tensor:
        """Rows of x as a (rows, width) tensor that the caller may not modify in place."""
        if self._x is not None:
            return self._x[rows]
        return self._rows_fn(self.node, rows, self.width)

    def t_times(self, g: torch.Tensor) -> torch.Tensor:
        """gᵀ x for g with one row per row of x."""
        if self._x is not None:
            return torch.mm(g.t(), self._x)
        chunk_rows = max(8, (1 << 20) // self.width)
        out = g.new_zeros(g.shape[1], self.width)
        for start in range(0, self.rows, chunk_rows):
            rows = slice(start, min(self.rows, start + chunk_rows))
            out.addmm_(g[rows].t(), self.rows_of(rows))
        return out
