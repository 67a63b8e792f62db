"""Faster forward paths for transformers model families (composed from ``rslora_fast.ops``)."""

from .causal_lm import fused_loss_forward, fused_loss_supported

__all__ = ["fused_loss_forward", "fused_loss_supported"]
