"""Bottleneck adapters: Houlsby (after attention and after the feed-forward), Pfeiffer (after the feed-forward),
parallel (beside the feed-forward, He et al. 2022).

Placement is by module names, with defaults for BERT/RoBERTa-style encoders, GPT-2 and LLaMA-style decoders;
``target_modules`` places sequential adapters anywhere else. Optionally the LayerNorms train too (saved with the
adapter). Saved as ``adapter_config.json`` (``peft_type: BOTTLENECK``) + ``adapter_model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from torch import nn

from ..config import AdapterConfig, option, require
from ..layers.base import find_layer
from ..layers.bitfit import DeltaForm
from ..layers.modules_to_save import ModulesToSave
from ..layers.bottleneck import ACTIVATIONS, BottleneckLayer
from ..targets import TargetError, TargetSpec, base_modules, matches
from .adapter import AdapterMethod
from .registry import Injection, register_method
from ..tree import set_submodule
from .common import add_bias_deltas, add_modules_to_save, resolve_modules_to_save, task_of

VARIANTS = ("houlsby", "pfeiffer", "parallel")

# (attention output, feed-forward output, feed-forward module for "parallel", its input's source module or None)
_ENCODER = (r".*\.layer\.\d+\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense",
            r".*\.layer\.\d+\.output\.dense", ("output.dense", "intermediate"))
_LLAMA = (r".*\.layers\.\d+\.self_attn\.o_proj", r".*\.layers\.\d+\.mlp\.down_proj", r".*\.layers\.\d+\.mlp", None)
PLACEMENTS: dict[str, tuple] = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "camembert", "electra"], _ENCODER),
    "gpt2": (r".*\.h\.\d+\.attn\.c_proj", r".*\.h\.\d+\.mlp\.c_proj", r".*\.h\.\d+\.mlp", None),
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"], _LLAMA),
}


@dataclasses.dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    method = "bottleneck"

    variant: str = option("pfeiffer", "placement: houlsby (after attention and feed-forward), pfeiffer (after "
                                      "feed-forward), parallel (beside the feed-forward)")
    reduction_factor: int = option(16, "bottleneck size = hidden size / reduction_factor")
    nonlinearity: str = option("relu", "between the two projections: relu, gelu, silu or tanh")
    scaling: float | None = option(None, "output scale (default 1; 4 for parallel, as He et al.)")
    target_modules: TargetSpec = option(None, "modules to adapt instead of the default placement: adapters after them (houlsby/pfeiffer) or beside them, reading their input (parallel: input and output widths must be equal)")
    train_layer_norms: bool = option(False, "also train the LayerNorms (saved with the adapter)")
    modules_to_save: Sequence[str] | None = option(None, "modules trained whole and saved with the adapter (the "
                                                   "task head is added by itself)")

    def __post_init__(self) -> None:
        require(self.variant in VARIANTS, f"variant must be one of {VARIANTS}, got {self.variant!r}")
        require(isinstance(self.reduction_factor, int) and self.reduction_factor >= 1,
                f"reduction_factor must be a positive integer, got {self.reduction_factor!r}")
        require(self.nonlinearity in ACTIVATIONS, f"nonlinearity must be one of {tuple(ACTIVATIONS)}, got {self.nonlinearity!r}")

    @property
    def scale(self) -> float:
        return self.scaling if self.scaling is not None else (4.0 if self.variant == "parallel" else 1.0)


class BottleneckMethod(AdapterMethod):
    name = "bottleneck"
    config_cls = BottleneckConfig
    peft_type = "BOTTLENECK"
    default_lr = 1e-3
    reserved_names = frozenset({"adapter_down", "adapter_up"})

    def inject(self, model: nn.Module, config: BottleneckConfig, adapter_name: str) -> Injection:
        saved = resolve_modules_to_save(model, config.modules_to_save)
        placements = self._placements(model, config)
        paths = dict(base_modules(model))
        targets = []
        for path, source in placements:
            if config.variant == "parallel" and source is None:
                _check_square(path, paths[path])
            layer = self._wrap(model, path, paths[path], source)
            width = layer.width
            layer.add_adapter(adapter_name, max(1, width // config.reduction_factor), config.nonlinearity,
                              config.scale, parallel=config.variant == "parallel")
            targets.append(path)
        add_modules_to_save(model, saved, adapter_name)
        if config.train_layer_norms:  # a per-adapter change of each LayerNorm, saved as its full weight and bias
            norms = [p for p, m in base_modules(model) if isinstance(m, nn.LayerNorm) and m.elementwise_affine
                     and m.bias is not None and not _under(p, saved)]
            add_bias_deltas(model, adapter_name, norms,
                            dict.fromkeys(norms, DeltaForm(bias_key="bias", weight_key="weight", full=True)))
        return Injection(targets=targets, saved_modules=saved, task_type=task_of(model)[0])

    def _placements(self, model: nn.Module, config: BottleneckConfig) -> list[tuple[str, str | None]]:
        modules = [p for p, _ in base_modules(model)]
        if config.target_modules is not None:
            chosen = [(p, None) for p in modules if matches(config.target_modules, p)]
            if not chosen:
                raise TargetError(f"bottleneck target_modules={config.target_modules!r} matches no module")
            return chosen
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in PLACEMENTS:
            raise TargetError(
                f"no default adapter placement for model_type {model_type!r}; name the modules after which adapters go "
                f"with target_modules (known: {', '.join(sorted(PLACEMENTS))})"
            )
        attention, ffn, parallel, source = PLACEMENTS[model_type]
        patterns = {"houlsby": [attention, ffn], "pfeiffer": [ffn], "parallel": [parallel]}[config.variant]
        chosen = []
        for path in modules:
            if any(re.fullmatch(p, path) for p in patterns):
                src = None
                if config.variant == "parallel" and source is not None:
                    src = path[: -len(source[0])] + source[1]
                chosen.append((path, src))
        if not chosen:
            raise TargetError(f"the default {config.variant} placement for {model_type!r} matched no module")
        return chosen

    @staticmethod
    def _wrap(model: nn.Module, path: str, module: nn.Module, source: str | None) -> BottleneckLayer:
        current = model.get_submodule(path)
        existing = find_layer(current, BottleneckLayer)
        if existing is not None:
            return existing
        if isinstance(current, ModulesToSave):
            raise TargetError(f"module {path!r} is trained whole (modules_to_save); a bottleneck adapter cannot wrap it")
        width = _output_width(module)  # around other adapter layers (LoRA, BitFit): they nest
        layer = BottleneckLayer(current, width)
        set_submodule(model, path, layer)
        if source is not None:
            layer._source_hook = model.get_submodule(source).register_forward_pre_hook(layer.capture_source)
        return layer


def _under(path: str, roots) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def _check_square(path: str, module: nn.Module) -> None:
    """A parallel adapter reads the module's input and adds to its output: both must have the same width."""
    width_in, width_out = _input_width(module), _output_width(module)
    if width_in is not None and width_in != width_out:
        raise TargetError(
            f"a parallel bottleneck adapter on {path!r} would read its input ({width_in} features) and add to its "
            f"output ({width_out}); target a module whose input and output widths are equal (e.g. a whole "
            "feed-forward block), or use variant pfeiffer or houlsby"
        )


def _input_width(module: nn.Module) -> int | None:
    for attribute in ("in_features", "nx", "in_channels", "num_embeddings"):
        if isinstance(getattr(module, attribute, None), int):
            return getattr(module, attribute)
    for child in module.modules():  # e.g. an MLP block: the width of its first projection
        if child is not module and (isinstance(child, nn.Linear) or type(child).__name__ == "Conv1D"):
            return _input_width(child)
    return None


def _output_width(module: nn.Module) -> int:
    for attribute in ("out_features", "nf", "out_channels", "embedding_dim"):
        if isinstance(getattr(module, attribute, None), int):
            return getattr(module, attribute)
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2:
        return weight.shape[1] if type(module).__name__ == "Conv1D" else weight.shape[0]
    for child in reversed(list(module.modules())):  # e.g. an MLP block: the width of its last projection
        if child is not module and (isinstance(child, nn.Linear) or type(child).__name__ == "Conv1D"):
            return _output_width(child)
    raise TargetError(f"cannot tell the output width of {type(module).__name__}; target a Linear layer instead")


register_method(BottleneckMethod())
