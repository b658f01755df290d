"""Adapter names: which names an adapter may have (they become dictionary keys inside layers and folder names)."""

from __future__ import annotations

from typing import Iterable

from .methods.registry import reserved_names

#: longest adapter name: names become folder names (save_adapter) and file systems allow 255 bytes
MAX_NAME_LENGTH = 100


class AdapterNameError(ValueError):
    """An adapter name that cannot be used (invalid, reserved, too long, or taken)."""


class AdapterExistsError(AdapterNameError):
    """An adapter of that name is already there."""


def check_adapter_name(name: str, existing: Iterable[str] = ()) -> None:
    """Raise ``AdapterNameError`` for a name an adapter may not have, ``AdapterExistsError`` if ``existing`` has it."""
    if isinstance(name, str) and len(name) > MAX_NAME_LENGTH:
        raise AdapterNameError(f"adapter name {name[:20]!r}... has {len(name)} characters; the limit is {MAX_NAME_LENGTH}")
    if not isinstance(name, str) or not name or "." in name or not name.replace("-", "_").isidentifier():
        raise AdapterNameError(f"adapter name {name!r} is not valid: use letters, digits, '_' or '-', without dots")
    reserved = reserved_names()
    prefixes = tuple(r[:-1] for r in reserved if r.endswith("*"))
    if name in reserved or name.startswith(prefixes):
        raise AdapterNameError(
            f"adapter name {name!r} collides with the names peftkit uses for parameters and modules "
            f"({', '.join(sorted(reserved))}); choose another name"
        )
    if name in existing:
        raise AdapterExistsError(f"an adapter named {name!r} already exists; delete_adapter({name!r}) first or pick "
                                 "another name")
