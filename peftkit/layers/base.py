"""The common shell of every adapter layer: it wraps one module of the base model.

An adapter layer keeps the original module as ``base_layer`` and holds any number of named adapters for it.
It knows which adapters are active, whether adapters are disabled, and which are merged into the base
weights. Each concrete layer (LoRA on Linear, on Embedding, ...) adds its parameters and its forward.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn


class AdapterLayer(nn.Module):
    """Base class of the wrappers that hold adapters for one base module.

    Subclasses implement ``add_adapter``, ``adapter_tensors``, ``forward`` and, where the math allows,
    ``delta_weight`` (the change an adapter makes to ``base_layer.weight``, computed in fp32).
    """

    #: names of the ``ModuleDict``/``ParameterDict`` attributes that hold per-adapter parameters
    adapter_containers: tuple[str, ...] = ()
    #: whether the adapter can be folded into the base weights
    mergeable: bool = True
    #: whether one forward can apply a different adapter to each row of the batch (see ``mixed_refusal``)
    supports_mixed: bool = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: tuple[str, ...] = ()
        self.disabled = False
        self.merged_adapters: list[str] = []
        self.row_adapters: tuple[str | None, ...] | None = None  # set for the duration of a mixed-batch call
        self._stack_cache: tuple | None = None
        self._slots_cache: tuple | None = None

    @property
    def inner(self) -> nn.Module:
        """The original module, below any other adapter layers this one wraps (adapters of different methods
        on one module nest: e.g. BitFit's bias change around a LoRA layer)."""
        module = self.base_layer
        while isinstance(module, AdapterLayer):
            module = module.base_layer
        return module

    # ----------------------------------------------------------------------------------------------- state
    @property
    def adapter_names(self) -> list[str]:
        names: dict[str, None] = {}
        for container in self.adapter_containers:
            names.update(dict.fromkeys(getattr(self, container).keys()))
        return list(names)

    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = tuple(n for n in names if n in self.adapter_names)

    def _unmerged_active(self) -> tuple[str, ...]:
        if self.disabled:
            return ()
        return tuple(n for n in self.active_adapters if n not in self.merged_adapters)

    # ---------------------------------------------------------------------------------- mixed batches
    def mixed_refusal(self, names: Iterable[str]) -> str | None:
        """None if this layer can run a mixed batch (``row_adapters`` set) whose rows use the adapters ``names``
        of this layer (possibly none of them), else the reason why not. Layers whose adapters differ in this
        respect (LoRA: DoRA adapters do not mix) extend it."""
        return None if self.supports_mixed else f"{type(self).__name__} cannot apply different adapters to different rows"

    def row_slots(self, device: torch.device) -> torch.Tensor:
        """For each row of a mixed batch: 0 (no adapter of this layer: the base) or 1 + the adapter's index."""
        names = self.adapter_names
        key = (self.row_adapters, tuple(names), device)
        if self._slots_cache is None or self._slots_cache[0] != key:  # the same for every forward of a batch
            slot = {name: i for i, name in enumerate(names, start=1)}
            self._slots_cache = (key, torch.tensor([slot.get(n, 0) for n in self.row_adapters], device=device))
        return self._slots_cache[1]

    def check_rows(self, batch: int) -> None:
        if len(self.row_adapters) != batch:
            raise ValueError(f"adapter_names has {len(self.row_adapters)} entries for a batch of {batch} rows")

    def stacked(self, build) -> tuple:
        """Per-adapter tensors stacked along a new first dim (slot 0: zeros), cached while nothing changes: the
        same adapters, and no in-place change (``_version``) of their tensors since the stack was built."""
        names = tuple(self.adapter_names)
        cache = self._stack_cache
        if cache is not None and cache[0] == names and all(t._version == v for t, v in zip(cache[1], cache[2])):
            return cache[3]
        tensors = [t for n in names for t in self.adapter_tensors(n).values()]
        with torch.no_grad():
            value = build(names)
        self._stack_cache = (names, tensors, [t._version for t in tensors], value)
        return value

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.adapter_tensors(name).values())

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's parameters keyed by their file suffix (e.g. ``lora_A.weight``)."""
        raise NotImplementedError

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The values written to the adapter file, keyed like ``adapter_tensors`` (by default: the parameters)."""
        return self.adapter_tensors(name)

    def load_tensor(self, name: str, suffix: str, value: torch.Tensor) -> None:
        """Set a parameter from its file value (the inverse of ``saved_tensors``)."""
        param = self.adapter_tensors(name)[suffix]
        with torch.no_grad():
            param.copy_(value.to(dtype=param.dtype, device=param.device))

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge() before deleting it")
        for container in self.adapter_containers:
            holder = getattr(self, container)
            if name in holder:
                del holder[name]
        self._forget(name)
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)
        # a later adapter of the same name has new tensors: the stacks must not be reused for it
        self._stack_cache = self._slots_cache = None

    def _forget(self, name: str) -> None:
        """Drop per-adapter plain attributes (scalings, ...). Subclasses extend."""

    # ------------------------------------------------------------------------------------------- merging
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of adapter ``name`` in fp32, laid out like ``base_layer.weight``."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")

    def new_merges(self, names: Iterable[str]) -> list[str]:
        """The adapters of ``names`` that this layer holds and has not merged yet."""
        return [n for n in dict.fromkeys(names) if n in self.adapter_names and n not in self.merged_adapters]

    def propose_merge(self, names: Iterable[str], staged: Staged | None = None) -> "MergeProposal":
        """What merging ``names`` would write into the base tensors, computed but not written (``commit``).

        ``staged``: new values other layers' proposals of the same merge would already have written (by tensor id);
        a layer starts from those. The default folds ``delta_weight`` into ``base_layer.weight``."""
        if not self.mergeable:
            raise NotImplementedError(f"{type(self).__name__} adapters cannot be merged into the base weights")
        names = self.new_merges(names)
        if not names:
            return MergeProposal(self, [], [])
        owner = self.inner
        new = current(owner.weight, staged).float() + sum(self.delta_weight(n) for n in names)
        return MergeProposal(self, names, [(owner, "weight", new.to(owner.weight.dtype))])

    def merge(self, names: Iterable[str], safe: bool = False) -> None:
        names = list(names)
        already = [n for n in names if n in self.merged_adapters]
        if already:
            warnings.warn(f"adapter(s) {already} already merged; merging again changes nothing", stacklevel=3)
        proposal = self.propose_merge(names)
        if safe and proposal.non_finite():
            raise ValueError(f"merging {proposal.names} would put non-finite values into {proposal.non_finite()}; "
                             "nothing was changed")
        proposal.commit()

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._unmerge_one(self.merged_adapters.pop())

    def _unmerge_one(self, name: str) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.copy_((weight.detach().float() - self.delta_weight(name)).to(weight.dtype))

    # ----------------------------------------------------------------------------------------- unwrapping
    def unwrapped(self, merged: bool) -> nn.Module:
        """The module that replaces this wrapper on unload (``merged``: keep merged adapters in the weights)."""
        if not merged:
            self.unmerge()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={list(self.active_adapters)}, merged={self.merged_adapters}"


Staged = dict[int, torch.Tensor]  # id of a live base tensor -> the value a merge in progress would give it


def current(tensor: torch.Tensor, staged: Staged | None) -> torch.Tensor:
    """The value ``tensor`` has once the proposals staged before this one are written."""
    value = staged.get(id(tensor)) if staged else None
    return (tensor if value is None else value).detach()


@dataclass
class MergeProposal:
    """The new values merging ``names`` into ``layer`` would write; nothing changes until ``commit``.

    ``updates`` holds (module owning the parameter, parameter name, new value in the parameter's dtype): the
    owner and name, not the tensor, so that a caller may give a tied parameter's other holders their own copy
    first. ``on_commit`` records what the layer keeps besides (DoRA: the unmerged weight)."""

    layer: AdapterLayer
    names: list[str]
    updates: list[tuple[nn.Module, str, torch.Tensor]]
    on_commit: Callable[[], None] | None = None

    def targets(self) -> list[torch.Tensor]:
        return [getattr(owner, attr) for owner, attr, _ in self.updates]

    def non_finite(self) -> list[str]:
        """Names of the parameters that would receive a non-finite value (checked in their own dtype)."""
        return [f"{type(owner).__name__}.{attr}" for owner, attr, value in self.updates
                if not bool(torch.isfinite(value).all())]

    def commit(self) -> None:
        with torch.no_grad():
            for owner, attr, value in self.updates:
                getattr(owner, attr).copy_(value)
        if self.on_commit is not None:
            self.on_commit()
        self.layer.merged_adapters.extend(self.names)


class LayerRegistry:
    """Maps a base layer type to the adapter-layer class that wraps it.

    A type may be given as a class or as a dotted ``"module.QualName"`` string, so that optional layer types
    (e.g. transformers' GPT-2 ``Conv1D``) are matched without importing their library. Lookup walks the MRO,
    so subclasses of a registered type are wrapped too.
    """

    def __init__(self, method: str) -> None:
        self.method = method
        self._by_name: dict[str, type[nn.Module]] = {}

    def register(self, base_type: type | str, layer_cls: type[nn.Module]) -> None:
        self._by_name[base_type if isinstance(base_type, str) else _qualname(base_type)] = layer_cls

    def lookup(self, module: nn.Module) -> type[nn.Module] | None:
        for klass in type(module).__mro__:
            found = self._by_name.get(_qualname(klass))
            if found is not None:
                return found
        return None

    def supported(self) -> list[str]:
        return [name.rsplit(".", 1)[-1] for name in self._by_name]


def find_layer(module: nn.Module, kind: type) -> "AdapterLayer | None":
    """The adapter layer of type ``kind`` in a nest of adapter layers starting at ``module`` (or None)."""
    while isinstance(module, AdapterLayer):
        if isinstance(module, kind):
            return module
        module = module.base_layer
    return None


def logical_path(path: str) -> str:
    """A nested adapter layer's path (``x.base_layer``) as the path of the module it adapts (``x``)."""
    while path.endswith(".base_layer"):
        path = path[: -len(".base_layer")]
    return path


def _qualname(klass: type) -> str:
    return f"{klass.__module__}.{klass.__qualname__}"

