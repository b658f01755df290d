"""The run configuration of ``peftkit train``: a YAML file plus ``--key value`` overrides, validated up front.

Every key is a field below (``peftkit train --help`` prints them). Unknown keys, wrong types and impossible
combinations are refused before any work starts, naming the key and the allowed values.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from ..config import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSection(Section):
    r: int = Field(8, gt=0, description="rank of the update B·A")
    alpha: float = Field(16, gt=0, description="scale numerator: s = alpha / r (alpha / √r with use_rslora)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: str | list[str] = Field("all-linear", description="module names (suffixes), a regex, or 'all-linear'")
    exclude_modules: str | list[str] | None = Field(None, description="modules never adapted")
    layers_to_transform: list[int] | None = Field(None, description="only these layer indices")
    rank_pattern: dict[str, int] | None = Field(None, description="per-module rank: {name pattern: r}")
    alpha_pattern: dict[str, float] | None = Field(None, description="per-module alpha: {name pattern: alpha}")
    use_rslora: bool = Field(False, description="scale alpha/√r (rank-stabilised LoRA)")
    use_dora: bool = Field(False, description="DoRA: a learned magnitude per output row (Linear layers)")
    init: Literal["default", "gaussian"] = Field("default", description="initialisation of A (B starts at 0)")
    shared_dropout_mask: bool = Field(False, description="q, k, v share one LoRA dropout mask (a little faster on "
                                      "the CPU; PEFT, and the default, draw one mask per layer)")

    def library_config(self, run_info: dict):
        from ..methods.lora import LoraConfig

        return LoraConfig(**self.model_dump())


class DoraSection(LoraSection):
    use_dora: bool = Field(True, description="always true for method dora (use method lora for plain LoRA)")

    @field_validator("use_dora")
    @classmethod
    def _always(cls, value: bool) -> bool:
        if not value:
            raise ValueError("false would train plain LoRA under the name dora; use method: lora instead "
                             "(or drop dora.use_dora)")
        return value


class AdaLoraSection(Section):
    init_r: int = Field(12, gt=0, description="starting rank of every matrix")
    target_r: int = Field(8, gt=0, description="average final rank per matrix")
    alpha: float = Field(16, gt=0, description="scale numerator: s = alpha / init_r")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: str | list[str] = Field("all-linear", description="module names (suffixes), a regex, or 'all-linear'")
    tinit: int | None = Field(None, ge=0, description="steps at the full budget before it shrinks (default: 10% of the run)")
    tfinal: int | None = Field(None, ge=0, description="steps at the final budget at the end (default: 20% of the run)")
    deltaT: int = Field(10, gt=0, description="reallocate the budget every N steps")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the importance")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of its uncertainty")
    orth_reg_weight: float = Field(0.5, ge=0, description="weight of the orthogonality regulariser")
    total_step: int | None = Field(None, gt=0, description="steps of the budget schedule (default: the run's optimizer steps)")

    def library_config(self, run_info: dict):
        from ..methods.adalora import AdaLoraConfig

        values = self.model_dump()
        total = values["total_step"] or run_info["total_steps"]
        values.update(total_step=total,
                      tinit=values["tinit"] if values["tinit"] is not None else int(0.1 * total),
                      tfinal=values["tfinal"] if values["tfinal"] is not None else int(0.2 * total))
        return AdaLoraConfig(**values)


class BottleneckSection(Section):
    variant: Literal["houlsby", "pfeiffer", "parallel"] = Field("pfeiffer", description="placement: houlsby (after "
        "attention and feed-forward), pfeiffer (after feed-forward), parallel (beside the feed-forward)")
    reduction_factor: int = Field(16, gt=0, description="bottleneck size = hidden size / reduction_factor")
    nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="between the two projections")
    scaling: float | None = Field(None, description="output scale (default 1; 4 for parallel)")
    train_layer_norms: bool = Field(False, description="also train the LayerNorms")

    def library_config(self, run_info: dict):
        from ..methods.bottleneck import BottleneckConfig

        return BottleneckConfig(**self.model_dump())


class BitFitSection(Section):
    def library_config(self, run_info: dict):
        from ..methods.bitfit import BitFitConfig

        return BitFitConfig()


class HeadSection(Section):
    cache_features: bool = Field(False, description="compute the frozen body's pooled features once, train the head on them")

    def library_config(self, run_info: dict):
        from ..methods.head import HeadConfig

        return HeadConfig()


class FullSection(Section):
    pass


class DistillSection(Section):
    teacher: str = Field("base", description="'base' (the same network with adapters disabled) or a run folder")
    alpha: float = Field(0.5, ge=0, le=1, description="λ in (1-λ)·CE + λ·distillation loss")
    temperature: float = Field(2.0, gt=0, description="T for logit distillation (the loss is scaled by T²)")
    mode: Literal["auto", "logits", "hidden"] = Field(
        "auto", description="auto: logits from a run-folder teacher; hidden states from the base (its head is new)")
    layers: list[int] | None = Field(None, description="hidden-state indices to match (default: the last)")
    hidden_loss: Literal["mse", "cosine"] = Field("mse", description="hidden-state distance")

    # the keys each mode reads; a key of the other mode, when given, would be silently ignored
    MODE_KEYS: ClassVar[dict[str, tuple[str, ...]]] = {"logits": ("temperature",), "hidden": ("layers", "hidden_loss")}

    @property
    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "hidden" if self.teacher == "base" else "logits"

    def unused_keys(self) -> list[str]:
        return [key for mode, keys in self.MODE_KEYS.items() if mode != self.resolved_mode for key in keys]

    @model_validator(mode="after")
    def _no_ignored_keys(self, info: ValidationInfo) -> "DistillSection":
        given = [key for key in self.unused_keys() if key in self.model_fields_set]
        if given and not (info.context or {}).get("stored"):
            raise ValueError(f"{' and '.join(given)} only applies in {self._mode_of(given[0])} "
                             f"mode, but this run distils in {self.resolved_mode} mode (teacher {self.teacher!r}, mode "
                             f"{self.mode!r}), so it would be ignored; drop it, or set distill.mode")
        return self

    def _mode_of(self, key: str) -> str:
        return next(mode for mode, keys in self.MODE_KEYS.items() if key in keys)


SECTIONS: dict[str, type[Section]] = {
    "lora": LoraSection, "dora": DoraSection, "adalora": AdaLoraSection, "bottleneck": BottleneckSection,
    "bitfit": BitFitSection, "head": HeadSection, "full": FullSection,
}


class RunConfig(BaseModel):
    """Everything ``peftkit train`` needs. Method settings live in the section named like the method."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # model and method
    model: str = Field("minilm", description="path of a transformers model folder, or 'minilm' (the packaged all-MiniLM-L6-v2)")
    method: str = Field("lora", description="training method: lora, dora, adalora, bottleneck, bitfit, head or full")
    pooling: Literal["auto", "pooler", "cls", "mean"] = Field(
        "auto", description="features the classifier sees: auto = the model's sentence-transformers pooling if any, else pooler")
    lora: LoraSection = Field(default_factory=LoraSection, description="LoRA settings (method: lora)")
    dora: DoraSection = Field(default_factory=DoraSection, description="DoRA settings (method: dora)")
    adalora: AdaLoraSection = Field(default_factory=AdaLoraSection, description="AdaLoRA settings (method: adalora)")
    bottleneck: BottleneckSection = Field(default_factory=BottleneckSection, description="bottleneck adapter settings (method: bottleneck)")
    bitfit: BitFitSection = Field(default_factory=BitFitSection, description="BitFit settings (method: bitfit)")
    head: HeadSection = Field(default_factory=HeadSection, description="head-only settings (method: head)")
    full: FullSection = Field(default_factory=FullSection, description="full fine-tuning settings (method: full)")
    distill: DistillSection | None = Field(None, description="self-distillation on top of an adapter method (set any distill.* key)")

    # data
    train_file: str | None = Field(None, description="training data: .csv, .tsv or .jsonl (default: the built-in demo intents)")
    dev_file: str | None = Field(None, description="evaluation data; without it, dev_split of train is held out (stratified)")
    test_file: str | None = Field(None, description="optional test data, evaluated once at the end with the best model")
    text_column: str = Field("text", description="column with the text")
    text_pair_column: str | None = Field(None, description="second text column for sentence pairs (NLI)")
    label_column: str = Field("label", description="column with the label (strings or integers)")
    dev_split: float = Field(0.1, gt=0, le=0.5, description="share of train held out as dev when dev_file is not given")
    max_length: int = Field(128, gt=0, le=8192, description="tokens per example (longer ones are truncated)")

    # optimisation
    epochs: float = Field(3, gt=0, description="passes over the training data")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps (overrides epochs)")
    batch_size: int = Field(32, gt=0, description="examples per optimizer step (per process), before accumulation")
    eval_batch_size: int = Field(64, gt=0, description="examples per evaluation batch")
    learning_rate: float | None = Field(None, gt=0, description="peak learning rate (default: lora 5e-4, full 5e-5, head 1e-3)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="share of steps for linear warm-up")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="decay after warm-up")
    gradient_accumulation_steps: int = Field(1, gt=0, description="batches per optimizer step")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping (None: off)")
    max_skipped_steps: int = Field(3, ge=0, description="optimizer steps with a non-finite loss or gradients that are "
                                   "skipped (with a warning) before the run stops as diverged (exit status 3)")
    bf16: bool = Field(False, description="bf16 autocast; with adapters the frozen base is stored in bf16, adapters stay fp32")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (non-reentrant)")
    fast: bool = Field(False, description="peftkit's fast mode: the base model's dropouts use the fast mask")
    seed: int = Field(42, description="seed of everything (data order, dropout, initialisation)")

    # evaluation and checkpoints
    eval_strategy: Literal["epoch", "steps", "no"] = Field("epoch", description="when to evaluate on dev")
    eval_steps: int = Field(200, gt=0, description="evaluate every N optimizer steps (eval_strategy: steps)")
    save_steps: int | None = Field(None, gt=0, description="also checkpoint every N steps (default: at each evaluation)")
    metric_for_best_model: Literal["accuracy", "macro_f1", "loss"] = Field("accuracy", description="metric that picks the best checkpoint")
    early_stopping_patience: int | None = Field(None, gt=0, description="stop after N evaluations without improvement")
    keep_checkpoints: int = Field(2, ge=1, description="how many step checkpoints to keep (the best is kept apart)")

    # output and process
    output_dir: str = Field("runs/run", description="run folder: adapter, labels, config, report, plots, tensorboard, checkpoints")
    quiet: bool = Field(False, description="no progress bars; one line per evaluation")
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice)")
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="under torchrun: DDP, or FSDP2 (fully_shard)")

    @field_validator("eval_strategy", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false

    @model_validator(mode="after")
    def _combinations(self) -> "RunConfig":
        from .methods import available, get as get_method

        if self.method not in available():
            raise ValueError(f"method: {self.method!r} is not a training method; choose one of {', '.join(available())}")
        for name in SECTIONS:
            if name != self.method and name in self.model_fields_set and getattr(self, name).model_fields_set:
                raise ValueError(f"{name}: settings given, but method is {self.method!r} (set method: {name}, or drop them)")
        if self.early_stopping_patience and self.eval_strategy == "no":
            raise ValueError("early_stopping_patience needs evaluations: set eval_strategy to 'epoch' or 'steps'")
        if self.distributed == "fsdp" and self.method == "full":
            raise ValueError("distributed: fsdp is offered for adapter methods; use ddp for full fine-tuning")
        if self.distill is not None and self.method == "full":
            raise ValueError("distill: needs an adapter method (the base-model teacher is the network with adapters off)")
        if self.distill is not None and get_method(self.method).logits is not None:
            raise ValueError(f"distill: method {self.method!r} computes its logits its own way (the head on the frozen "
                             "body's features), so distillation would be ignored; drop the distill settings, or use "
                             "an adapter method such as lora")
        if self.distill is not None and self.distill.teacher == "base" and self.distill.mode == "logits":
            raise ValueError("distill.mode: logits from the base model are meaningless for a new classifier head; "
                             "use mode hidden (or auto), or a trained run folder as teacher")
        return self

    @field_validator("distill", mode="before")
    @classmethod
    def _distill_flag(cls, value):
        if value is True:
            return {}
        return None if value is False else value

    @property
    def peak_learning_rate(self) -> float:
        from .methods import get

        return self.learning_rate if self.learning_rate is not None else get(self.method).default_lr

    def section(self) -> Section:
        return getattr(self, self.method)

    def to_yaml(self) -> str:
        """The resolved config, with the section of the chosen method only."""
        others = {name for name in SECTIONS if name != self.method}
        exclude: dict = {name: True for name in others}
        if self.distill is not None:  # the keys of the other distillation mode mean nothing here
            exclude["distill"] = set(self.distill.unused_keys())
        return yaml.safe_dump(self.model_dump(mode="json", exclude=exclude), sort_keys=False, allow_unicode=True)


class ConfigProblem(ConfigError):
    """A configuration that cannot run (unknown key, wrong type, impossible combination)."""


def load(path: str | Path | None, overrides: list[str], embedded: bool = False) -> RunConfig:
    """The YAML file (if any) with ``--key value`` overrides applied, validated.

    ``embedded``: the file is peftkit's own default (the demo); its method-specific settings (the method's section
    and learning_rate) apply only when the method stays the file's, so ``--method X`` alone always works."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigProblem(f"{path}: no such config file")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigProblem(f"{path}: not valid YAML ({err})") from None
        if not isinstance(values, dict):
            raise ConfigProblem(f"{path}: the config must be a mapping of keys to values")
    pairs = list(_pairs(overrides))
    method = next((value for key, value in pairs if key == "method"), values.get("method"))
    if embedded and method != values.get("method"):
        values = {k: v for k, v in values.items() if k not in SECTIONS and k != "learning_rate"}
    for key, value in pairs:
        _set(values, key, value)
    return validate(values)


def validate(values: dict[str, Any]) -> RunConfig:
    _check_keys(values, RunConfig, "")
    try:
        return RunConfig.model_validate(values)
    except ValidationError as err:
        raise ConfigProblem(_explain(err)) from None


def _pairs(overrides: list[str]):
    items = list(overrides)
    while items:
        flag = items.pop(0)
        if not flag.startswith("--"):
            raise ConfigProblem(f"expected --key value, got {flag!r}")
        key = flag[2:].replace("-", "_") if "=" not in flag else flag[2:].split("=", 1)[0].replace("-", "_")
        if "=" in flag:
            raw = flag.split("=", 1)[1]
        else:
            if not items or (items[0].startswith("--") and not _is_number(items[0])):
                raise ConfigProblem(f"--{key} needs a value")
            raw = items.pop(0)
        yield key, yaml.safe_load(raw) if raw != "" else ""


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _set(values: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigProblem(f"--{key}: {part!r} is not a section")
    node[parts[-1]] = value


def _check_keys(values: dict, model: type[BaseModel], prefix: str) -> None:
    fields = model.model_fields
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(prefix + c) for c in close)}?" if close else ""
            raise ConfigProblem(f"unknown config key {prefix + key!r}{hint} (valid keys: {', '.join(prefix + f for f in fields)})")
        section = _section_model(fields[key].annotation)
        if isinstance(value, dict) and section is not None:
            _check_keys(value, section, f"{prefix}{key}.")


def _section_model(annotation) -> type[BaseModel] | None:
    """The config section class of a field typed ``Section`` or ``Section | None``."""
    import typing

    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _explain(err: ValidationError) -> str:
    lines = []
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "config"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "literal_error":
            message = f"{message} (got {problem['input']!r})"
        elif "input" in problem and problem["type"] not in ("value_error",):
            message = f"{message} (got {problem['input']!r})"
        lines.append(f"{key}: {message}" if problem["loc"] else message)
    return "invalid config:\n  " + "\n  ".join(lines)


def describe() -> str:
    """Every key with its type, default and description (for ``peftkit train --help``)."""
    out = []
    for name, field in RunConfig.model_fields.items():
        annotation = _section_model(field.annotation)
        if annotation is not None:
            out.append(f"  {name}.*  {field.description}")
            for sub, subfield in annotation.model_fields.items():
                out.append(f"      {name}.{sub} (default {subfield.default!r}): {subfield.description}")
            continue
        out.append(f"  {name} (default {field.default!r}): {field.description}")
    return "\n".join(out)
