"""peftkit: parameter-efficient fine-tuning for any PyTorch model, file-compatible with Hugging Face PEFT.

    import peftkit
    adapted = peftkit.adapt(model, peftkit.LoraConfig(r=8, alpha=16, target_modules=["query", "value"]))
    adapted.save_adapter("out/")            # adapter_config.json + adapter_model.safetensors (PEFT format)
    peftkit.load_adapter(fresh_model, "out/")
"""

from .config import AdapterConfig, ConfigError
from .fast import fast_training
from .io import AdapterFileError
from .methods import Method, available_methods, get_method, register_method, unregister_method
# the built-in methods: importing each module registers it
from .methods.adalora import AdaLoraConfig
from .methods.adapter import AdapterMethod
from .methods.bitfit import BitFitConfig
from .methods.bottleneck import BottleneckConfig
from .methods.dora import DoraConfig
from .methods.full import FullConfig
from .methods.head import HeadConfig
from .methods.lora import LoraConfig
from .model import AdaptedModel, TrainableParameters, adapt, count_parameters, load_adapter
from .names import AdapterExistsError, AdapterNameError, check_adapter_name
from .targets import TargetError
from .version import __version__

__all__ = [
    "AdaLoraConfig", "AdaptedModel", "AdapterMethod", "AdapterConfig", "AdapterExistsError", "AdapterFileError", "AdapterNameError",
    "BitFitConfig", "BottleneckConfig", "ConfigError", "DoraConfig", "FullConfig", "HeadConfig", "LoraConfig", "Method",
    "TargetError", "TrainableParameters", "__version__", "adapt", "available_methods", "check_adapter_name",
    "count_parameters", "fast_training", "get_method", "load_adapter", "register_method", "unregister_method",
]
