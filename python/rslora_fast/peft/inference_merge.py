"""Merging every LoRA adapter of a model into its dense base for generation, and undoing it.

The state lives on each :class:`~rslora_fast.peft.layer.LoraLinear` (``merged`` and the kept
original weight); these functions only walk the model. Merging is all or nothing: a model with any
4-bit base is refused before anything changes, and a failure part-way undoes what was merged.
"""

from __future__ import annotations

import logging

from torch import nn

from .layer import LoraLinear

log = logging.getLogger(__name__)


def _adapters(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear) and not m.disabled]


def merge_for_inference(model: nn.Module) -> int:
    """Merge every enabled adapter of ``model`` into its base; returns how many were merged.

    Raises:
        ValueError: some adapter has a 4-bit base (naming it); nothing is changed.
    """
    layers = _adapters(model)
    four_bit = [name for name, m in layers if m.is_4bit]
    if four_bit:
        raise ValueError(
            f"for_inference(merge_lora=True): {len(four_bit)} LoRA layers have a 4-bit base (first: "
            f"{four_bit[0]}); merging would requantize the base and change it for good. Generate with "
            "merge_lora=False (the fast path reads the adapter unmerged), or write a merged copy with "
            "save_pretrained_merged(..., save_method='merged_4bit')"
        )
    todo = [m for _, m in layers if not m.merged]
    kept = 0
    try:
        for m in todo:
            kept += m.merge_for_inference()
    except BaseException:
        unmerge_after_inference(model)
        raise
    if todo:
        log.info(
            "for_inference: merged %d LoRA adapters into their bases; their original weights (%.2f GiB) "
            "are kept in host memory until for_training",
            len(todo),
            kept / 2**30,
        )
    return len(todo)


def unmerge_after_inference(model: nn.Module) -> int:
    """Restore every base that :func:`merge_for_inference` changed; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, LoraLinear) and "_unmerged_weight" in m.__dict__]
    for m in layers:
        m.unmerge()
    return len(layers)
