"""rslora_fast: fast, lean LoRA / QLoRA fine-tuning of Hugging Face language models.

Public API::

    from rslora_fast import FastLanguageModel
    model, tokenizer = FastLanguageModel.from_pretrained("path/or/hub-id", load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16)

The Rust extension (``rslora_fast._core``) is imported lazily by the pieces that need it, so
``import rslora_fast`` stays cheap and works for the pure-Python parts even in a source tree.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .compat import PatchDPOTrainer, PatchFastRL, is_bfloat16_supported  # noqa: E402
from .errors import RsloraError  # noqa: E402
from .fast_language_model import FastLanguageModel, FastModel  # noqa: E402
from .peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from .trl_compat import install as _install_trl_compat  # noqa: E402

# Scripts written for Unsloth build TRL trainers with older keywords; see trl_compat.
_install_trl_compat()

__all__ = [
    "FastLanguageModel",
    "FastModel",
    "LoraConfig",
    "PatchDPOTrainer",
    "PatchFastRL",
    "PeftModel",
    "RsloraError",
    "get_peft_model",
    "is_bfloat16_supported",
    "__version__",
]
