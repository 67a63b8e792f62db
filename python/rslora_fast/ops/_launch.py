"""Shared plumbing for ops that launch our CUDA kernels through ``rslora_fast._core``.

Python hands Rust plain integers: ``data_ptr()``, element counts, the dtype name, the device index
and the raw handle of PyTorch's current stream on that device (design.md §3.4).
"""

from __future__ import annotations

import functools

import torch

from ..errors import KernelsUnavailableError

KERNEL_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@functools.cache
def core():
    """The compiled extension, or a clear error when this is a source tree without it."""
    try:
        from .. import _core
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise KernelsUnavailableError(
            "rslora_fast._core is not built; install the package (pip install .) or run `maturin develop`"
        ) from exc
    return _core


def dtype_name(t: torch.Tensor, op: str) -> str:
    """The kernel dtype name of ``t``, or a ValueError naming the op and the accepted dtypes."""
    try:
        return KERNEL_DTYPES[t.dtype]
    except KeyError:
        accepted = ", ".join(str(d) for d in KERNEL_DTYPES)
        raise ValueError(
            f"{op}: dtype {t.dtype} is not supported on CUDA; expected one of {accepted}"
        ) from None


def stream_of(t: torch.Tensor) -> tuple[int, int]:
    """(device index, raw handle of torch's current stream on that device)."""
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(index).cuda_stream


def check_gate_up(g: torch.Tensor, u: torch.Tensor, op: str) -> None:
    """The gated activations' (SwiGLU, GeGLU) input check: same shape, dtype and device."""
    if g.shape != u.shape:
        raise ValueError(f"{op}: gate shape {tuple(g.shape)} and up shape {tuple(u.shape)} differ")
    if g.dtype != u.dtype:
        raise ValueError(f"{op}: gate dtype {g.dtype} and up dtype {u.dtype} differ")
    if g.device != u.device:
        raise ValueError(f"{op}: gate on {g.device} and up on {u.device}")
