"""Mixed batches on LoRA Linear/Conv1D layers: row i of the batch gets adapter ``layer.row_adapters[i]``.

Without gradients and with few tokens a row (decoding) the rows are grouped by adapter (``RowGroups``, cached per layer while the
rows' adapters and the adapters' tensors stay the same): one gather of the input rows into equal-size groups, two
batched matmuls against the stacked factors of the adapters in the batch, one scatter-add into the base output.
Each row costs its own adapter's rank only, and no per-row copy of the factors is made (as Punica's / S-LoRA's
grouped kernels do). Otherwise (gradients, or long sequences, where copying the input costs more than copying
each row's factors) the factors are gathered per row from a stack of all the layer's adapters
(cached by ``AdapterLayer.stacked``) and applied with batched matmuls. Which adapters may join such a batch is the
layer's answer (``mixed_refusal``: plain LoRA mixes, DoRA does not); ``peftkit.mixing`` routes the rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .linear import LoraLinear


def stack_factors(layer: "LoraLinear", names: tuple[str, ...]) -> tuple[torch.Tensor, int]:
    """One row per adapter slot holding its A (r_max, in) and (s·B)ᵀ (r_max, out), flattened side by side so
    that one lookup gathers both. Slot 0 (no adapter) and the padding of smaller ranks are zeros."""
    r_max = max((layer.r[n] for n in names), default=1)
    dtype = layer.lora_A[names[0]].weight.dtype if names else torch.float32
    A_all = torch.zeros(len(names) + 1, r_max, layer.in_features, dtype=dtype)
    Bt_all = torch.zeros(len(names) + 1, r_max, layer.out_features, dtype=dtype)
    for slot, name in enumerate(names, start=1):
        r = layer.r[name]
        A_all[slot, :r] = layer.lora_A[name].weight
        Bt_all[slot, :r] = (layer.lora_B[name].weight * layer.scaling[name]).t()
    both = torch.cat([A_all.flatten(1), Bt_all.flatten(1)], dim=1)
    return both.to(layer.base_layer.weight.device), r_max


class RowGroups:
    """The rows of a mixed batch grouped by adapter, and the stacked factors of those adapters.

    Group k holds the rows of adapter ``names[k]`` (None: rows this layer applies no adapter to; its factors are
    zero), padded to the largest group by repeating its first row; ``back`` picks each row's result out of the
    grouped layout (padding is computed but never read). ``A`` is (groups, in, r_max), ``Bt`` is (groups, r_max,
    out) with the scaling folded in; smaller ranks are zero-padded."""

    __slots__ = ("rows", "names", "tensors", "versions", "scalings", "gather", "back", "size", "A", "Bt")

    def __init__(self, layer: "LoraLinear", rows: tuple[str | None, ...]) -> None:
        members: dict[str | None, list[int]] = {}
        for i, name in enumerate(rows):
            members.setdefault(name if name in layer.lora_A else None, []).append(i)
        self.rows, self.names = rows, tuple(members)
        adapters = [n for n in self.names if n is not None]
        self.tensors = [t for n in adapters for t in _factors(layer, n)]
        self.versions = [t._version for t in self.tensors]
        self.scalings = [layer.scaling[n] for n in adapters]
        self.size = max((len(m) for m in members.values()), default=0)  # 0: an empty batch
        gather, back = [], [0] * len(rows)
        for rows_of in members.values():
            for k, i in enumerate(rows_of):
                back[i] = len(gather) + k
            gather += rows_of + rows_of[:1] * (self.size - len(rows_of))
        device = layer.base_layer.weight.device
        self.gather = torch.tensor(gather, dtype=torch.long, device=device)
        self.back = torch.tensor(back, dtype=torch.long, device=device)
        r_max = max((layer.r[n] for n in adapters), default=1)
        dtype = layer.lora_A[adapters[0]].weight.dtype if adapters else torch.float32
        with torch.no_grad():
            A = torch.zeros(len(self.names), layer.in_features, r_max, dtype=dtype, device=device)
            Bt = torch.zeros(len(self.names), r_max, layer.out_features, dtype=dtype, device=device)
            for k, name in enumerate(self.names):
                if name is not None:
                    r = layer.r[name]
                    A[k, :, :r] = layer.lora_A[name].weight.t()
                    Bt[k, :r] = (layer.lora_B[name].weight * layer.scaling[name]).t()
        self.A, self.Bt = A, Bt

    @property
    def any_adapter(self) -> bool:
        return bool(self.tensors)

    def describes(self, layer: "LoraLinear") -> bool:
        """Whether the layer's rows and adapters are still those the groups were made for."""
        adapters = [n for n in self.names if n is not None]
        return (
            layer.row_adapters == self.rows
            and all(a is b for a, b in zip(self.tensors, (t for n in adapters for t in _factors(layer, n))))
            and all(t._version == v for t, v in zip(self.tensors, self.versions))
            and [layer.scaling.get(n) for n in adapters] == self.scalings
        )

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """out[i] += s·B A x[i] with row i's adapter, in place; x is (rows, tokens, in), out (rows, tokens, out)."""
        groups, tokens = len(self.names), x.shape[1]
        grouped = x.index_select(0, self.gather).view(groups, self.size * tokens, x.shape[-1])
        delta = torch.bmm(torch.bmm(grouped, self.A), self.Bt)
        out.add_(delta.view(groups * self.size, tokens, -1).index_select(0, self.back))


def _factors(layer: "LoraLinear", name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of an adapter, read without nn.Module's attribute lookup (this runs for every layer at every step)."""
    return (layer._modules["lora_A"]._modules[name]._parameters["weight"],
            layer._modules["lora_B"]._modules[name]._parameters["weight"])


def row_groups(layer: "LoraLinear") -> RowGroups:
    groups = layer.__dict__.get("_row_groups")
    if groups is None or not groups.describes(layer):
        groups = layer._row_groups = RowGroups(layer, layer.row_adapters)
    return groups


def mixed_lora_forward(layer: "LoraLinear", x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """base(x) plus, for each row, s·B A x of that row's adapter (nothing for rows without one)."""
    layer.check_rows(x.shape[0])
    result = layer.base_layer(x, *args, **kwargs)
    if layer.disabled:
        return result
    # grouping copies the input and the delta (2·tokens values a row per feature), gathering copies each row's
    # factors (r a row per feature): grouping pays for decoding (one token a row), not for long sequences
    tokens = x.numel() // max(1, x.shape[0] * x.shape[-1])  # (an empty batch must not divide by zero)
    if not torch.is_grad_enabled() and 2 * tokens <= max(layer.r.values(), default=0):
        groups = row_groups(layer)
        if not groups.any_adapter:
            return result
        if x.dtype == groups.A.dtype == result.dtype:
            groups.add_to(result.view(result.shape[0], -1, result.shape[-1]), x.reshape(x.shape[0], -1, x.shape[-1]))
            return result
    slots = layer.row_slots(x.device)
    if not bool(slots.any()):
        return result
    both, r = layer.stacked(lambda names: stack_factors(layer, names))
    rows = torch.nn.functional.embedding(slots, both)  # (batch, in·r + r·out): one gather for A and B
    split = layer.in_features * r
    A = rows[:, :split].view(-1, r, layer.in_features).to(x.dtype)
    Bt = rows[:, split:].view(-1, r, layer.out_features).to(result.dtype)
    # A·xᵀ (batch, r, tokens) runs several times faster on CPU than x·Aᵀ for a small rank
    h = torch.bmm(A, x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)).transpose(1, 2)  # (batch, tokens, r)
    out = result.view(result.shape[0], -1, result.shape[-1])
    if torch.is_grad_enabled() and (out.requires_grad or h.requires_grad):
        return torch.baddbmm(out, h, Bt).view(result.shape)
    out.baddbmm_(h, Bt)  # in place: no second pass over the output
    return result
