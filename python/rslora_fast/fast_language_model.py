"""``FastLanguageModel`` / ``FastModel``: the Unsloth-style entry points."""

from __future__ import annotations

from typing import Any

from torch import nn

from .checkpointing import apply_gradient_checkpointing
from .peft import get_peft_model as _get_peft_model


def _inner(model: nn.Module) -> nn.Module:
    """The transformers model inside a :class:`~rslora_fast.PeftModel` (or ``model`` itself)."""
    if hasattr(model, "peft_config") and hasattr(model, "base_model"):
        return model.base_model.model
    return model


def _set_use_cache(model: nn.Module, value: bool) -> None:
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "use_cache"):
            cfg.use_cache = value


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

    @staticmethod
    def for_inference(model: nn.Module) -> nn.Module:
        """Switch a model to generation: checkpointing off, dropout off, KV cache on.

        Gradient checkpointing is removed (it only costs time without a backward pass and
        transformers turns the cache off under it), ``model.eval()`` disables every dropout (LoRA's
        included), and ``use_cache`` is set to True on the config and the generation config.
        :meth:`for_training` restores the checkpointing mode that was configured.

        Args:
            model: a :class:`~rslora_fast.PeftModel` or a transformers model.

        Returns:
            ``model`` itself (changed in place), for chaining.
        """
        inner = _inner(model)
        was_on = bool(getattr(inner, "is_gradient_checkpointing", False))
        if was_on:
            # The configured mode is kept by get_peft_model; for other models remember that it was on.
            if getattr(model, "_gradient_checkpointing", None) is None:
                model.__dict__["_gradient_checkpointing"] = {"mode": True, "use_reentrant": False}
            apply_gradient_checkpointing(inner, False)
        _set_use_cache(inner, True)
        model.eval()
        return model

    @staticmethod
    def for_training(model: nn.Module) -> nn.Module:
        """Switch a model back to training: configured checkpointing on, dropout on, KV cache off.

        The checkpointing mode is the one given to :func:`~rslora_fast.get_peft_model` (or enabled
        later through ``gradient_checkpointing_enable``); ``model.train()`` re-enables dropout, and
        ``use_cache`` is set to False (a cache is useless in training and conflicts with
        checkpointing).

        Args:
            model: a :class:`~rslora_fast.PeftModel` or a transformers model.

        Returns:
            ``model`` itself (changed in place), for chaining.
        """
        inner = _inner(model)
        cfg = getattr(model, "_gradient_checkpointing", None) or {}
        mode = cfg.get("mode", False)
        if mode is not False and not getattr(inner, "is_gradient_checkpointing", False):
            apply_gradient_checkpointing(
                inner,
                mode,
                cfg.get("max_seq_length", 2048),
                use_reentrant=bool(cfg.get("use_reentrant", False)),
                max_memory_gb=cfg.get("max_memory_gb"),
            )
        _set_use_cache(inner, False)
        model.train()
        return model


class FastModel(FastLanguageModel):
    """Alias of :class:`FastLanguageModel` for any supported model family."""
