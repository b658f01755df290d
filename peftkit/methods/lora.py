"""LoRA (Hu et al. 2021): W x + b + (alpha/r) · B A dropout(x), with rsLoRA's alpha/√r as an option, and DoRA
(Liu et al. 2024, ``use_dora=True``): a learned magnitude per output row of the adapted weight.

File format: Hugging Face PEFT's ``peft_type: "LORA"`` (see ``peftkit/io.py``).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Sequence

from torch import nn

from .. import layers  # noqa: F401  (registers the LoRA layer types)
from ..config import AdapterConfig, ConfigError, option, require
from ..layers.base import AdapterLayer, find_layer
from ..layers.lora import LORA_LAYERS, LoraConv1D, LoraLinear
from ..layers.lora.siblings import group_siblings
from ..targets import Selection, TargetSpec, compact, select
from .adapter import AdapterMethod
from .registry import Injection, register_method
from ..layers.bitfit import DeltaForm
from .common import add_bias_deltas, add_modules_to_save, bias_modules, resolve_modules_to_save, task_of, wrap

#: default targets by transformers ``model_type`` (the attention query and value projections)
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "layoutlm", "camembert"], ["query", "value"]),
    **dict.fromkeys(["distilbert"], ["q_lin", "v_lin"]),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "opt", "bart", "gpt_neo", "gptj", "phi"],
        ["q_proj", "v_proj"],
    ),
    **dict.fromkeys(["t5", "mt5"], ["q", "v"]),
    **dict.fromkeys(["gpt_neox", "bloom", "falcon"], ["query_key_value"]),
    "deberta-v2": ["query_proj", "value_proj"],
}

BIAS_MODES = ("none", "all", "lora_only")
INITS = ("default", "gaussian")


@dataclasses.dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    """LoRA settings. ``target_modules=None`` uses the model type's default (query and value projections)."""

    method = "lora"

    r: int = option(8, "rank of the update B·A")
    alpha: float = option(8, "scale numerator: s = alpha / r (alpha / √r with use_rslora)")
    dropout: float = option(0.0, "dropout on the adapter input")
    target_modules: TargetSpec = option(None, "module names (suffixes), a regex, or 'all-linear' (library default: "
                                        "the model type's query and value projections)")
    exclude_modules: TargetSpec = option(None, "modules never adapted")
    layers_to_transform: int | Sequence[int] | None = option(None, "only these layer indices")
    layers_pattern: str | Sequence[str] | None = option(None, "name of the layer list that layers_to_transform indexes")
    rank_pattern: dict[str, int] | None = option(None, "per-module rank: {name pattern: r}")
    alpha_pattern: dict[str, float] | None = option(None, "per-module alpha: {name pattern: alpha}")
    use_rslora: bool = option(False, "scale alpha/√r (rank-stabilised LoRA)")
    use_dora: bool = option(False, "DoRA: a learned magnitude per output row (Linear layers)")
    init: str = option("default", "initialisation of A, 'default' or 'gaussian' (B starts at 0)")
    bias: str = option("none", "biases trained with the adapter: 'none', 'lora_only' (of adapted layers) or 'all'")
    modules_to_save: Sequence[str] | None = option(None, "modules trained whole and saved with the adapter (the "
                                                   "task head is added by itself)")
    #: layers of one block reading the same input (q/k/v, gate/up) share ONE dropout mask: not PEFT's semantics
    #: (PEFT draws a mask per layer), and not measurably faster (benchmarks/RESULTS.md: MiniLM, SmolLM2);
    #: training-time only, not written to files
    shared_dropout_mask: bool = option(False, "layers reading one input (q/k/v, gate/up) share one LoRA dropout "
                                       "mask (not measurably faster; PEFT, and the default, draw one mask per layer)")

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}")
        require(isinstance(self.alpha, (int, float)) and self.alpha > 0, f"alpha must be a positive number, got {self.alpha!r}")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        require(self.bias in BIAS_MODES, f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        require(self.init in INITS, f"init must be one of {INITS}, got {self.init!r}")
        require(isinstance(self.shared_dropout_mask, bool),
                f"shared_dropout_mask must be true or false, got {self.shared_dropout_mask!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name) or {}
            require(isinstance(pattern, dict), f"{name} must be a dict of module-name pattern -> value")
            for key, value in pattern.items():
                require(isinstance(value, (int, float)) and value > 0, f"{name}[{key!r}] must be positive, got {value!r}")
                try:
                    re.compile(key)
                except re.error as err:
                    raise ConfigError(f"{name} key {key!r} is not a valid pattern: {err}") from None
        for key, value in (self.rank_pattern or {}).items():
            require(isinstance(value, int), f"rank_pattern[{key!r}] must be an integer, got {value!r}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ConfigError(f"target_modules {self.target_modules!r} is not a valid regular expression: {err}") from None

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """Per-module r and alpha: the first rank_pattern/alpha_pattern key that matches the end of the path."""
        return _pattern_value(self.rank_pattern, path, self.r), _pattern_value(self.alpha_pattern, path, self.alpha)


def _pattern_value(pattern: dict | None, path: str, default):
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise ValueError(
        "target_modules is required for this model"
        + (f" (no default is known for model_type {model_type!r})" if model_type else " (it is not a known transformers model)")
        + ": pass names such as ['q_proj', 'v_proj'], a regular expression, or 'all-linear'"
    )


class LoraMethod(AdapterMethod):
    name = "lora"
    config_cls = LoraConfig
    peft_type = "LORA"
    default_lr = 5e-4
    recipe = {"alpha": 16, "dropout": 0.1, "target_modules": "all-linear"}
    reserved_names = frozenset({"lora", "lora_*", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                                "lora_magnitude_vector", "lora_dropout"})
    registry = LORA_LAYERS

    def supports(self, module: nn.Module) -> bool:
        return self.registry.lookup(module) is not None

    def inject(self, model: nn.Module, config: LoraConfig, adapter_name: str) -> Injection:
        saved = resolve_modules_to_save(model, config.modules_to_save)
        selection = Selection(
            target_modules=config.target_modules if config.target_modules is not None else default_targets(model),
            exclude_modules=config.exclude_modules,
            layers_to_transform=config.layers_to_transform,
            layers_pattern=config.layers_pattern,
            modules_to_save=tuple(saved),
        )
        targets = select(model, selection, self.supports, "LoRA")
        for path in targets:
            layer = wrap(model, path, self.registry)
            r, alpha = config.rank_and_alpha(path)
            try:
                self.add_to_layer(layer, adapter_name, config, r, alpha)
            except ValueError as err:
                raise ValueError(f"{path!r}: {err}") from None
        add_modules_to_save(model, saved, adapter_name)
        # trained biases: a per-adapter change, saved as PEFT does (the full value, under the base bias's key)
        biases = bias_modules(model, targets, config.bias)
        add_bias_deltas(model, adapter_name, biases, {
            path: DeltaForm(bias_key="base_layer.bias" if path in targets else "bias", full=True) for path in biases
        })
        for layer_type in (LoraLinear, LoraConv1D):
            group_siblings(model, layer_type)
        return Injection(targets=targets, saved_modules=saved, task_type=task_of(model)[0])

    def add_to_layer(self, layer: AdapterLayer, adapter_name: str, config: LoraConfig, r: int, alpha: float) -> None:
        layer.add_adapter(adapter_name, r=r, alpha=alpha, dropout=config.dropout, use_rslora=config.use_rslora,
                          init=config.init, use_dora=config.use_dora, shared_dropout_mask=config.shared_dropout_mask)

    # -------------------------------------------------------------------------------------------- files
    def file_config(self, model: nn.Module, config: LoraConfig, injection: Injection) -> dict[str, Any]:
        conv1d = any(find_layer(model.get_submodule(t), LoraConv1D) is not None for t in injection.targets)
        name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        return {
            "peft_type": self.peft_type,
            "task_type": injection.task_type,
            "base_model_name_or_path": name_or_path,
            "r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "target_modules": compact(model, injection.targets, self.supports, injection.saved_modules),
            "exclude_modules": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": dict(config.rank_pattern or {}),
            "alpha_pattern": dict(config.alpha_pattern or {}),
            "use_rslora": config.use_rslora,
            "use_dora": config.use_dora,
            "fan_in_fan_out": conv1d,
            "bias": config.bias,
            "lora_bias": False,
            "modules_to_save": list(injection.saved_modules) or None,
            "init_lora_weights": True if config.init == "default" else config.init,
            "inference_mode": True,
        }

    #: PEFT fields whose non-default value changes the math in ways peftkit does not implement
    UNSUPPORTED = {
        "lora_bias": False, "layer_replication": None, "target_parameters": None,
        "trainable_token_indices": None, "use_qalora": False, "alora_invocation_tokens": None, "use_bdlora": None,
    }
    RENAMED = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init"}
    IGNORED = {
        "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "fan_in_fan_out",
        "auto_mapping", "peft_version", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_config",
        "megatron_core", "qalora_group_size", "arrow_config", "kasa_config", "monteclora_config", "velora_config",
        "ensure_weight_tying", "modules_to_tie",
    }

    def import_tensors(self, tensors: dict[str, Any], config: LoraConfig, injection: Injection) -> dict[str, Any]:
        """PEFT files with ``bias != "none"`` also hold the biases of its modules_to_save wrapper's two inner
        modules: the trained copy's (the same values as ``<head>.bias``) and the untouched original's. Both are
        dropped: the head copy loads from ``<head>.bias``, and the shared base head stays as it is."""
        if config.bias == "none":
            return tensors
        extra = {f"{path}.{inner}.bias" for path in injection.saved_modules
                 for inner in ("modules_to_save", "original_module")}
        return {key: value for key, value in tensors.items() if key not in extra}

    def config_from_file(self, values: dict[str, Any], source: str) -> LoraConfig:
        for key, neutral in self.UNSUPPORTED.items():
            if values.get(key, neutral) not in (neutral, None, False, [], {}):
                raise ValueError(f"{source}: {key}={values[key]!r} is not supported by peftkit's {self.name} method")
        fields = {}
        for key, value in values.items():
            if key in self.IGNORED or key in self.UNSUPPORTED:
                continue
            fields[self.RENAMED.get(key, key)] = value
        init = fields.get("init", True)
        if isinstance(init, str) and init.split("_")[0] in ("pissa", "olora", "corda", "loftq"):
            warnings.warn(
                f"{source}: init_lora_weights={init!r}: such adapters are relative to a modified base model unless "
                "they were converted to plain LoRA when saved; peftkit loads them as plain LoRA", stacklevel=3
            )
        # an init-only setting: the saved weights replace whatever the init produced
        fields["init"] = init if init in INITS else "default"
        return LoraConfig.from_dict(fields, source=source)


register_method(LoraMethod())
