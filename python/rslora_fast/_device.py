"""Where an op runs: device, stream, dtype, and whether our CUDA kernels loaded there.

The one owner of kernel availability for every package that launches kernels (``ops``, ``quant``,
``generate``). Python hands Rust plain integers: ``data_ptr()``, element counts, the dtype name,
the device index and the raw handle of PyTorch's current stream on that device.

Every op asks :func:`use_kernels` before launching. The first time a device is asked, every kernel
module is loaded on it; when that fails (no extension, a driver older than the floor, a GPU older
than sm_80, ``RSLORA_FAST_KERNEL_IMAGE=off``) ONE warning says why and what it costs, and every op
on that device runs its plain-torch path from then on (docs/gpu.md, "When kernels do not load").
"""

from __future__ import annotations

import threading
import warnings

import torch

from . import _native
from .errors import RsloraError

KERNEL_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class KernelsFallbackWarning(UserWarning):
    """Our CUDA kernels could not be loaded; ops run their plain-torch paths instead."""


FALLBACK_COST = (
    "each op runs 2-25x slower than its kernel (measured per op on an H200, docs/benchmarks.md), "
    "so expect training steps roughly 1.3-2x slower and more activation memory (an estimate)"
)

_ready: dict[int, bool] = {}  # device index -> whether our kernels loaded there
_ready_lock = threading.Lock()
_warned = False


def on_gpu(t: torch.Tensor) -> bool:
    """Whether ``t`` lives where our kernels would run (a CUDA device)."""
    return t.device.type == "cuda"


def device_index(t: torch.Tensor) -> int:
    """The CUDA device index of ``t`` (the current device for a bare ``cuda`` device)."""
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def use_kernels(t: torch.Tensor) -> bool:
    """Whether an op on ``t`` launches our CUDA kernel (else it runs its plain-torch path).

    True for a CUDA tensor on a device where every kernel module loaded; the first failure to load
    warns once per process (:class:`KernelsFallbackWarning`) with the reason and the cost.
    """
    if not on_gpu(t):
        return False
    index = device_index(t)
    ready = _ready.get(index)
    return ready if ready is not None else _load(index)


def _load(index: int) -> bool:
    global _warned
    with _ready_lock:
        if index in _ready:
            return _ready[index]
        try:
            _native.core().load_kernels(index)
            _ready[index] = True
        except RsloraError as exc:  # KernelsUnavailableError, CudaError: report, never crash
            _ready[index] = False
            if not _warned:
                _warned = True
                warnings.warn(
                    f"rslora_fast: CUDA kernels unavailable on cuda:{index}: {exc}. Every op now runs "
                    f"its plain-torch path (same results): {FALLBACK_COST}. `rslora-fast info` shows "
                    "the driver, the shipped targets and what to do.",
                    KernelsFallbackWarning,
                    stacklevel=4,
                )
        return _ready[index]


def kernel_status() -> dict[int, bool]:
    """Devices asked so far and whether our kernels run there (for ``rslora-fast info``)."""
    return dict(_ready)


def dtype_name(t: torch.Tensor, op: str) -> str:
    """The kernel dtype name of ``t``, or a ValueError naming the op and the accepted dtypes."""
    try:
        return KERNEL_DTYPES[t.dtype]
    except KeyError:
        accepted = ", ".join(str(d) for d in KERNEL_DTYPES)
        raise ValueError(
            f"{op}: dtype {t.dtype} is not supported on CUDA; expected one of {accepted}"
        ) from None


def raw_stream(index: int) -> int:
    """The raw handle of torch's current stream on device ``index``."""
    return torch.cuda.current_stream(index).cuda_stream


if hasattr(torch._C, "_cuda_getCurrentRawStream"):  # CUDA builds: no Stream object per call
    raw_stream = torch._C._cuda_getCurrentRawStream  # noqa: F811


def stream_of(t: torch.Tensor) -> tuple[int, int]:
    """(device index, raw handle of torch's current stream on that device)."""
    index = device_index(t)
    return index, raw_stream(index)
