"""Where a transformers decoder model keeps its list of decoder layers."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["find_decoder_layers"]

_LAYER_PATHS = (
    "model.layers",
    "layers",
    "model.decoder.layers",
    "decoder.layers",
    "transformer.h",
    "transformer.layers",
    "gpt_neox.layers",
    "model.language_model.layers",
    "language_model.model.layers",
)


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the ``nn.ModuleList`` of decoder layers of a transformers decoder model.

    Looks at the usual places (``model.model.layers``, ``model.layers``, ``transformer.h``,
    ``gpt_neox.layers``, ...) through PEFT-style wrappers, then falls back to the longest
    ``ModuleList`` whose items are all of one class.

    Raises:
        ValueError: when no such list exists.
    """
    inner = getattr(model, "get_base_model", None)  # PEFT-style wrappers
    base = inner() if callable(inner) else model
    for path in _LAYER_PATHS:
        obj: Any = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    best: nn.ModuleList | None = None
    for mod in base.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if len({type(m) for m in mod}) == 1 and (best is None or len(mod) > len(best)):
                best = mod
    if best is None:
        raise ValueError(f"{type(model).__name__}: no nn.ModuleList of decoder layers found")
    return best
