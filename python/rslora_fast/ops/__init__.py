"""Our kernels as ``torch.library`` custom ops (CUDA through ``_core``, CPU through plain torch)."""

from .swiglu import swiglu

__all__ = ["swiglu"]
