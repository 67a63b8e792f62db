"""What the ops share beyond :mod:`rslora_fast._device`: the gated activations' input check.

The device, stream, dtype and kernel-availability helpers are owned by ``rslora_fast._device``
and the extension by ``rslora_fast._native``; they are re-exported here for the ops that import
them from this module.
"""

from __future__ import annotations

import torch

from .._device import (  # noqa: F401 - re-exported for the ops
    KERNEL_DTYPES,
    KernelsFallbackWarning,
    dtype_name,
    kernel_status,
    on_gpu,
    stream_of,
    use_kernels,
)
from .._native import core  # noqa: F401 - re-exported for the ops


def check_gate_up(g: torch.Tensor, u: torch.Tensor, op: str) -> None:
    """The gated activations' (SwiGLU, GeGLU) input check: same shape, dtype and device."""
    if g.shape != u.shape:
        raise ValueError(f"{op}: gate shape {tuple(g.shape)} and up shape {tuple(u.shape)} differ")
    if g.dtype != u.dtype:
        raise ValueError(f"{op}: gate dtype {g.dtype} and up dtype {u.dtype} differ")
    if g.device != u.device:
        raise ValueError(f"{op}: gate on {g.device} and up on {u.device}")
