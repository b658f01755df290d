"""Per-conversation causal-LM loss sums: the decoder's hidden states through ``head_token_nll`` when the model is
"decoder, then a linear head", else the plain logits path.

Whether a model is that shape is not guessed from its class: some causal LMs scale or soft-cap their logits after the
head. The first time a model is seen, its own logits for one short row (eval mode) must equal ``lm_head`` applied
to its decoder's output; the answer is remembered per model object. The loss itself is then computed in fp32.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch import nn

from ..model import AdaptedModel
from ..ops.token_loss import head_token_nll
from .causal_lm_data import IGNORE

_AGREES: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def conversation_sums(model: nn.Module, batch: dict, **kwargs) -> torch.Tensor:
    """Per row: [summed NLL of the labelled tokens (teacher-forced), their count]."""
    labels = batch["labels"][:, 1:]
    split = None if kwargs else _decoder_and_head(model)
    if split is None:
        nll = _plain_nll(model, batch, **kwargs)
    else:
        decoder, head = split
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)[0]
        # position t predicts token t+1; the last position predicts nothing (a target of IGNORE). Scoring the whole
        # hidden tensor with shifted targets avoids copying hidden[:, :-1]
        targets = torch.cat([labels, labels.new_full((labels.shape[0], 1), IGNORE)], dim=1)
        nll = head_token_nll(hidden, head.weight, head.bias, targets, IGNORE)[:, :-1]
    return torch.stack([nll.sum(1), (labels != IGNORE).sum(1).to(nll.dtype)], dim=1)


def _plain_nll(model: nn.Module, batch: dict, **kwargs) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits
    return nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["labels"][:, 1:],
                                       ignore_index=IGNORE, reduction="none")


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder, lm_head) of a model whose logits are ``lm_head(decoder(...))``, else None."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return None  # DDP/FSDP hooks run on the wrapper's forward: calling the parts directly would bypass them
    hf = model.base_model if isinstance(model, AdaptedModel) else model
    if not (hasattr(hf, "get_decoder") and hasattr(hf, "get_output_embeddings")):
        return None
    decoder, head = hf.get_decoder(), hf.get_output_embeddings()
    if decoder is None or decoder is hf or type(head) is not nn.Linear:
        return None
    if hf not in _AGREES:
        _AGREES[hf] = _paths_agree(model, decoder, head)
    return (decoder, head) if _AGREES[hf] else None


def _paths_agree(model: nn.Module, decoder: nn.Module, head: nn.Linear) -> bool:
    # the model's own logits against lm_head on the decoder's output, computed by the same modules in the same
    # dtype (and autocast): equal unless the model does something after the head
    ids = torch.arange(3, 11, device=head.weight.device).remainder(head.out_features)[None]
    mask = torch.ones_like(ids)
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            ours = head(decoder(input_ids=ids, attention_mask=mask, use_cache=False)[0]).float()
        agree = logits.shape == ours.shape and bool(torch.allclose(logits, ours, rtol=1e-4, atol=1e-4))
    except Exception as error:  # noqa: BLE001 - any failure means: use the plain path
        print(f"note: the chunked causal-LM loss is off for this model ({error}); using the plain loss",
              file=sys.stderr, flush=True)
        return False
    finally:
        for module, training in modes:
            module.training = training
    if not agree:
        print("note: this model's logits are not lm_head(decoder(...)) (scaled or soft-capped?); using the plain "
              "causal-LM loss", file=sys.stderr, flush=True)
    return agree
