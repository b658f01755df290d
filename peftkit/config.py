"""The shared base of the method configs.

Configs are frozen dataclasses: peftkit never changes a config the user passed in. Whatever is resolved
when an adapter is built (the modules actually targeted, per-layer ranks, the layout of GPT-2 weights)
lives on the adapted model and its layers, not in the config.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar, Mapping, TypeVar

C = TypeVar("C", bound="AdapterConfig")


class ConfigError(ValueError):
    """A config value that is out of range or of the wrong type."""


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    #: registry name of the method (``peftkit train --method NAME``)
    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any], source: str = "config") -> C:
        """Build from a dict; unknown keys are reported and ignored, so newer files still load."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            warnings.warn(f"{source}: ignoring keys that {cls.__name__} does not know: {', '.join(unknown)}", stacklevel=2)
        return cls(**{k: v for k, v in values.items() if k in known})

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def option(default: Any, help: str) -> Any:
    """A config field with its help text (shown by ``peftkit train --help`` for the method's CLI keys)."""
    return dataclasses.field(default=default, metadata={"help": help})


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
