"""The run configuration of ``peftkit train``: a YAML file plus ``--key value`` overrides, validated up front.

Every key is a field below or a key of the chosen method's section (``peftkit train --help`` prints them all).
A method's section is built from its config dataclass (``method_section``), with the method's CLI recipe as the
defaults. Unknown keys, wrong types and impossible combinations are refused before any work starts, naming the key
and the allowed values (``peftkit.ConfigError``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator,
                      model_validator)

from ..config import ConfigError
from ..methods import available_methods, get_method
from .task_keys import TaskKeys, section_flag


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ------------------------------------------------------------------------------------------ method sections
_SCHEMAS: dict[str, tuple[object, type[Section]]] = {}


def method_section(name: str) -> type[Section]:
    """The CLI schema of method ``name``'s section, built from its config dataclass: the annotations give the types
    (pydantic validates them), the CLI recipe (``Method.recipe``) or else the dataclass the defaults, the fields'
    ``help`` metadata the descriptions. Built when first asked for, so a method registered at any time has one."""
    method = get_method(name)
    cached = _SCHEMAS.get(name)
    if cached is not None and cached[0] is method:
        return cached[1]
    hints = typing.get_type_hints(method.config_cls)
    fields: dict[str, Any] = {}
    for spec in dataclasses.fields(method.config_cls):
        annotation = hints[spec.name]
        if spec.name in method.recipe:
            default = method.recipe[spec.name]
            if default is None:  # filled in from the run by config_for_run
                annotation = annotation | None
        elif spec.default is not dataclasses.MISSING:
            default = spec.default
        else:
            default = spec.default_factory()  # type: ignore[misc]
        fields[spec.name] = (annotation, Field(default, description=spec.metadata.get("help", "")))
    schema = create_model(f"{method.config_cls.__name__}Section", __base__=Section, **fields)
    _SCHEMAS[name] = (method, schema)
    return schema


def _config_error(method: str, config_cls: type, err: Exception) -> str:
    """A dataclass check's message, prefixed with the key it names (``lora.r: r must be ...``)."""
    message = str(err)
    key = next((f.name for f in dataclasses.fields(config_cls) if re.match(rf"{re.escape(f.name)}\b", message)), None)
    if key is None:
        return f"{method}: {message}"
    return f"{method}.{key}: {message.removeprefix(key + ': ')}"


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


class RunConfig(TaskKeys):
    """Everything ``peftkit train`` needs. Method settings live in the section named like the method (``lora.r``):
    the sections are not fields of this class but come from the method registry when a config is validated (extra
    keys named like a method), so a method registered at any time has its section."""

    # extra keys: method sections only (checked in _method_sections); every other unknown key is refused
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    # model, task and method
    model: str = Field("minilm", description="path of a transformers model folder, or a packaged base: 'minilm' (all-MiniLM-L6-v2), 'smollm2', 'gemma3-270m' (multilingual)")
    task: str = Field("classification", description="what the model learns: classification, causal-lm, token-classification")
    method: str = Field("lora", description="training method (peftkit.available_methods()): lora, dora, adalora, "
                        "bottleneck, bitfit, head, full, or a registered one")
    distill: DistillSection | None = Field(None, description="self-distillation on top of an adapter method (set any distill.* key)")

    # data
    train_file: str | None = Field(None, description="training data: .csv, .tsv or .jsonl (default: the built-in demo intents)")
    dev_file: str | None = Field(None, description="evaluation data; without it, dev_split of train is held out (stratified)")
    test_file: str | None = Field(None, description="optional test data, evaluated once at the end with the best model")
    dev_split: float = Field(0.1, gt=0, le=0.5, description="share of train held out as dev when dev_file is not given")
    max_length: int = Field(128, gt=0, le=8192, description="tokens per example (longer: truncated; NER: windows)")

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
    metric_for_best_model: str = Field("accuracy", description="metric that picks the best checkpoint: accuracy, "
                                       "macro_f1, loss, f1 (default: the task's; causal-lm: loss; token-classification: f1)")
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

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, values: Any) -> Any:
        if isinstance(values, dict):
            methods = available_methods()
            unknown = [key for key in values if key not in cls.model_fields and key not in methods]
            if unknown:
                raise ValueError(f"unknown config key {unknown[0]!r} (valid keys: {', '.join(_top_level_keys())})")
        return values

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        tasks = _available_tasks()
        if value not in tasks:
            raise ValueError(f"{value!r} is not a task; choose one of {', '.join(tasks)}")
        return value

    @model_validator(mode="after")
    def _combinations(self, info: ValidationInfo) -> "RunConfig":
        methods = available_methods()
        if self.method not in methods:
            raise ValueError(f"method: {self.method!r} is not a training method; choose one of {', '.join(methods)}")
        self._method_sections(stored=bool((info.context or {}).get("stored")))
        method = get_method(self.method)
        self._task_metric()
        if self.early_stopping_patience and self.eval_strategy == "no":
            raise ValueError("early_stopping_patience needs evaluations: set eval_strategy to 'epoch' or 'steps'")
        if self.distributed == "fsdp" and not method.adapter:
            raise ValueError(f"distributed: fsdp is offered for adapter methods; use ddp for method {self.method!r}, "
                             "which trains the whole model")
        if self.distill is not None and not method.adapter:
            raise ValueError("distill: needs an adapter method (the base-model teacher is the network with adapters off)")
        if self.distill is not None and method.train_logits is not None:
            raise ValueError(f"distill: method {self.method!r} computes its logits its own way (the head on the frozen "
                             "body's features), so distillation would be ignored; drop the distill settings, or use "
                             "an adapter method such as lora")
        if self.distill is not None and self.distill.teacher == "base" and self.distill.mode == "logits":
            raise ValueError("distill.mode: logits from the base model are meaningless for a new classifier head; "
                             "use mode hidden (or auto), or a trained run folder as teacher")
        return self

    def _task_metric(self) -> None:
        from ..tasks import get_task

        allowed = get_task(self.task).best_metrics
        if "metric_for_best_model" not in self.model_fields_set:
            self.__dict__["metric_for_best_model"] = allowed[0]  # (no assignment: it would validate again)
        elif self.metric_for_best_model not in allowed:
            raise ValueError(f"metric_for_best_model: task {self.task!r} reports {', '.join(allowed)}, not "
                             f"{self.metric_for_best_model!r}")

    @field_validator("distill", mode="before")
    @classmethod
    def _distill_flag(cls, value):
        return section_flag(value)

    def _method_sections(self, stored: bool) -> None:
        """Keep the chosen method's section only, validated against its schema and its config dataclass; settings
        of another method are an error (a stored config of an older version may carry them: dropped)."""
        extra = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        for name in [n for n in extra if n != self.method]:
            given = extra.pop(name)
            if given and not stored:
                raise ValueError(f"{name}: settings given, but method is {self.method!r} (set method: {name}, or "
                                 "drop them)")
        schema = method_section(self.method)
        values = extra.get(self.method)
        if isinstance(values, Section):
            values = values.model_dump(exclude_unset=True)
        if values is not None and not isinstance(values, dict):
            raise ValueError(f"{self.method}: expected a mapping of {self.method}.* keys, got {values!r}")
        try:
            section = schema.model_validate(values or {})
        except ValidationError as err:
            raise ValueError("\n  ".join(f"{self.method}.{line.strip()}" for line in _explain(err).splitlines()[1:])) from None
        method = get_method(self.method)
        try:
            method.config_for_run(section.model_dump(), None)  # the dataclass's own checks, before any work starts
        except (ConfigError, TypeError, ValueError) as err:
            raise ValueError(_config_error(self.method, method.config_cls, err)) from None
        extra[self.method] = section

    @property
    def peak_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else get_method(self.method).default_lr

    def section(self) -> Section:
        """The chosen method's settings as given (CLI recipe defaults filled in)."""
        return self.__pydantic_extra__[self.method]

    def method_config(self, run_info: dict | None = None):
        """The library config (the method's dataclass) of this run; ``run_info`` holds ``total_steps``."""
        return get_method(self.method).config_for_run(self.section().model_dump(), run_info)

    def to_yaml(self) -> str:
        """The resolved config, with the section of the chosen method only."""
        exclude: dict = {}
        if self.distill is not None:  # the keys of the other distillation mode mean nothing here
            exclude["distill"] = set(self.distill.unused_keys())
        return yaml.safe_dump(self.model_dump(mode="json", exclude=exclude), sort_keys=False, allow_unicode=True)


def load(path: str | Path | None, overrides: list[str], embedded: bool = False) -> RunConfig:
    """The YAML file (if any) with ``--key value`` overrides applied, validated.

    ``embedded``: the file is peftkit's own default (the demo); its method-specific settings (the method's section
    and learning_rate) apply only when the method stays the file's, so ``--method X`` alone always works."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    pairs = list(_pairs(overrides))
    method = next((value for key, value in pairs if key == "method"), values.get("method"))
    if embedded and method != values.get("method"):
        methods = available_methods()
        values = {k: v for k, v in values.items() if k not in methods and k != "learning_rate"}
    for key, value in pairs:
        _set(values, key, value)
    return validate(values)


def validate(values: dict[str, Any]) -> RunConfig:
    _check_keys(values)
    try:
        return RunConfig.model_validate(values)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


def _pairs(overrides: list[str]):
    items = list(overrides)
    while items:
        flag = items.pop(0)
        if not flag.startswith("--"):
            raise ConfigError(f"expected --key value, got {flag!r}")
        key = flag[2:].replace("-", "_") if "=" not in flag else flag[2:].split("=", 1)[0].replace("-", "_")
        if "=" in flag:
            raw = flag.split("=", 1)[1]
        else:
            if not items or (items[0].startswith("--") and not _is_number(items[0])):
                raise ConfigError(f"--{key} needs a value")
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
            raise ConfigError(f"--{key}: {part!r} is not a section")
    node[parts[-1]] = value


def _top_level_keys() -> list[str]:
    return [*RunConfig.model_fields, *available_methods()]


def _available_tasks() -> list[str]:
    try:
        from ..tasks import available_tasks
    except ImportError:  # before peftkit.tasks exists: the one task peftkit has always had
        return ["classification"]
    return list(available_tasks())


def _check_keys(values: dict, prefix: str = "", fields: list[str] | None = None) -> None:
    """Refuse unknown keys (top level, and inside sections), suggesting close matches."""
    if fields is None:
        fields = _top_level_keys()
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(prefix + c) for c in close)}?" if close else ""
            valid = ", ".join(prefix + f for f in fields) or f"none: {prefix.rstrip('.')} has no settings"
            raise ConfigError(f"unknown config key {prefix + key!r}{hint} (valid keys: {valid})")
        section = _section_of(key) if not prefix else None
        if isinstance(value, dict) and section is not None:
            _check_keys(value, f"{prefix}{key}.", list(section.model_fields))


def _section_of(key: str) -> type[BaseModel] | None:
    """The section model of a top-level key: a method's section, or a field typed ``Section | None``."""
    if key in available_methods():
        return method_section(key)
    field = RunConfig.model_fields.get(key)
    return _section_model(field.annotation) if field is not None else None


def _section_model(annotation) -> type[BaseModel] | None:
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
    """Every key with its type, default and description (for ``peftkit train --help``); the method sections come
    from the registry, with the CLI recipe's defaults."""
    out = []
    for name, field in RunConfig.model_fields.items():
        section = _section_model(field.annotation)
        if section is not None:
            out.append(f"  {name}.*  {field.description}")
            out += [f"      {name}.{sub} (default {f.default!r}): {f.description}" for sub, f in section.model_fields.items()]
            continue
        out.append(f"  {name} (default {field.default!r}): {field.description}")
    for name in available_methods():
        method = get_method(name)
        out.append(f"  {name}.*  settings of method {name} (default learning_rate {method.default_lr:g})")
        out += [f"      {name}.{sub} (default {f.default!r}): {f.description}"
                for sub, f in method_section(name).model_fields.items()]
    return "\n".join(out)
