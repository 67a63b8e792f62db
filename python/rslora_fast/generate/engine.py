"""The fast decode engine: static KV cache, the per-token step captured as a CUDA graph.

Being built; until then every model takes the plain engine (``why_not_fast`` says so).
"""

from __future__ import annotations

from torch import nn


def why_not_fast(model: nn.Module) -> str | None:
    """Why ``model`` cannot use :class:`FastEngine` (None when it can)."""
    return "the fast decode engine is not built in this version"


class FastEngine:
    """Implements :class:`rslora_fast.generate.base.Engine` for the llama family."""

    def __init__(self, model: nn.Module, max_batch: int, max_length: int) -> None:
        raise NotImplementedError(why_not_fast(model))
