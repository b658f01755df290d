"""Per-token negative log-likelihood of a frozen output head, without the full logits tensor.

The plain causal-LM loss runs ``lm_head`` on every position and keeps (batch, length, vocabulary) logits, their
log-softmax and its gradient: at SmolLM2's 49,152-token vocabulary and B8×T256 that is three 400 MB tensors per
step, each freshly mapped from the OS (page faults on every write), and half of the positions are prompt tokens
whose loss is thrown away. Here only the positions that carry a target are scored, in row chunks of at most
``CHUNK_ELEMENTS`` logits (a buffer the allocator reuses), and because each position's loss depends on its own
hidden state only, its gradient ``(softmax - onehot) · W`` is computed in the same pass; backward just scales those
rows by the incoming per-token gradient. The head must be frozen (no ∂W): the caller falls back to the plain loss
otherwise. Math in fp32 whatever the hidden states' dtype. (Liger-Kernel's fused linear cross-entropy and torchtune's
chunked cross-entropy make the same trade on GPUs.)
"""

from __future__ import annotations

import torch

#: logits per chunk (32 MB in fp32): under glibc's largest mmap threshold, so the buffer is reused, not re-faulted
CHUNK_ELEMENTS = 1 << 23


class _HeadNll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int):
        width = hidden.shape[-1]
        flat, wanted = hidden.reshape(-1, width), targets.reshape(-1)
        rows = (wanted != ignore_index).nonzero().squeeze(1)
        picked_targets = wanted[rows]
        nll = torch.zeros(wanted.shape[0], dtype=torch.float32, device=hidden.device)
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty(rows.shape[0], width, dtype=torch.float32, device=hidden.device) if need_grad else None
        w = weight.float()
        b = None if bias is None else bias.float()
        step = max(1, CHUNK_ELEMENTS // w.shape[0])
        for start in range(0, rows.shape[0], step):
            part = slice(start, min(rows.shape[0], start + step))
            h = flat[rows[part]].float()
            logits = torch.addmm(b, h, w.t()) if b is not None else torch.mm(h, w.t())
            lse = torch.logsumexp(logits, dim=1)
            target = picked_targets[part]
            index = torch.arange(h.shape[0], device=h.device)
            nll[rows[part]] = lse - logits[index, target]
            if need_grad:  # softmax - onehot, then · W: the gradient of each position's loss w.r.t. its hidden state
                probs = logits.sub_(lse[:, None]).exp_()
                probs[index, target] -= 1.0
                torch.mm(probs, w, out=grad[part])
        if need_grad:
            ctx.save_for_backward(rows, grad)
            ctx.shape, ctx.dtype = hidden.shape, hidden.dtype
        return nll.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_nll):
        rows, grad = ctx.saved_tensors
        grad_hidden = torch.zeros(ctx.shape[:-1].numel(), ctx.shape[-1], dtype=ctx.dtype, device=grad.device)
        scale = grad_nll.reshape(-1)[rows].float()
        grad_hidden[rows] = grad.mul_(scale[:, None]).to(ctx.dtype)
        return grad_hidden.view(ctx.shape), None, None, None, None


def head_token_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                   ignore_index: int = -100) -> torch.Tensor:
    """``cross_entropy(hidden @ weightᵀ + bias, targets, reduction="none")`` in fp32, 0 where the target is
    ``ignore_index``; shape of ``targets``. ``weight`` (vocabulary, width) and ``bias`` must not need gradients."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("head_token_nll computes no gradient for the head; use the plain loss for a trainable head")
    with torch.autocast(hidden.device.type, enabled=False):
        return _HeadNll.apply(hidden, weight.detach(), None if bias is None else bias.detach(), targets, ignore_index)
