"""Merging adapters into the base weights as one transaction, and untying tied weights for ``merge_and_unload``.

Every adapter layer proposes the values it would write (``AdapterLayer.propose_merge``); the plan checks all of
them (mergeable, finite when ``safe``, tied weights) and only then writes them: on any refusal nothing changed.

Tied weights (GPT-2's ``wte`` and ``lm_head``, LLaMA with ``tie_word_embeddings``) are one parameter used by two
modules. Merging an Embedding adapter into it in place would change the output layer too, so the merged model
would no longer compute what the adapted one did. ``merge_and_unload`` therefore unties: the other holders get
their own copy of the original weight, the adapter goes into the embedding only, and a transformers model's
config says ``tie_word_embeddings: false`` so that ``from_pretrained`` of the saved model does not tie again.
A plain ``merge()`` (which ``unmerge()`` must undo) refuses instead.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .layers.base import AdapterLayer, MergeProposal, logical_path
from .tree import set_submodule


@dataclass
class Holder:
    """One place a parameter is registered: ``module.<attr>`` at ``path`` (logical, without ``.base_layer``)."""

    path: str
    module_path: str
    module: nn.Module
    attr: str


@dataclass
class Tie:
    layer_path: str
    tensor: torch.Tensor
    owner: nn.Module
    attr: str
    others: list[Holder]  # the holders outside the adapter layer that writes the tensor


class MergePlan:
    def __init__(self, model: nn.Module, layers: Sequence[tuple[str, AdapterLayer, list[str]]], safe: bool,
                 untie: bool) -> None:
        """Compute and check every layer's merge of its ``names``; raises (changing nothing) on any refusal."""
        self.model = model
        self.proposals: list[tuple[str, MergeProposal]] = []
        staged: dict[int, torch.Tensor] = {}
        for path, layer, names in layers:
            if not layer.mergeable:
                raise NotImplementedError(
                    f"{type(layer).__name__} at {logical_path(path)!r} cannot be merged into the base weights; "
                    "nothing was changed. Keep these adapters unmerged, or merge only the others (merge(names))"
                )
            proposal = layer.propose_merge(names, staged)
            for owner, attr, value in proposal.updates:
                staged[id(getattr(owner, attr))] = value
            self.proposals.append((logical_path(path), proposal))
        if safe:
            for path, proposal in self.proposals:
                bad = proposal.non_finite()
                if bad:
                    raise ValueError(f"merging adapter(s) {proposal.names} would put non-finite values into {path!r} "
                                     f"({', '.join(bad)}); nothing was changed")
        self.ties = self._find_ties()
        if self.ties and not untie:
            tie = self.ties[0]
            raise ValueError(
                f"the weight of {tie.layer_path!r} is shared with {[h.path for h in tie.others]} (tied embeddings): "
                "merging in place would change those modules too; nothing was changed. merge_and_unload() unties "
                "them (they keep the original weight) and merges into this module only; or keep the adapter unmerged"
            )
        self.configs = self._configs_to_untie()

    def _find_ties(self) -> list[Tie]:
        holders: dict[int, list[Holder]] = {}
        for module_path, module in self.model.named_modules(remove_duplicate=False):
            for attr, param in module.named_parameters(recurse=False):
                path = _logical(f"{module_path}.{attr}" if module_path else attr)
                holders.setdefault(id(param), []).append(Holder(path, module_path, module, attr))
        ties: list[Tie] = []
        for path, proposal in self.proposals:
            for (owner, attr, _), tensor in zip(proposal.updates, proposal.targets()):
                others = [h for h in holders.get(id(tensor), []) if not h.path.startswith(path + ".")]
                if others:
                    ties.append(Tie(path, tensor, owner, attr, others))
        written = [id(t.tensor) for t in ties]
        if len(written) != len(set(written)):
            paths = [t.layer_path for t in ties]
            raise ValueError(f"adapters on {paths}, which share one weight (tied), cannot both be merged into it; "
                             "nothing was changed. Keep one of them unmerged")
        return ties

    def _configs_to_untie(self) -> list:
        """The transformers configs whose ``tie_word_embeddings`` ties the weights we untie. Refuses when that
        flag also ties other weights (untying ours would untie those on reload too)."""
        if not self.ties:
            return []
        ours = {h.path for t in self.ties for h in t.others} | {f"{t.layer_path}.{t.attr}" for t in self.ties}
        configs = []
        for prefix, module in self.model.named_modules():
            expand = getattr(module, "get_expanded_tied_weights_keys", None)
            if expand is None or getattr(module, "config", None) is None:
                continue
            pairs = [(_logical(_join(prefix, a)), _logical(_join(prefix, b))) for a, b in expand(all_submodels=False).items()]
            mine = [p for p in pairs if p[0] in ours or p[1] in ours]
            other = [p for p in pairs if p not in mine]
            if mine and other:
                raise ValueError(
                    f"{type(module).__name__} also ties {[a for a, _ in other]} through tie_word_embeddings: untying "
                    f"{sorted(ours)} would untie those too; nothing was changed. Keep the embedding adapter unmerged"
                )
            if mine:
                configs.append(module)
        return configs

    def commit(self) -> None:
        for tie in self.ties:  # first, while the shared tensor still holds the original weight
            for holder in tie.others:
                if holder.module is tie.owner:  # the whole module is shared: the other place gets its own module
                    set_submodule(self.model, holder.module_path, copy.deepcopy(tie.owner))
                else:
                    setattr(holder.module, holder.attr,
                            nn.Parameter(tie.tensor.detach().clone(), requires_grad=tie.tensor.requires_grad))
        for _, proposal in self.proposals:
            proposal.commit()
        for module in self.configs:
            _untie_config(module)
        if self.configs:
            for module in self.model.modules():  # transformers reads the tied pairs from here when saving/loading
                if hasattr(module, "all_tied_weights_keys") and hasattr(module, "get_expanded_tied_weights_keys"):
                    module.all_tied_weights_keys = module.get_expanded_tied_weights_keys(all_submodels=True)


def _untie_config(model: nn.Module) -> None:
    config = model.config
    configs = [config]
    text = getattr(config, "get_text_config", None)
    if text is not None:
        configs.append(text(decoder=True))
    for cfg in configs:
        if hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _logical(name: str) -> str:
    return re.sub(r"(^|\.)base_layer(?=\.|$)", "", name).lstrip(".")
