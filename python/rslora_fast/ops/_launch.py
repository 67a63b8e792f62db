"""What the ops share beyond :mod:`rslora_fast._device`: the gated activations' (SwiGLU, GeGLU)
input check, kernel launches and fake backward.

The device, stream, dtype and kernel-availability helpers are owned by ``rslora_fast._device``
and the extension by ``rslora_fast._native``; they are re-exported here for the ops that import
them from this module.
"""

from __future__ import annotations

import torch

from .._device import (  # noqa: F401 - some only re-exported for the ops
    KERNEL_DTYPES,
    KernelsFallbackWarning,
    dtype_name,
    kernel_status,
    on_gpu,
    stream_of,
    use_kernels,
)
from .._native import core  # noqa: F401 - also re-exported for the ops


def check_gate_up(g: torch.Tensor, u: torch.Tensor, op: str) -> None:
    """The gated activations' (SwiGLU, GeGLU) input check: same shape, dtype and device."""
    if g.shape != u.shape:
        raise ValueError(f"{op}: gate shape {tuple(g.shape)} and up shape {tuple(u.shape)} differ")
    if g.dtype != u.dtype:
        raise ValueError(f"{op}: gate dtype {g.dtype} and up dtype {u.dtype} differ")
    if g.device != u.device:
        raise ValueError(f"{op}: gate on {g.device} and up on {u.device}")


def launch_gated_fwd(launcher: str, op: str, g: torch.Tensor, u: torch.Tensor, *extra) -> torch.Tensor:
    """A gated activation's forward kernel, ``core().<launcher>(g, u, h, n, dtype, *extra, device,
    stream)`` on contiguous inputs; returns ``h``."""
    g, u = g.contiguous(), u.contiguous()
    h = torch.empty_like(g)
    device, stream = stream_of(g)
    getattr(core(), launcher)(
        g.data_ptr(), u.data_ptr(), h.data_ptr(), g.numel(), dtype_name(g, op), *extra, device, stream
    )
    return h


def launch_gated_bwd(
    launcher: str, op: str, dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, *extra
) -> tuple[torch.Tensor, torch.Tensor]:
    """A gated activation's backward kernel, ``core().<launcher>(dh, g, u, dg, du, n, dtype, *extra,
    device, stream)`` on contiguous inputs; returns ``(dg, du)``."""
    dh, g, u = dh.contiguous(), g.contiguous(), u.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    device, stream = stream_of(g)
    getattr(core(), launcher)(
        dh.data_ptr(),
        g.data_ptr(),
        u.data_ptr(),
        dg.data_ptr(),
        du.data_ptr(),
        g.numel(),
        dtype_name(g, op),
        *extra,
        device,
        stream,
    )
    return dg, du


def gated_bwd_fake(g: torch.Tensor, u: torch.Tensor):
    """What a gated activation's backward returns, for the fake (meta) kernels: ``(dg, du)``."""
    return (
        torch.empty_like(g, memory_format=torch.contiguous_format),
        torch.empty_like(u, memory_format=torch.contiguous_format),
    )
