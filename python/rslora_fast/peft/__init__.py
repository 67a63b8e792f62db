"""LoRA adapters with HF PEFT semantics and file format: ``get_peft_model``, ``PeftModel``, ``LoraConfig``."""

from __future__ import annotations

from .config import LoraConfig
from .layer import LoraLinear, ModulesToSaveWrapper
from .model import PeftModel, get_peft_model

__all__ = ["LoraConfig", "LoraLinear", "ModulesToSaveWrapper", "PeftModel", "get_peft_model"]
