"""A fingerprint of a frozen base model, recorded in adapter files so that loading can refuse another base.

It hashes every parameter's name and shape and *every value*, rounded to bf16. Why bf16: ``cast_frozen`` casts
the frozen base to bf16 for training, and the fingerprint of that cast model must equal the fp32 original's;
rounding fp32 -> bf16 is deterministic (round to nearest even), so both hash the same bytes.

What bf16 rounding can hide: a value that moves by less than a bf16 step keeps its bf16 pattern unless it crosses
a rounding boundary, which happens with probability about (its change) / (the bf16 step at its magnitude). One
Adam step moves every trained value by about the learning rate (2e-5); for a weight of magnitude ~0.02 the bf16
step is 2^-13 (1.2e-4), so about one value in six changes its pattern per step, and near zero (biases, small
weights) nearly all do. A fine-tuned variant changes thousands of values, so it cannot keep the fingerprint; only
a change of a handful of values by much less than a bf16 step could go unnoticed.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

#: prefix of the recorded value; files without it were written with an older scheme that cannot be compared
SCHEME = "v2:"
_CHUNK = 1 << 24  # values hashed per slice: bounds the temporary bf16 copy of a large embedding matrix


def base_fingerprint(base_model: nn.Module) -> str:
    """A short hash of the frozen base model (``SCHEME`` + 24 hex digits). Task heads (which a new task
    initialises at random), ``modules_to_save`` copies and adapter parameters are left out."""
    from .layers.base import AdapterLayer
    from .layers.modules_to_save import ModulesToSave
    from .methods.common import HEAD_NAMES

    # the trained copies of modules_to_save, not the frozen original they wrap (it is part of the base)
    skip = {id(p) for m in base_model.modules() if isinstance(m, ModulesToSave) for p in m.modules_to_save.parameters()}
    skip |= {id(t) for m in base_model.modules() if isinstance(m, AdapterLayer)
             for n in m.adapter_names for t in m.adapter_tensors(n).values()}
    digest = hashlib.sha256()
    for name, param in base_model.named_parameters():
        if id(param) in skip or name.split(".")[0] in HEAD_NAMES:
            continue
        if type(param.data) is not torch.Tensor and hasattr(param, "full_tensor"):
            raise RuntimeError(f"{name} is sharded (FSDP): take the base fingerprint before sharding the model")
        if param.device.type == "meta":
            raise RuntimeError(f"{name} is on the meta device: there are no values to fingerprint")
        digest.update(f"{name.replace('.base_layer', '')}:{tuple(param.shape)};".encode())
        _hash_values(digest, param.detach())
    return SCHEME + digest.hexdigest()[:24]


def _hash_values(digest, tensor: torch.Tensor) -> None:
    flat = tensor.reshape(-1)
    for part in flat.split(_CHUNK):
        if part.is_floating_point():
            part = part.to(torch.bfloat16).view(torch.int16)  # numpy has no bf16: hash the raw 16-bit patterns
        digest.update(part.contiguous().cpu().numpy())  # the buffer itself: no bytes copy


def comparable(recorded: str) -> bool:
    """Whether a recorded fingerprint was computed with this scheme (older peftkit files used another)."""
    return recorded.startswith(SCHEME)
