"""peftkit: parameter-efficient fine-tuning for any PyTorch model, file-compatible with Hugging Face PEFT.

    import peftkit
    adapted = peftkit.adapt(model, peftkit.LoraConfig(r=8, alpha=16, target_modules=["query", "value"]))
    adapted.save_adapter("out/")            # adapter_config.json + adapter_model.safetensors (PEFT format)
    peftkit.load_adapter(fresh_model, "out/")
"""

from .config import AdapterConfig, ConfigError
from .fast import fast_training
from .io import AdapterFileError
from .methods import available_methods, get_method, register_method
from .methods.adalora import AdaLoraConfig
from .methods.bitfit import BitFitConfig
from .methods.bottleneck import BottleneckConfig
from .methods.head import HeadConfig
from .methods.lora import LoraConfig
from .model import AdaptedModel, TrainableParameters, adapt, load_adapter
from .targets import TargetError
from .version import __version__

__all__ = [
    "AdaLoraConfig", "AdaptedModel", "BitFitConfig", "BottleneckConfig", "AdapterConfig", "AdapterFileError", "ConfigError", "HeadConfig", "LoraConfig", "TargetError",
    "TrainableParameters", "__version__", "adapt", "available_methods", "fast_training", "get_method", "load_adapter",
    "register_method",
]
