"""Fast generation after training and inside RL loops (the decode path).

A room of its own: training code never imports from here. ``matvec`` holds the projections of a
decode step (4-bit weights read without materializing them in 16-bit, LoRA unmerged); ``engine``
holds the static KV cache and the captured per-token step; ``reference_engine`` the plain engine
(the model's own forward); ``select`` picks one; ``loop`` turns HF's ``generate`` keywords into
engine calls.

The switch: :func:`enable` (what ``FastLanguageModel.for_inference`` calls) routes a transformers
model's ``generate`` through :func:`fast_generate`; :func:`disable` (``for_training``) restores HF's
and frees the engine. :func:`route` is what our ``PeftModel.generate`` calls: it also takes the fast
path for a call made without gradients (TRL's ``GRPOTrainer`` generating in train mode).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .loop import ENV, MODES, fast_generate, mode
from .select import release

__all__ = ["ENV", "MODES", "disable", "enable", "enabled", "fast_generate", "mode", "release", "route"]


class _Switched:
    """``model.generate`` while switched: :func:`fast_generate` on the model (copies and pickles with it)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return fast_generate(self.model, *args, **kwargs)


def enable(model: nn.Module) -> None:
    """Make ``model.generate`` (a transformers model) go through :func:`fast_generate`."""
    model.__dict__["generate"] = _Switched(model)


def enabled(model: nn.Module) -> bool:
    """Whether :func:`enable` is in effect on ``model``."""
    return isinstance(model.__dict__.get("generate"), _Switched)


def disable(model: nn.Module) -> None:
    """Restore HF ``generate`` on ``model`` and free its fast engine (the KV cache)."""
    if enabled(model):
        del model.__dict__["generate"]
    release(model)


def route(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``model.generate(...)``, through the fast path when enabled or when called without gradients."""
    if enabled(model) or not torch.is_grad_enabled():
        return fast_generate(model, *args, **kwargs)
    return model.generate(*args, **kwargs)
