"""A causal LM in memory with many adapters on it, for the OpenAI-compatible server (``openai_api.py``).

Adapters are folders under one directory, as for classification (``ServedModel``: paths confined to it, only
safetensors, an adapter of another base refused): plain PEFT-format adapter folders, or run folders
(``config.yaml`` + ``adapter/``) of the causal-lm task.
"""

from __future__ import annotations

import threading
from pathlib import Path

from ..fingerprint import base_fingerprint
from ..io import AdapterFileError
from ..model import AdaptedModel
from .model import AdapterConflict, AdapterInfo, BadAdapterRequest, ServedModel

CAUSAL_TASK = "causal-lm"


class ServedLM(ServedModel):
    """``ServedModel``'s adapter directory, loading and unloading, over ``AutoModelForCausalLM``."""

    def __init__(self, base_path: str | Path, adapter_root: str | Path, context_length: int | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..train.setup import resolve_model

        # SEAM (causal-lm task): names such as `smollm2` resolve here once the task registers them in resolve_model
        self.base_path = resolve_model(str(base_path))
        self.root = Path(adapter_root).resolve()
        if not self.root.is_dir():
            raise BadAdapterRequest(f"adapter directory {adapter_root} does not exist")
        self.task = None
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        base = AutoModelForCausalLM.from_pretrained(self.base_path)
        self.model = AdaptedModel(base).eval()
        self.fingerprint = base_fingerprint(base)
        self.context_length = context_length
        self.max_length = context_length
        self.base_labels, self.settings = None, {}
        self.lock = threading.RLock()
        self.adapters: dict[str, AdapterInfo] = {}
        self.on_forward = None

    def _load(self, name: str, path: str | Path) -> AdapterInfo:
        run, adapter_dir = self._adapter_folder(path)
        method = None
        if run.config_file.is_file():  # a run folder of `peftkit train`
            import yaml

            stored = yaml.safe_load(self._confined(run.config_file).read_text(encoding="utf-8")) or {}
            if stored.get("task") != CAUSAL_TASK:
                raise AdapterConflict(f"adapter {name!r} was trained for the task {stored.get('task', 'classification')!r};"
                                      f" this server generates text ({CAUSAL_TASK})")
            method = stored.get("method")
        with self.lock:
            try:
                self.model.load_adapter(adapter_dir, name, check_base=True)
            except (AdapterFileError, BadAdapterRequest):
                raise
            except (KeyError, TypeError, ValueError, NotImplementedError) as err:
                raise BadAdapterRequest(f"adapter {name!r} cannot be loaded: {err}") from None
            self.model.eval()  # no dropout while serving
            record = self.model.adapters[name]
        info = AdapterInfo(name, str(run.path), method or record.method.name, [])
        self.adapters[name] = info
        return info
