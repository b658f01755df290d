"""DoRA (Liu et al. 2024) as a method of its own: LoRA plus a learned magnitude per output row.

Its config is ``LoraConfig`` with ``use_dora`` always true; its files are LoRA files (``peft_type: LORA``,
``use_dora: true``), so they are read back through the ``lora`` method, as Hugging Face PEFT reads them.
"""

from __future__ import annotations

import dataclasses

from ..config import option, require
from .registry import register_method
from .lora import LoraConfig, LoraMethod


@dataclasses.dataclass(frozen=True)
class DoraConfig(LoraConfig):
    """LoRA settings with DoRA's magnitude vector (``use_dora`` cannot be turned off: use ``LoraConfig``)."""

    method = "dora"

    use_dora: bool = option(True, "always true for method dora (use method lora for plain LoRA)")

    def __post_init__(self) -> None:
        require(self.use_dora is True, "use_dora: false would train plain LoRA under the name dora; use method lora "
                                       "(LoraConfig) instead, or drop use_dora")
        super().__post_init__()


class DoraMethod(LoraMethod):
    name = "dora"
    config_cls = DoraConfig
    reads_files = False  # its files are LoRA files with use_dora: true, read by the lora method
    reserved_names = frozenset()  # the same as LoRA's


register_method(DoraMethod())
