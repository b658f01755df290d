"""LoRA on a linear layer as fused autograd functions.

The plain formulation, ``base(x) + s · B(A(dropout(x)))`` through generic autograd, makes several extra
passes over activation-sized tensors per layer (a dropped-out copy of x, a separate output, an add, a separate
input gradient and another add) and saves a dropped-out copy of x per layer. On a CPU those passes, and the
page faults of the fresh buffers they need, cost more than the LoRA matmuls themselves. Here:

- without dropout (or in eval mode), W' = W + s·B A is formed per call (an out×in matrix, tiny next to the
  activations) and the layer runs ONE matmul forward and ONE backward for x, like the frozen base; ∂A and ∂B
  come from thin matmuls (g·B is one more, thin, pass over the output gradient);
- with dropout, the up-projection is the "bias" that the base matmul accumulates onto, and the LoRA part of
  ∂x is added chunk-wise into the base ∂x, so no activation-sized temporary exists;
- q, k and v read the same x: with ``shared_dropout_mask`` (opt-in) their down-projections run as one matmul
  with one dropout mask (``lora_down``);
- the input x kept for ∂A is not stored when the autograd graph can rebuild it exactly and cheaply (a
  LayerNorm output, from the LayerNorm's own saved input and statistics), and masks are kept as bits.

All functions take the base weight as stored: ``transposed=True`` is GPT-2's Conv1D layout (in, out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .chunks import row_chunks
from .dropout import KeepMask, effective_p, keep_mask
from .recompute import SavedInput

#: rows per chunk keep a chunk's temporaries near this many elements: cache-sized, and reused by the allocator
CHUNK_ELEMENTS = 1 << 20


def _chunks(rows: int, width: int):
    return row_chunks(rows, width, CHUNK_ELEMENTS, align=8)  # multiples of 8 rows: byte-aligned packed masks


def _as_in_out(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The base weight as an (in, out) matrix, so that y = x @ it."""
    return weight if transposed else weight.t()


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _bias_grad(g: torch.Tensor, bias: torch.Tensor | None, needed: bool) -> torch.Tensor | None:
    return g.sum(0).to(bias.dtype) if needed and bias is not None else None


def _times_B(g: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """g @ B for B (out, r): as g @ (Bᵀ)ᵀ with a contiguous Bᵀ, which MKL runs about 2x faster on the CPU."""
    return F.linear(g, B.t().contiguous())


def _grad_x_and_gB(g: torch.Tensor, w_io: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g Wᵀ, g B): the base's input gradient and the LoRA up-projection's, two matmuls over g."""
    return torch.mm(g, w_io.t()), _times_B(g, B)


def _merged_in_out(weight, A, B, scaling, transposed):
    delta = torch.mm(B, A).mul_(scaling).to(weight.dtype)  # (out, in)
    return weight + delta.t() if transposed else (weight + delta).t()


# ------------------------------------------------------------------------------------ no dropout: merged
class _MergedLora(torch.autograd.Function):
    """y = x (W + s·BA)ᵀ + b, with ∂A, ∂B from thin matmuls (never the full ∂W).

    W' is formed in forward and again in backward rather than saved: it is as large as the base weight.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling, transposed):
        x2 = _flat(x)
        w_io = _merged_in_out(weight, A, B, scaling, transposed)
        y = torch.addmm(bias, x2, w_io) if bias is not None else torch.mm(x2, w_io)
        if isinstance(ctx, _NoCtx):
            return y.view(*x.shape[:-1], y.shape[-1])
        h = torch.mm(x2, A.t())  # x is still in cache here; (tokens, r) is small to keep
        ctx.x = SavedInput(ctx, x)
        ctx.save_for_backward(*ctx.x.tensors(ctx), h, weight, bias, A, B)
        ctx.scaling, ctx.transposed, ctx.x_shape = scaling, transposed, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        saved = ctx.saved_tensors
        x, (h, weight, bias, A, B) = ctx.x.restore(saved), saved[-5:]
        g = _flat(grad_y)
        need_x, _, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        grad_x = grad_A = grad_B = None
        if need_x:
            w_io = _merged_in_out(weight, A, B, ctx.scaling, ctx.transposed)
            grad_x, gB = _grad_x_and_gB(g, w_io, B)
            grad_x = grad_x.view(ctx.x_shape)
        else:
            gB = _times_B(g, B)
        if need_A:
            grad_A = x.t_times(gB).mul_(ctx.scaling)
        if need_B:
            grad_B = torch.mm(h.t(), g).t().mul_(ctx.scaling)
        return grad_x, None, _bias_grad(g, bias, need_b), grad_A, grad_B, None, None


def merged_lora_linear(x, weight, bias, A, B, scaling: float, transposed: bool = False) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return _MergedLora.forward(_NoCtx(), x, weight, bias, A, B, scaling, transposed)
    return _MergedLora.apply(x, weight, bias, A, B, scaling, transposed)


# --------------------------------------------------------------------------------- dropout: down and up
class _LoraDown(torch.autograd.Function):
    """h = (x ⊙ keep / (1-p)) [A_1; A_2; ...]ᵀ. Gradients go to the A's only: ∂x is added by ``_BaseUp``."""

    @staticmethod
    def forward(ctx, x, source, keep: KeepMask, scale, *As):
        A = torch.cat(As) if len(As) > 1 else As[0]
        x2 = _flat(x)
        A_t = (A * scale).t()
        h = x2.new_empty(x2.shape[0], A.shape[0])
        width = x2.shape[1]
        for rows in _chunks(*x2.shape):
            torch.mm(x2[rows] * keep.rows(rows, width, x2.dtype), A_t, out=h[rows])
        if not isinstance(ctx, _NoCtx):
            ctx.x = SavedInput(ctx, x, source)
            ctx.save_for_backward(*ctx.x.tensors(ctx))
            ctx.keep, ctx.scale, ctx.splits = keep, scale, [a.shape[0] for a in As]
        return h.view(*x.shape[:-1], A.shape[0])

    @staticmethod
    def backward(ctx, grad_h):
        x = ctx.x.restore(ctx.saved_tensors)
        g = _flat(grad_h)
        grad_A = g.new_zeros(g.shape[1], x.width)
        for rows in _chunks(x.rows, x.width):
            grad_A.addmm_(g[rows].t(), x.rows_of(rows) * ctx.keep.rows(rows, x.width, g.dtype))
        grad_A.mul_(ctx.scale)
        return (None, None, None, None, *grad_A.split(ctx.splits))


class _BaseUp(torch.autograd.Function):
    """y = x Wᵀ + b + s·h Bᵀ, where h came from ``_LoraDown``; backward adds the masked LoRA part of ∂x."""

    @staticmethod
    def forward(ctx, x, weight, bias, h, B, A, keep: KeepMask, scaling, scale, transposed):
        x2, h2 = _flat(x), _flat(h)
        start = torch.addmm(bias, h2, B.t(), alpha=scaling) if bias is not None else torch.mm(h2, B.t()).mul_(scaling)
        y = start.addmm_(x2, _as_in_out(weight, transposed))
        if not isinstance(ctx, _NoCtx):
            ctx.save_for_backward(weight, bias, h, B, A)
            ctx.keep, ctx.scaling, ctx.scale, ctx.transposed, ctx.x_shape = keep, scaling, scale, transposed, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        weight, bias, h, B, A = ctx.saved_tensors
        g = _flat(grad_y)
        need_x, _, need_b, need_h, need_B = ctx.needs_input_grad[:5]
        grad_x = None
        if need_x:
            grad_x, gB = _grad_x_and_gB(g, _as_in_out(weight, ctx.transposed), B)
            gB = gB.mul(ctx.scaling)  # ∂h
            A_scaled = A * ctx.scale
            width = grad_x.shape[1]
            for rows in _chunks(*grad_x.shape):
                grad_x[rows].addcmul_(torch.mm(gB[rows], A_scaled), ctx.keep.rows(rows, width, grad_x.dtype))
            grad_x = grad_x.view(ctx.x_shape)
        else:
            gB = _times_B(g, B).mul_(ctx.scaling)
        grad_B = torch.mm(_flat(h).t(), g).t().mul_(ctx.scaling) if need_B else None
        return (grad_x, None, _bias_grad(g, bias, need_b), gB.view(h.shape) if need_h else None, grad_B,
                None, None, None, None, None)


def dropout_keep(x: torch.Tensor, p: float) -> tuple[KeepMask, float]:
    """A keep-mask with one row per token of x, and the matching 1/(1-p) rescale."""
    return keep_mask((x.numel() // x.shape[-1], x.shape[-1]), p, x.device), 1.0 / (1.0 - effective_p(p))


def lora_down(x: torch.Tensor, keep: KeepMask, scale: float, *As: torch.Tensor) -> torch.Tensor:
    """Down-projections of one or more adapters reading the same x, with one shared dropout mask."""
    if not torch.is_grad_enabled():
        return _LoraDown.forward(_NoCtx(), x, None, keep, scale, *As)
    # x goes in detached (its gradient is produced by _BaseUp); `source` lets x be rebuilt from its graph node
    return _LoraDown.apply(x.detach(), x, keep, scale, *As)


def base_up(x, weight, bias, h, B, A, keep: KeepMask, scaling: float, scale: float, transposed: bool = False):
    if not torch.is_grad_enabled():
        return _BaseUp.forward(_NoCtx(), x, weight, bias, h, B, A, keep, scaling, scale, transposed)
    return _BaseUp.apply(x, weight, bias, h, B, A, keep, scaling, scale, transposed)


class _NoCtx:
    """Stands in for the autograd context when a forward runs without autograd."""

    def save_for_backward(self, *tensors):
        pass
