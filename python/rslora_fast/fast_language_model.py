"""``FastLanguageModel`` / ``FastModel``: the Unsloth-style entry points."""

from __future__ import annotations

from typing import Any

from .peft import get_peft_model as _get_peft_model


class FastLanguageModel:
    """Load a causal LM (optionally 4-bit) and add LoRA adapters to it."""

    @staticmethod
    def from_pretrained(
        model_name: str,
        max_seq_length: int = 2048,
        dtype: Any = None,
        load_in_4bit: bool = True,
        **kwargs: Any,
    ):
        """Load ``(model, tokenizer)``; see :func:`rslora_fast.loading.from_pretrained`."""
        from .loading import from_pretrained

        return from_pretrained(
            model_name, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit, **kwargs
        )

    #: :func:`rslora_fast.get_peft_model`, with its full signature and docstring.
    get_peft_model = staticmethod(_get_peft_model)


class FastModel(FastLanguageModel):
    """Alias of :class:`FastLanguageModel` for any supported model family."""
