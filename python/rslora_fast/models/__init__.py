"""Faster forward paths for transformers model families (composed from ``rslora_fast.ops``)."""

from .causal_lm import fused_loss_forward, fused_loss_supported
from .fast_decoder import install_fast_decoder, uninstall_fast_decoder

__all__ = ["fused_loss_forward", "fused_loss_supported", "install_fast_decoder", "uninstall_fast_decoder"]
