"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form whose rank budget moves to where it matters.

ΔW = P diag(E) Q per targeted matrix, an orthogonality regulariser on P and Q, and after every optimizer step:
importance |θ·∇θ| smoothed by two EMAs (beta1, beta2), a cubic budget schedule from init_r to target_r per
matrix (tinit warm-up steps at full budget, tfinal steps at the final budget), and the lowest-scoring triplets
masked (E_i = 0). The trainer calls the budget step itself (``AdaptedModel.after_optimizer_step``); saving prunes
to the kept ranks and writes ``rank_pattern``, as Hugging Face PEFT does, so the files load in either library.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .. import layers  # noqa: F401
from ..config import AdapterConfig, ConfigError, option, require
from ..layers.adalora import ADALORA_LAYERS, SVDConv1D, SVDLinear
from ..layers.base import find_layer
from ..targets import Selection, TargetSpec, compact, select
from .adapter import AdapterMethod
from .registry import Injection, register_method
from .common import add_modules_to_save, resolve_modules_to_save, task_of, wrap
from .lora import default_targets

@dataclasses.dataclass(frozen=True)
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA settings. ``total_step`` is the number of optimizer steps of the run (the CLI fills it in)."""

    method = "adalora"

    init_r: int = option(12, "starting rank of every matrix")
    target_r: int = option(8, "average final rank per matrix")
    alpha: float = option(8, "scale numerator: s = alpha / init_r")
    dropout: float = option(0.0, "dropout on the adapter input")
    tinit: int = option(0, "steps at the full budget before it shrinks (CLI recipe: 10% of the run)")
    tfinal: int = option(0, "steps at the final budget at the end (CLI recipe: 20% of the run)")
    deltaT: int = option(1, "reallocate the budget every N steps")
    beta1: float = option(0.85, "EMA factor of the importance")
    beta2: float = option(0.85, "EMA factor of its uncertainty")
    orth_reg_weight: float = option(0.5, "weight of the orthogonality regulariser")
    total_step: int | None = option(None, "steps of the budget schedule (required; the CLI uses the run's optimizer "
                                          "steps)")
    target_modules: TargetSpec = option(None, "module names (suffixes), a regex, or 'all-linear' (library default: "
                                        "the model type's query and value projections)")
    exclude_modules: TargetSpec = option(None, "modules never adapted")
    layers_to_transform: int | Sequence[int] | None = option(None, "only these layer indices")
    layers_pattern: str | Sequence[str] | None = option(None, "name of the layer list that layers_to_transform indexes")
    rank_pattern: dict[str, list[bool]] | None = option(None, "kept triplets per matrix (written when saving)")
    modules_to_save: Sequence[str] | None = option(None, "modules trained whole and saved with the adapter (the "
                                                   "task head is added by itself)")

    def __post_init__(self) -> None:
        require(isinstance(self.init_r, int) and self.init_r > 0, f"init_r must be a positive integer, got {self.init_r!r}")
        require(isinstance(self.target_r, int) and 0 < self.target_r <= self.init_r,
                f"target_r must be between 1 and init_r ({self.init_r}), got {self.target_r!r}")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        require(self.deltaT >= 1, f"deltaT must be at least 1, got {self.deltaT!r}")
        require(self.total_step is not None and self.total_step > 0,
                "total_step (the number of optimizer steps of the run) is required: the rank budget is scheduled over it")
        if not self.tinit < self.total_step - self.tfinal:
            raise ConfigError(
                f"AdaLoRA phases do not fit in the run: tinit ({self.tinit}) + tfinal ({self.tfinal}) must be less than "
                f"total_step ({self.total_step}) so that the budget has steps to shrink in; lower tinit/tfinal or train longer"
            )


class RankAllocator:
    """Importance scores, the budget schedule and triplet masking for one AdaLoRA adapter."""

    def __init__(self, config: AdaLoraConfig, layers: dict[str, SVDLinear], adapter_name: str) -> None:
        self.config, self.layers, self.name = config, layers, adapter_name
        self.init_bgt = config.init_r * len(layers)
        self.target_bgt = config.target_r * len(layers)
        self.rank_pattern: dict[str, list[bool]] | None = dict(config.rank_pattern) if config.rank_pattern else None
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Importance statistics and rank pattern, for resumable checkpoints."""
        tensors = {f"{table}|{path}|{kind}": value for table, values in
                   (("ipt", self.ipt), ("avg", self.exp_avg_ipt), ("unc", self.exp_avg_unc))
                   for (path, kind), value in values.items()}
        return tensors, {"rank_pattern": self.rank_pattern}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], plain: dict) -> None:
        self.reset_ipt()
        tables = {"ipt": self.ipt, "avg": self.exp_avg_ipt, "unc": self.exp_avg_unc}
        for key, value in tensors.items():
            table, path, kind = key.split("|")
            tables[table][(path, kind)] = value.clone()
        self.rank_pattern = plain.get("rank_pattern")

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        remaining = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * remaining**3 + self.target_bgt)
        return budget, step % c.deltaT == 0

    def _params(self):
        for path, layer in self.layers.items():
            for kind in ("lora_A", "lora_E", "lora_B"):
                yield (path, kind), getattr(layer, kind)[self.name]

    def update_ipt(self) -> None:
        c = self.config
        with torch.no_grad():
            for key, param in self._params():
                if param.grad is None:
                    continue
                if key not in self.ipt:
                    for table in (self.ipt, self.exp_avg_ipt, self.exp_avg_unc):
                        table[key] = torch.zeros_like(param)
                self.ipt[key] = (param * param.grad).abs()
                self.exp_avg_ipt[key].mul_(c.beta1).add_(self.ipt[key], alpha=1 - c.beta1)
                self.exp_avg_unc[key].mul_(c.beta2).add_((self.ipt[key] - self.exp_avg_ipt[key]).abs(), alpha=1 - c.beta2)

    def _score(self, key) -> torch.Tensor:
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        scores = {}
        for path in self.layers:
            if (path, "lora_E") not in self.exp_avg_ipt:
                return self.rank_pattern or {}
            score_A = self._score((path, "lora_A")).mean(dim=1)
            score_B = self._score((path, "lora_B")).mean(dim=0)
            scores[path] = self._score((path, "lora_E")).view(-1) + score_A + score_B
        k = self.init_bgt - budget
        if k < 1:
            return self.rank_pattern or {}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item()
        pattern = {}
        with torch.no_grad():
            for path, layer in self.layers.items():
                keep = scores[path] > threshold
                layer.lora_E[self.name].masked_fill_(~keep.view(-1, 1), 0.0)
                pattern[f"{path}.lora_E"] = keep.tolist()
        return pattern

    def mask_using_rank_pattern(self) -> None:
        with torch.no_grad():
            for path, layer in self.layers.items():
                keep = torch.tensor(self.rank_pattern[f"{path}.lora_E"])
                layer.lora_E[self.name].masked_fill_(~keep.view(-1, 1), 0.0)

    def step(self, step: int) -> None:
        """After optimizer step ``step`` (0-based): score, schedule, mask (PEFT's update_and_allocate)."""
        last = self.config.total_step - self.config.tfinal
        if step < last:
            self.update_ipt()
            budget, mask = self.budget_schedule(step)
            if mask:
                self.rank_pattern = self.mask_to_budget(budget) or self.rank_pattern
        elif step == last:
            self.rank_pattern = self.mask_to_budget(self.budget_schedule(step)[0]) or self.rank_pattern
            self.reset_ipt()
        elif self.rank_pattern:
            self.mask_using_rank_pattern()

    def regularization(self) -> torch.Tensor:
        total, count = None, 0
        for path, layer in self.layers.items():
            A, B = layer.lora_A[self.name], layer.lora_B[self.name]
            for cov in (A @ A.T, B.T @ B):
                term = torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype))
                total = term if total is None else total + term
                count += 1
        return self.config.orth_reg_weight * total / max(count, 1)


class AdaLoraMethod(AdapterMethod):
    name = "adalora"
    config_cls = AdaLoraConfig
    peft_type = "ADALORA"
    default_lr = 1e-3
    # tinit/tfinal None (and total_step, None by default): derived from the run's length by config_for_run
    recipe = {"alpha": 16, "dropout": 0.1, "target_modules": "all-linear", "deltaT": 10, "tinit": None, "tfinal": None}
    reserved_names = frozenset({"lora_A", "lora_E", "lora_B"})
    registry = ADALORA_LAYERS

    def supports(self, module: nn.Module) -> bool:
        return self.registry.lookup(module) is not None

    def inject(self, model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> Injection:
        saved = resolve_modules_to_save(model, config.modules_to_save)
        selection = Selection(
            target_modules=config.target_modules if config.target_modules is not None else default_targets(model),
            exclude_modules=config.exclude_modules, layers_to_transform=config.layers_to_transform,
            layers_pattern=config.layers_pattern, modules_to_save=tuple(saved),
        )
        targets = select(model, selection, self.supports, "AdaLoRA")
        layers = {}
        for path in targets:
            layer = wrap(model, path, self.registry)
            kept = (config.rank_pattern or {}).get(f"{path}.lora_E")
            rank = sum(bool(k) for k in kept) if kept is not None else config.init_r
            layer.add_adapter(adapter_name, rank, config.alpha, config.dropout, ranknum=config.init_r)
            layers[path] = layer
        add_modules_to_save(model, saved, adapter_name)
        return Injection(targets=targets, saved_modules=saved, task_type=task_of(model)[0],
                         state=RankAllocator(config, layers, adapter_name))

    # training hooks ------------------------------------------------------------------------------------
    def regularization(self, injection: Injection) -> torch.Tensor:
        return injection.state.regularization()

    def after_optimizer_step(self, injection: Injection, step: int) -> None:
        injection.state.step(step)

    def training_state(self, injection: Injection) -> "RankAllocator":
        return injection.state

    def config_for_run(self, values: dict[str, Any], run_info: Mapping[str, Any] | None) -> AdaLoraConfig:
        """The budget schedule spans the run: total_step defaults to its optimizer steps, tinit to 10% of them and
        tfinal to 20%."""
        values = dict(values)
        total = values.get("total_step") or (run_info or {}).get("total_steps")
        if total is None:  # validated before the run's length is known: a stand-in long enough for the phases
            total = (values.get("tinit") or 0) + (values.get("tfinal") or 0) + 1
        values.update(total_step=total,
                      tinit=values["tinit"] if values.get("tinit") is not None else int(0.1 * total),
                      tfinal=values["tfinal"] if values.get("tfinal") is not None else int(0.2 * total))
        return AdaLoraConfig(**values)

    # files ------------------------------------------------------------------------------------------------
    def export_tensors(self, tensors: dict[str, torch.Tensor], config: AdaLoraConfig,
                       injection: Injection) -> dict[str, torch.Tensor]:
        """Prune every matrix to the triplets its rank pattern keeps (``import_tensors`` needs no inverse: the
        adapter is built with the file's rank pattern, so its shapes are the pruned ones)."""
        pattern = injection.state.rank_pattern
        if not pattern:
            return tensors
        out = dict(tensors)
        for key, kept in pattern.items():
            path = key[: -len(".lora_E")]
            keep = torch.tensor(kept, dtype=torch.bool)
            if int(keep.sum()) == out[f"{path}.lora_E"].shape[0]:
                continue
            out[f"{path}.lora_A"] = out[f"{path}.lora_A"][keep]
            out[f"{path}.lora_E"] = out[f"{path}.lora_E"][keep]
            out[f"{path}.lora_B"] = out[f"{path}.lora_B"][:, keep]
        return out

    def file_config(self, model: nn.Module, config: AdaLoraConfig, injection: Injection) -> dict[str, Any]:
        conv1d = any(find_layer(model.get_submodule(t), SVDConv1D) is not None for t in injection.targets)
        return {
            "peft_type": self.peft_type, "task_type": injection.task_type,
            "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
            "target_modules": compact(model, injection.targets, self.supports, injection.saved_modules),
            "init_r": config.init_r, "target_r": config.target_r, "lora_alpha": config.alpha,
            "lora_dropout": config.dropout, "tinit": config.tinit, "tfinal": config.tfinal, "deltaT": config.deltaT,
            "beta1": config.beta1, "beta2": config.beta2, "orth_reg_weight": config.orth_reg_weight,
            "total_step": config.total_step, "rank_pattern": injection.state.rank_pattern,
            "fan_in_fan_out": conv1d, "bias": "none", "modules_to_save": list(injection.saved_modules) or None,
            "inference_mode": True,
        }

    RENAMED = {"lora_alpha": "alpha", "lora_dropout": "dropout"}
    KEPT = {f.name for f in dataclasses.fields(AdaLoraConfig)}

    def config_from_file(self, values: dict[str, Any], source: str) -> AdaLoraConfig:
        if values.get("use_dora"):
            raise ValueError(f"{source}: AdaLoRA with use_dora is not a valid combination")
        fields = {self.RENAMED.get(k, k): v for k, v in values.items()}
        return AdaLoraConfig(**{k: v for k, v in fields.items() if k in self.KEPT})


register_method(AdaLoraMethod())
