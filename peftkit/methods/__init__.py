"""Methods: the registry (``registry.py``: the ``Method`` base class and its lookups), the base of the adapter
methods (``adapter.py``), and one module per method. See ``registry.py`` for what a method entry carries."""

from .registry import (  # noqa: F401
    CORE_RESERVED_NAMES,
    Injection,
    Method,
    register_method,
    unregister_method,
    registered,
    artifact_dirs,
    get_method,
    method_for_config,
    method_for_peft_type,
    available_methods,
    reserved_names,
    help_of
)
