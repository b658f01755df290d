"""Saving and loading the adapters of an ``AdaptedModel`` (the methods of the same names delegate here).

The file format itself (keys, atomic writes, strict reads) is ``io``'s; this module joins it with the method's
paired file hooks (``export_tensors`` when saving, ``import_tensors`` when loading) and the base-model fingerprint.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import fingerprint, io
from .layers.modules_to_save import ModulesToSave
from .methods import method_for_peft_type
from .names import check_adapter_name
from .targets import reading_file
from .version import __version__

if TYPE_CHECKING:
    from .model import AdaptedModel


def save(adapted: "AdaptedModel", path: str | Path, adapter_name: str | None = None) -> None:
    names = [adapter_name] if adapter_name is not None else list(adapted.adapters)
    for name in names:
        record = adapted._require(name)
        if name in adapted.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge() before saving so that its weights are exact")
        directory = Path(path) if name == "default" else Path(path) / name
        tensors = record.method.export_tensors(io.file_state(adapted.base_model, name), record.config, record.injection)
        config = record.method.file_config(adapted.base_model, record.config, record.injection)
        metadata = {"peftkit_version": __version__, "adapter_name": name}
        if adapted.base_fingerprint:
            metadata["base_fingerprint"] = adapted.base_fingerprint
        io.write_adapter(directory, io.add_prefix(tensors), config, metadata)


def load(adapted: "AdaptedModel", path: str | Path, adapter_name: str, trainable: bool, resize_heads: bool,
         check_base: bool, rename=None, base_fingerprint: str | None = None) -> None:
    check_adapter_name(adapter_name, adapted.adapters)
    directory = io.find_adapter_dir(path, adapter_name)
    source = str(directory)
    values = io.read_config(directory)
    found, metadata = io.read_tensors(directory)
    tensors = io.strip_prefix(found, source)
    if rename is not None:
        tensors = {rename(key): value for key, value in tensors.items()}
    recorded = metadata.get("base_fingerprint")
    mine = base_fingerprint or adapted.base_fingerprint
    if check_base and recorded and mine:
        if not fingerprint.comparable(recorded):
            warnings.warn(f"{source}: its base fingerprint was recorded by an older peftkit and cannot be compared "
                          "with this model's; the base model is not checked", stacklevel=3)
        elif recorded != mine:
            raise io.AdapterFileError(
                f"{source}: this adapter was saved from another base model (base fingerprint "
                f"{metadata['base_fingerprint']}, this model {mine}): same architecture or not, its weights differ"
            )
    method = method_for_peft_type(values["peft_type"], source)
    config = method.config_from_file(values, source)
    was_active = list(adapted.active_adapters)
    try:
        with reading_file(source):  # a file's target list is read as PEFT reads it
            adapted.add_adapter(config, adapter_name, trainable=trainable)
        record = adapted.adapters[adapter_name]
        if resize_heads:
            _resize_heads(adapted, adapter_name, tensors)
        tensors = record.method.import_tensors(tensors, record.config, record.injection)
        io.check_and_load(adapted.base_model, adapter_name, tensors, source)
    except Exception:
        if adapter_name in adapted.adapters:
            adapted.delete_adapter(adapter_name)  # also unwraps the layers it leaves empty
            if was_active:
                adapted.set_adapter(was_active)
        else:
            adapted._remove_everywhere(adapter_name)
        raise


def _resize_heads(adapted: "AdaptedModel", adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
    """A saved Linear head with another number of outputs than the model's gets a head of its own size."""
    for path, layer in adapted.adapter_layers():
        if not isinstance(layer, ModulesToSave) or adapter_name not in layer.modules_to_save:
            continue
        head = layer.modules_to_save[adapter_name]
        saved = tensors.get(f"{path}.weight")
        if isinstance(head, nn.Linear) and saved is not None and saved.dim() == 2 \
                and saved.shape[1] == head.in_features and saved.shape[0] != head.out_features:
            resized = nn.Linear(head.in_features, saved.shape[0], bias=head.bias is not None,
                                device=head.weight.device, dtype=head.weight.dtype)
            resized.requires_grad_(head.weight.requires_grad)
            resized.train(head.training)
            layer.modules_to_save[adapter_name] = resized
