"""Which modules of a model a config selects.

Rules (the same as Hugging Face PEFT's, so that saved configs mean the same thing there):

- a list entry matches a module whose path equals it or ends with ``"." + entry``;
- a string is a regular expression that must match the whole path (``re.fullmatch``);
- ``"all-linear"`` selects every ``nn.Linear`` and GPT-2 ``Conv1D`` except the output head;
- ``exclude_modules`` uses the same two forms; ``layers_to_transform`` keeps only modules whose layer
  index (the number after ``layers_pattern``, or the first number in the path) is listed;
- modules inside ``modules_to_save`` are never targets.

A target that matches nothing is an error that lists the closest existing module names; in an adapter FILE's
config (inside ``reading_file``) it is a warning, as PEFT reads such lists: PEFT itself writes dead entries
(``classifier.modules_to_save.<adapter>``, ``classifier.original_module``) when several adapters share a model.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import warnings
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from torch import nn

from .layers.base import AdapterLayer

ALL_LINEAR = "all-linear"
LINEAR_TYPES = ("torch.nn.modules.linear.Linear", "transformers.pytorch_utils.Conv1D")
TargetSpec = str | Sequence[str] | None


class TargetError(ValueError):
    """A target, exclusion or layer selection that does not fit the model."""


#: the adapter file whose config is being applied (None: a user's own config, checked strictly)
_FILE_SOURCE: ContextVar[str | None] = ContextVar("peftkit_target_file", default=None)


@contextlib.contextmanager
def reading_file(source: str) -> Iterator[None]:
    """Inside the block, target entries that match no module are warned about (naming ``source``), not refused."""
    token = _FILE_SOURCE.set(source)
    try:
        yield
    finally:
        _FILE_SOURCE.reset(token)


@dataclass(frozen=True)
class Selection:
    target_modules: TargetSpec
    exclude_modules: TargetSpec = None
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    modules_to_save: Sequence[str] = ()


def base_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every module of the base model; an adapter wrapper stands for its base layer."""
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, AdapterLayer):
            yield path, child.inner
            continue
        yield path, child
        yield from base_modules(child, prefix=f"{path}.")


def is_linear(module: nn.Module) -> bool:
    return any(f"{k.__module__}.{k.__qualname__}" in LINEAR_TYPES for k in type(module).__mro__)


def matches(spec: TargetSpec, path: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == entry or path.endswith(f".{entry}") for entry in spec)


def under(path: str, roots: Sequence[str]) -> bool:
    """Whether ``path`` is one of ``roots`` (exact or suffix match) or inside one of them."""
    parts = path.split(".")
    return any(matches(list(roots), ".".join(parts[: i + 1])) for i in range(len(parts)))


def layer_index(path: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    if layers_pattern:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        alternatives = "|".join(re.escape(p) for p in patterns)
        found = re.search(rf"(?:^|\.)(?:{alternatives})\.(\d+)(?:\.|$)", path)
    else:
        found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(found.group(1)) if found else None


def output_head_paths(model: nn.Module) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return set()
    return {path for path, module in base_modules(model) if module is head}


def select(model: nn.Module, selection: Selection, supports: Callable[[nn.Module], bool], method: str) -> list[str]:
    """Paths of the modules to adapt, in model order. Raises ``TargetError`` with close matches."""
    modules = list(base_modules(model))
    spec = selection.target_modules
    if spec == ALL_LINEAR:
        heads = output_head_paths(model)
        candidates = [(p, m) for p, m in modules if is_linear(m) and p not in heads]
    else:
        candidates = [(p, m) for p, m in modules if matches(spec, p)]
        _check_every_entry_matches(spec, modules)

    chosen, unsupported = [], []
    for path, module in candidates:
        if selection.modules_to_save and under(path, selection.modules_to_save):
            continue
        if matches(selection.exclude_modules, path):
            continue
        if selection.layers_to_transform is not None:
            wanted = selection.layers_to_transform
            wanted = {wanted} if isinstance(wanted, int) else set(wanted)
            if layer_index(path, selection.layers_pattern) not in wanted:
                continue
        (chosen if supports(module) else unsupported).append((path, module))

    if not chosen:
        if unsupported:
            kinds = sorted({type(m).__name__ for _, m in unsupported})
            raise TargetError(
                f"target_modules={spec!r} only matched modules that {method} cannot wrap "
                f"({', '.join(kinds)}, e.g. {unsupported[0][0]!r}); target their Linear/Embedding/Conv children instead"
            )
        raise TargetError(
            f"target_modules={spec!r} selected no module after exclude_modules={selection.exclude_modules!r}, "
            f"layers_to_transform={selection.layers_to_transform!r}; layer indices present: "
            f"{sorted({i for p, _ in modules if (i := layer_index(p, selection.layers_pattern)) is not None})}"
        )
    return [path for path, _ in chosen]


def _check_every_entry_matches(spec: TargetSpec, modules: list[tuple[str, nn.Module]]) -> None:
    paths = [p for p, _ in modules]
    entries = [spec] if isinstance(spec, str) else list(spec or [])
    if spec is None or not entries:
        raise TargetError("target_modules is empty: name the modules to adapt, e.g. ['query', 'value'] or 'all-linear'")
    dead = [e for e in entries if not any(matches([e] if not isinstance(spec, str) else e, p) for p in paths)]
    source = _FILE_SOURCE.get()
    if dead and source is not None and len(dead) < len(entries):
        warnings.warn(f"{source}: target_modules entries {dead} match no module of this model; ignored (as PEFT does)",
                      stacklevel=4)
        return
    if dead:
        kind = "regular expression" if isinstance(spec, str) else "target"
        raise TargetError(f"{kind} {dead[0]!r} matches no module of the model{_close_matches(dead[0], paths)}")


def _close_matches(entry: str, paths: Sequence[str]) -> str:
    names = sorted({p.rsplit(".", 1)[-1] for p in paths} | set(paths))
    close = difflib.get_close_matches(entry, names, n=6, cutoff=0.5)
    if not close:
        leaf_names = sorted({p.rsplit(".", 1)[-1] for p in paths if not p.rsplit(".", 1)[-1].isdigit()})
        return f"; module names in this model: {', '.join(leaf_names[:30])}"
    return f"; closest module names: {', '.join(close)}"


def compact(model: nn.Module, targets: Sequence[str], supports: Callable[[nn.Module], bool], modules_to_save=()) -> list[str]:
    """The shortest list form that selects exactly ``targets``: the distinct last names if they suffice,
    else the full paths. Used when writing a config, so that any reader selects the same modules."""
    names = sorted({t.rsplit(".", 1)[-1] for t in targets})
    try:
        again = select(model, Selection(names, modules_to_save=tuple(modules_to_save)), supports, "this method")
    except TargetError:
        again = []
    return names if sorted(again) == sorted(targets) else list(targets)
