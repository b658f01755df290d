"""Per-token negative log-likelihood of an output head, without the full logits tensor.

The plain causal-LM loss runs ``lm_head`` on every position and keeps (batch, length, vocabulary) logits, their
log-softmax and its gradient: at SmolLM2's 49,152-token vocabulary and B8×T256 that is three 400 MB tensors per
step, and half of the positions are prompt tokens
whose loss is thrown away. Here only the positions that carry a target are scored, in row chunks of at most
``CHUNK_ELEMENTS`` logits (a buffer the allocator reuses), and because each position's loss depends on its own
hidden state only, with a frozen head its gradient ``(softmax - onehot) · W`` is computed in the same pass and
backward just scales those rows by the incoming per-token gradient. A trainable head (full fine-tuning) instead keeps each position's
log-sum-exp and recomputes the chunk's logits once in backward for ∂hidden, ∂W and ∂b. Math in fp32 whatever the
hidden states' dtype. (Liger-Kernel's fused linear cross-entropy and torchtune's
chunked cross-entropy make the same trade on GPUs.)
"""

from __future__ import annotations

import torch

from .chunks import row_chunks

#: logits per chunk (32 MB in fp32): under glibc's largest mmap threshold, so the buffer is reused, not re-faulted
CHUNK_ELEMENTS = 1 << 23


class _HeadNll(torch.autograd.Function):
    """Frozen head: each position's ∂hidden is computed in forward, backward scales rows. Trainable head: forward
    keeps each position's log-sum-exp, backward recomputes the chunk's logits once for ∂hidden, ∂W and ∂b."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int):
        width = hidden.shape[-1]
        flat, wanted = hidden.reshape(-1, width), targets.reshape(-1)
        rows = (wanted != ignore_index).nonzero().squeeze(1)
        picked = wanted[rows]
        nll = torch.zeros(wanted.shape[0], dtype=torch.float32, device=hidden.device)
        need_h = ctx.needs_input_grad[0]
        need_head = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        early = need_h and not need_head  # ∂hidden now, while the chunk's logits exist
        grad = torch.empty(rows.shape[0], width, dtype=torch.float32, device=hidden.device) if early else None
        lse_all = torch.empty(rows.shape[0], dtype=torch.float32, device=hidden.device) if need_head else None
        w, b = _fp32(weight), _fp32(bias)
        for part in row_chunks(rows.shape[0], w.shape[0], CHUNK_ELEMENTS):
            logits = _logits(flat[rows[part]], w, b)
            lse = torch.logsumexp(logits, dim=1)
            index = torch.arange(logits.shape[0], device=logits.device)
            nll[rows[part]] = lse - logits[index, picked[part]]
            if need_head:
                lse_all[part] = lse
            if early:  # softmax - onehot, then · W: the gradient of each position's loss w.r.t. its hidden state
                probs = logits.sub_(lse[:, None]).exp_()
                probs[index, picked[part]] -= 1.0
                torch.mm(probs, w, out=grad[part])
        if early:
            ctx.save_for_backward(rows, grad)
        elif need_head:
            ctx.save_for_backward(rows, hidden, weight, bias, picked, lse_all)
        ctx.need_head, ctx.shape, ctx.dtype = need_head, hidden.shape, hidden.dtype
        return nll.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_nll):
        grad_hidden = grad_weight = grad_bias = None
        if not ctx.need_head:
            rows, grad = ctx.saved_tensors
            scale = grad_nll.reshape(-1)[rows].float()
            grad_hidden = _scatter_rows(grad * scale[:, None], rows, ctx)  # saved grad kept: retain_graph
            return grad_hidden, None, None, None, None
        rows, hidden, weight, bias, picked, lse_all = ctx.saved_tensors
        flat = hidden.reshape(-1, hidden.shape[-1])
        w, b = _fp32(weight), _fp32(bias)
        scale = grad_nll.reshape(-1)[rows].float()
        grad = torch.empty(rows.shape[0], w.shape[1], dtype=torch.float32, device=w.device) \
            if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(b) if b is not None and ctx.needs_input_grad[2] else None
        for part in row_chunks(rows.shape[0], w.shape[0], CHUNK_ELEMENTS):
            h = flat[rows[part]].float()
            probs = _logits(h, w, b).sub_(lse_all[part, None]).exp_()
            index = torch.arange(probs.shape[0], device=probs.device)
            probs[index, picked[part]] -= 1.0
            probs.mul_(scale[part, None])
            if grad is not None:
                torch.mm(probs, w, out=grad[part])
            if grad_w is not None:
                grad_w.addmm_(probs.t(), h)
            if grad_b is not None:
                grad_b += probs.sum(0)
        if grad is not None:
            grad_hidden = _scatter_rows(grad, rows, ctx)
        if grad_w is not None:
            grad_weight = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_bias = grad_b.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float()


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    h = h.float()
    return torch.addmm(b, h, w.t()) if b is not None else torch.mm(h, w.t())


def _scatter_rows(grad: torch.Tensor, rows: torch.Tensor, ctx) -> torch.Tensor:
    out = torch.zeros(ctx.shape[:-1].numel(), ctx.shape[-1], dtype=ctx.dtype, device=grad.device)
    out[rows] = grad.to(ctx.dtype)
    return out.view(ctx.shape)


def head_token_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                   ignore_index: int = -100) -> torch.Tensor:
    """``cross_entropy(hidden @ weightᵀ + bias, targets, reduction="none")`` in fp32, 0 where the target is
    ``ignore_index``; shape of ``targets``. A trainable head (``weight``/``bias`` requiring grad) gets its
    gradients too, at the cost of recomputing each chunk's logits once in backward."""
    with torch.autocast(hidden.device.type, enabled=False):
        return _HeadNll.apply(hidden, weight, bias, targets, ignore_index)
