"""``FastLanguageModel`` / ``FastModel``: the Unsloth-style entry points."""

from __future__ import annotations

from typing import Any


class FastLanguageModel:
    """Load a causal LM (optionally 4-bit) and add LoRA adapters to it."""

    @staticmethod
    def from_pretrained(model_name: str, max_seq_length: int = 2048, dtype: Any = None,
                        load_in_4bit: bool = True, **kwargs: Any):
        """Load ``(model, tokenizer)``; see :func:`rslora_fast.loading.from_pretrained`."""
        from .loading import from_pretrained

        return from_pretrained(model_name, max_seq_length=max_seq_length, dtype=dtype,
                               load_in_4bit=load_in_4bit, **kwargs)

    @staticmethod
    def get_peft_model(model, *args: Any, **kwargs: Any):
        """Inject LoRA adapters; see :func:`rslora_fast.get_peft_model` for every argument."""
        from .peft import get_peft_model

        return get_peft_model(model, *args, **kwargs)


class FastModel(FastLanguageModel):
    """Alias of :class:`FastLanguageModel` for any supported model family."""
