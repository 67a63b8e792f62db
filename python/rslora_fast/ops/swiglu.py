"""SwiGLU ``h = silu(g) * u`` as a ``torch.library`` custom op with autograd and a fake kernel.

CUDA tensors run ``kernels/swiglu.cu`` through the Rust launcher; CPU tensors run the plain-torch
expression (the reference). Non-contiguous inputs are made contiguous (one copy) rather than rejected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._launch import check_gate_up, gated_bwd_fake, launch_gated_bwd, launch_gated_fwd, use_kernels


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Plain-torch SwiGLU, computed in float32 and cast back (what the kernel must match)."""
    return (F.silu(g.float()) * u.float()).to(g.dtype)


def swiglu_backward_reference(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor):
    """Plain-torch gradients (dg, du) of SwiGLU, in float32 and cast back."""
    gf, uf, dhf = g.float(), u.float(), dh.float()
    s = torch.sigmoid(gf)
    du = dhf * gf * s
    dg = dhf * uf * s * (1 + gf * (1 - s))
    return dg.to(g.dtype), du.to(u.dtype)


@torch.library.custom_op("rslora_fast::swiglu_fwd", mutates_args=())
def swiglu_fwd(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Forward: ``silu(g) * u``."""
    check_gate_up(g, u, "swiglu")
    if not use_kernels(g):
        return swiglu_reference(g, u)
    return launch_gated_fwd("swiglu_fwd", "swiglu", g, u)


@swiglu_fwd.register_fake
def _(g, u):
    check_gate_up(g, u, "swiglu")
    return torch.empty_like(g, memory_format=torch.contiguous_format)


@torch.library.custom_op("rslora_fast::swiglu_bwd", mutates_args=())
def swiglu_bwd(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward: ``(dg, du)`` from the output gradient and the saved inputs."""
    check_gate_up(g, u, "swiglu backward")
    check_gate_up(dh, g, "swiglu backward")
    if not use_kernels(g):
        return swiglu_backward_reference(dh, g, u)
    return launch_gated_bwd("swiglu_bwd", "swiglu", dh, g, u)


@swiglu_bwd.register_fake
def _(dh, g, u):
    return gated_bwd_fake(g, u)


def _setup_context(ctx, inputs, output):
    g, u = inputs
    ctx.save_for_backward(g, u)


def _backward(ctx, dh):
    g, u = ctx.saved_tensors
    dg, du = swiglu_bwd(dh, g, u)
    return dg, du


swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` through our kernel on CUDA (plain torch on CPU), differentiable in both inputs.

    Args:
        g: gate projection output, any shape; float32, float16 or bfloat16.
        u: up projection output, same shape, dtype and device as ``g``.

    Returns:
        A new contiguous tensor of the same shape and dtype.

    Raises:
        ValueError: shapes, dtypes or devices of ``g`` and ``u`` differ, or the dtype is unsupported.
    """
    return swiglu_fwd(g, u)
