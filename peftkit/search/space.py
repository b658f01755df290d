"""SPACE.yaml: which config keys a search samples, and from what.

Each entry is a dotted config key (as on the ``peftkit train`` command line) with one distribution::

    learning_rate: {log: [1.0e-5, 1.0e-2]}     # log-uniform float
    lora.dropout: {float: [0.0, 0.3]}          # uniform float (optional step: 0.05)
    epochs: {int: [1, 4]}                      # integer, bounds included (optional step: 2)
    method: {choice: [lora, dora, bottleneck]} # one of the listed values
    lora.r: {choice: [4, 8, 16, 32]}           # a method's key: sampled only when that method is chosen
    distill.alpha: {float: [0.1, 0.9], when: {method: [lora, dora]}}

Conditions: a key under a method's section (``lora.*``, ``dora.*``...) is sampled only in trials whose method is
that one (``method`` is sampled before every other key). ``when: {KEY: [values]}`` adds conditions of your own (every listed key must hold one of its values;
KEY is an earlier key of the space, or else the config's value is used). An inactive key keeps the config's
value. The whole space is checked against the config schema before any trial runs: every key must exist and every
bound and choice must be a value the config accepts.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError
from ..methods import available_methods
from ..train.config import validate
from .values import FIXED_KEYS, lookup, valid_keys, with_values

KINDS = ("log", "float", "int", "choice")


@dataclass
class Param:
    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    choices: list = field(default_factory=list)
    when: dict[str, list] = field(default_factory=dict)

    def suggest(self, trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1))
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.kind == "log")

    def active(self, values: dict[str, Any]) -> bool:
        return all(lookup(values, key) in allowed for key, allowed in self.when.items())

    def probes(self) -> list:
        """Values checked against the config before the search starts: every choice, or the bounds and a point
        inside (a float range on an integer key fails there)."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high), float(self.low + 0.37 * (self.high - self.low))]

    def grid(self) -> list:
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        raise ConfigError(f"--sampler grid: {self.key} is a {self.kind} range; a grid needs choice or int keys "
                          "(write the values out with choice)")


@dataclass
class Space:
    params: list[Param]
    source: dict  # the file's mapping, stored with the study to recognise the same search on resume

    def sample(self, trial, base: dict[str, Any]) -> dict[str, Any]:
        """The trial's values of the active keys, in file order (a condition sees the keys sampled before it)."""
        sampled: dict[str, Any] = {}
        for param in self.params:
            if param.active(with_values(base, sampled)):
                sampled[param.key] = param.suggest(trial)
        return sampled

    def grid(self) -> dict[str, list]:
        return {param.key: param.grid() for param in self.params}


def load_space(path: str | Path, base: dict[str, Any]) -> Space:
    """Read and check SPACE.yaml against the config ``base`` (a ``ConfigError`` names the key and the fix)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such space file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: the space must be a mapping of config keys to distributions, e.g. "
                          "'learning_rate: {log: [1.0e-5, 1.0e-2]}'")
    keys = valid_keys()
    params = []
    for key, spec in raw.items():
        key = str(key)
        _check_key(path, key, keys)
        param = _param(path, key, spec)
        for cond in param.when:
            _check_key(path, cond, keys, f"{key}: when: ")
        section = key.split(".")[0]
        if "." in key and section in available_methods():  # a method's key: only when that method runs
            allowed = param.when.get("method", [section])
            if section not in allowed:
                raise ConfigError(f"{path}: {key}: its when: method never allows {section!r}, so it would never be "
                                  "sampled")
            param.when["method"] = [section]
        params.append(param)
    params.sort(key=lambda p: p.key != "method")  # sampled first: the method's own keys depend on it
    space = Space(params, raw)
    for param in params:
        _check_values(path, param, base, params)
    return space


def _check_key(path: Path, key: str, keys: list[str], where: str = "") -> None:
    if key in FIXED_KEYS:
        raise ConfigError(f"{path}: {where}{key} cannot be searched (each trial gets its own folder under "
                          "output_dir/trials/ and runs quietly); drop it from the space")
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else f" (valid keys: {', '.join(keys)})"
        raise ConfigError(f"{path}: {where}unknown config key {key!r}{hint}")


def _param(path: Path, key: str, spec: Any) -> Param:
    where = f"{path}: {key}"
    example = "e.g. {log: [1.0e-5, 1.0e-2]}, {float: [0.0, 0.3]}, {int: [1, 4]} or {choice: [4, 8, 16]}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a distribution, got {spec!r} ({example}); a fixed value belongs in "
                          "the config file")
    kinds = [k for k in spec if k in KINDS]
    extra = [k for k in spec if k not in KINDS and k not in ("when", "step")]
    if len(kinds) != 1 or extra:
        raise ConfigError(f"{where}: give exactly one of {', '.join(KINDS)} (plus optional step, when); got "
                          f"{', '.join(map(str, spec)) or 'nothing'} ({example})")
    kind = kinds[0]
    when = _when(where, spec.get("when", {}))
    if kind == "choice":
        choices = spec[kind]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choice needs a non-empty list of values, got {choices!r}")
        if any(not (c is None or isinstance(c, (str, int, float, bool))) for c in choices):
            raise ConfigError(f"{where}: choice values must be plain values (text, numbers, true/false), got "
                              f"{choices!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{where}: choice lists a value twice: {choices!r}")
        if "step" in spec:
            raise ConfigError(f"{where}: step applies to int and float ranges, not to choice")
        return Param(key, kind, choices=choices, when=when)
    bounds = spec[kind]
    numbers = isinstance(bounds, list) and len(bounds) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
    if not numbers:
        raise ConfigError(f"{where}: {kind} needs [low, high] (two numbers), got {bounds!r}")
    low, high = bounds
    if not low < high:
        raise ConfigError(f"{where}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "log" and low <= 0:
        raise ConfigError(f"{where}: log needs a positive low bound (a log scale has no 0), got {low}")
    if kind == "int" and not (isinstance(low, int) and isinstance(high, int)):
        raise ConfigError(f"{where}: int needs whole-number bounds, got [{low}, {high}]")
    step = spec.get("step")
    if step is not None:
        if kind == "log":
            raise ConfigError(f"{where}: step cannot be combined with log")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0 or (kind == "int" and not isinstance(step, int)):
            raise ConfigError(f"{where}: step must be a positive {'whole ' if kind == 'int' else ''}number, got {step!r}")
    return Param(key, kind, low=low, high=high, step=step, when=when)


def _when(where: str, when: Any) -> dict[str, list]:
    if not isinstance(when, dict):
        raise ConfigError(f"{where}: when must map config keys to allowed values, e.g. when: {{method: [lora, dora]}}")
    return {str(k): (list(v) if isinstance(v, list) else [v]) for k, v in when.items()}


def _check_values(path: Path, param: Param, base: dict, params: list[Param]) -> None:
    """Every probe value of ``param``, set on the base config with its conditions met, must validate."""
    order = [p.key for p in params]
    for cond in param.when:
        if cond in order and order.index(cond) > order.index(param.key):
            raise ConfigError(f"{path}: {param.key}: when: {cond} is sampled after it; list {cond} first")
    conditions = {key: allowed[0] for key, allowed in param.when.items()}
    for value in param.probes():
        try:
            validate(with_values(base, {**conditions, param.key: value}))
        except ConfigError as err:
            message = str(err).replace("invalid config:\n  ", "")
            raise ConfigError(f"{path}: {param.key}: the value {value!r} is refused by the config: {message}") from None
