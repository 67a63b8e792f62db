"""``rslora-fast info`` and ``rslora-fast selfcheck``: what this install has, and whether it computes right."""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable

import torch

from . import __version__, _native


def collect_info() -> dict:
    """Versions, GPU facts and kernel status as a dict (also used by tests and benches)."""
    import transformers

    info: dict = {
        "rslora_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    _core = _native.core_or_none()
    if _core is None:
        info["core"] = f"not available: {_native.missing_reason()}"
        return info
    info.update({f"core_{k}": v for k, v in _core.cuda_info().items()})
    info["core"] = "loaded"
    driver = info.get("core_driver_version")
    if driver:
        info["driver_cuda"] = f"{driver // 1000}.{driver % 1000 // 10}"
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        name, major, minor = _core.device_info(index)
        info["gpu"] = name
        info["compute_capability"] = f"{major}.{minor}"
        try:
            torch.empty(1, device=f"cuda:{index}")  # make sure torch's primary context exists
            loaded = _core.load_kernels(index)
            info["kernels_loaded"] = ", ".join(loaded)
            info["kernel_source"] = kernel_source(loaded)
        except Exception as exc:  # report, don't crash: this is a diagnostic
            info["kernels_loaded"] = f"UNAVAILABLE: {exc}"
            info["kernel_source"] = "none: ops run their plain-torch paths (slower)"
    return info


def kernel_source(loaded: list[str]) -> str:
    """Where the loaded kernels came from, from ``load_kernels``' ``module:target`` entries."""
    targets = sorted({entry.rpartition(":")[2] for entry in loaded})
    parts = []
    for t in targets:
        if t.startswith("sm_"):
            parts.append(f"embedded SASS {t} (no compile)")
        else:
            parts.append(f"embedded PTX {t}, JIT-compiled by the driver (cached in ~/.nv/ComputeCache)")
    return "; ".join(parts) or "none"


WHAT_TO_DO = (
    "kernels unavailable: training still works through plain-torch paths, slower. The wheel's kernels "
    "need an NVIDIA GPU of compute capability 8.0+ (A100, RTX 30xx/40xx, L4/L40, H100/H200 or newer) "
    "and a driver for CUDA {floor} or newer (Linux driver 550+; `nvidia-smi` shows it): update the "
    "driver. RSLORA_FAST_KERNEL_IMAGE=ptx tries the PTX path; docs/gpu.md lists the rest."
)


def print_info() -> int:
    """Print the info table; returns a process exit code."""
    info = collect_info()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    if not info["cuda_available"]:
        print(
            "no CUDA GPU visible: kernels run only on NVIDIA GPUs; CPU uses the plain-torch reference paths"
        )
    elif str(info.get("kernels_loaded", "")).startswith("UNAVAILABLE"):
        print(WHAT_TO_DO.format(floor=info.get("core_driver_floor", "12.4")))
    return 0


def _selfcheck_swiglu(device: torch.device, dtype: torch.dtype) -> float:
    from .ops.swiglu import swiglu

    g = torch.randn(3, 1021, device=device, dtype=dtype, requires_grad=True)
    u = torch.randn(3, 1021, device=device, dtype=dtype, requires_grad=True)
    h = swiglu(g, u)
    dh = torch.randn_like(h)
    h.backward(dh)
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    ref = torch.nn.functional.silu(g64) * u64
    ref.backward(dh.double())
    errs = [
        (h.double() - ref).norm() / ref.norm(),
        (g.grad.double() - g64.grad).norm() / g64.grad.norm(),
        (u.grad.double() - u64.grad).norm() / u64.grad.norm(),
    ]
    return float(max(errs).detach())


SELFCHECKS: dict[str, Callable[[torch.device, torch.dtype], float]] = {"swiglu": _selfcheck_swiglu}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def selfcheck() -> int:
    """Run every kernel against its float64 reference on the available device; 0 when all pass."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"self-check on {device} ({'our CUDA kernels' if device.type == 'cuda' else 'CPU reference paths'})"
    )
    failed = 0
    for name, check in SELFCHECKS.items():
        for dtype, tol in TOLERANCE.items():
            err = check(device, dtype)
            ok = err <= tol
            failed += not ok
            print(
                f"  {name:<10} {str(dtype):<15} rel.err {err:.2e}  (tol {tol:.0e})  {'ok' if ok else 'FAIL'}"
            )
    print("self-check passed" if not failed else f"self-check FAILED ({failed} case(s))")
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(print_info())
