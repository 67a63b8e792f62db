"""GeGLU ``h = gelu(g) * u`` as a ``torch.library`` custom op with autograd and a fake kernel.

Both gelu variants of ``torch.nn.functional.gelu``: ``approximate="tanh"`` (Gemma's
``gelu_pytorch_tanh``) and ``approximate="none"`` (exact, erf). CUDA tensors run
``kernels/geglu.cu`` through the Rust launcher; CPU tensors run the plain-torch expression (the
reference). Non-contiguous inputs are made contiguous (one copy) rather than rejected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._launch import check_gate_up, gated_bwd_fake, launch_gated_bwd, launch_gated_fwd, use_kernels

APPROXIMATE = ("tanh", "none")


def _check_approximate(approximate: str, op: str) -> None:
    if approximate not in APPROXIMATE:
        raise ValueError(f'{op}: approximate={approximate!r}; expected "tanh" or "none"')


def geglu_reference(g: torch.Tensor, u: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """Plain-torch GeGLU, computed in float32 and cast back (what the kernel must match)."""
    return (F.gelu(g.float(), approximate=approximate) * u.float()).to(g.dtype)


def _gelu_and_grad(x: torch.Tensor, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``gelu(x)`` and ``gelu'(x)`` from the closed forms (x is float32)."""
    if approximate == "tanh":
        k = math.sqrt(2.0 / math.pi)
        t = torch.tanh(k * (x + 0.044715 * x**3))
        act = 0.5 * x * (1 + t)
        dact = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)
    else:
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
        act = x * cdf
        dact = cdf + x * torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return act, dact


def geglu_backward_reference(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, approximate: str = "tanh"):
    """Plain-torch gradients (dg, du) of GeGLU, in float32 and cast back."""
    gf, uf, dhf = g.float(), u.float(), dh.float()
    act, dact = _gelu_and_grad(gf, approximate)
    return (dhf * uf * dact).to(g.dtype), (dhf * act).to(u.dtype)


@torch.library.custom_op("rslora_fast::geglu_fwd", mutates_args=())
def geglu_fwd(g: torch.Tensor, u: torch.Tensor, approximate: str) -> torch.Tensor:
    """Forward: ``gelu(g, approximate) * u``."""
    check_gate_up(g, u, "geglu")
    _check_approximate(approximate, "geglu")
    if not use_kernels(g):
        return geglu_reference(g, u, approximate)
    return launch_gated_fwd("geglu_fwd", "geglu", g, u, approximate)


@geglu_fwd.register_fake
def _(g, u, approximate):
    check_gate_up(g, u, "geglu")
    _check_approximate(approximate, "geglu")
    return torch.empty_like(g, memory_format=torch.contiguous_format)


@torch.library.custom_op("rslora_fast::geglu_bwd", mutates_args=())
def geglu_bwd(
    dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, approximate: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward: ``(dg, du)`` from the output gradient and the saved inputs."""
    check_gate_up(g, u, "geglu backward")
    check_gate_up(dh, g, "geglu backward")
    _check_approximate(approximate, "geglu backward")
    if not use_kernels(g):
        return geglu_backward_reference(dh, g, u, approximate)
    return launch_gated_bwd("geglu_bwd", "geglu", dh, g, u, approximate)


@geglu_bwd.register_fake
def _(dh, g, u, approximate):
    return gated_bwd_fake(g, u)


def _setup_context(ctx, inputs, output):
    g, u, approximate = inputs
    ctx.approximate = approximate
    ctx.save_for_backward(g, u)


def _backward(ctx, dh):
    g, u = ctx.saved_tensors
    dg, du = geglu_bwd(dh, g, u, ctx.approximate)
    return dg, du, None


geglu_fwd.register_autograd(_backward, setup_context=_setup_context)


def geglu(g: torch.Tensor, u: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(g, approximate) * u`` through our kernel on CUDA (plain torch on CPU), differentiable in both inputs.

    Args:
        g: gate projection output, any shape; float32, float16 or bfloat16.
        u: up projection output, same shape, dtype and device as ``g``.
        approximate: ``"tanh"`` (Gemma's ``gelu_pytorch_tanh``) or ``"none"`` (exact erf gelu), as in
            ``torch.nn.functional.gelu``.

    Returns:
        A new contiguous tensor of the same shape and dtype.

    Raises:
        ValueError: shapes, dtypes or devices of ``g`` and ``u`` differ, the dtype is unsupported, or
            ``approximate`` is neither ``"tanh"`` nor ``"none"``.
    """
    return geglu_fwd(g, u, approximate)
