"""RMSNorm over the last dimension as ``torch.library`` custom ops with autograd and fake kernels.

Matches transformers' numerics: ``LlamaRMSNorm`` (normalize in float32, round the normalized value
to the input dtype, then multiply by the weight) and, with ``gemma=True``, ``GemmaRMSNorm``
(``x_hat * (1 + w)`` in float32, one rounding). CUDA tensors run ``kernels/rms_norm.cu`` through
the Rust launcher; CPU tensors run the plain-torch expressions below (the reference). Backward
saves only ``x``, the weight (a reference to the parameter) and ``rstd`` (float32, one per row).
When the weight needs no gradient (LoRA freezes the norms) backward runs ``rms_norm_bwd_dx``: the
input gradient alone, without the ``dw`` partial sums and their reduction.

:func:`add_rms_norm` is the decoder layer's ``h = residual + attn_out; normed = norm(h)`` as one
op: one kernel writes the sum (rounded to the dtype, as torch's add) and its norm, and, for a frozen
weight, one backward kernel gives the gradient of both addends, ``dh + d normed / d h`` rounded
once (transformers rounds the norm's input gradient, then adds ``dh``: at most one unit in the last
place apart). A trainable weight takes the RMSNorm backward with ``dw`` and then one add.
"""

from __future__ import annotations

import torch

from ._launch import core, dtype_name, stream_of, use_kernels


def rms_norm_reference(x: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool = False):
    """Plain-torch RMSNorm as transformers computes it; returns ``(y, rstd)`` (rstd float32)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xn = xf * rstd
    y = (xn * (1.0 + w.float())).to(x.dtype) if gemma else w * xn.to(x.dtype)
    return y, rstd.squeeze(-1)


def _dx_reference(dy, x, w, rstd, gemma):
    """Plain-torch float32 ``(dx, x_hat)`` of RMSNorm; ``dx`` not yet cast."""
    r = rstd.unsqueeze(-1)
    xn = x.float() * r
    g = dy.float() * (w.float() + 1.0 if gemma else w.float())
    return r * (g - xn * (g * xn).mean(-1, keepdim=True)), xn


def rms_norm_backward_reference(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, gemma: bool = False
):
    """Plain-torch ``(dx, dw)`` of RMSNorm in float32, cast back to the input dtypes."""
    dx, xn = _dx_reference(dy, x, w, rstd, gemma)
    # What the weight multiplied in forward: Llama's x_hat was rounded to the input dtype first.
    seen = xn if gemma else xn.to(x.dtype).float()
    dw = (dy.float() * seen).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(w.dtype)


def _check(x: torch.Tensor, w: torch.Tensor, op: str) -> None:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: input needs a non-empty last dimension, got shape {tuple(x.shape)}")
    if w.dim() != 1 or w.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: weight shape {tuple(w.shape)} does not match last dimension {x.shape[-1]}")
    if w.dtype != x.dtype:
        raise ValueError(f"{op}: weight dtype {w.dtype} differs from input dtype {x.dtype}")
    if w.device != x.device:
        raise ValueError(f"{op}: weight on {w.device} and input on {x.device}")


def _launch_rows(launcher: str, x: torch.Tensor, tensors, *scalars, op: str) -> None:
    """Runs ``core().<launcher>(pointers..., rows, cols, *scalars, dtype, device, stream)`` over the
    rows of ``x``'s last dimension; nothing to launch for zero rows."""
    cols = x.shape[-1]
    rows = x.numel() // cols
    if rows:
        device, stream = stream_of(x)
        pointers = [t.data_ptr() for t in tensors]
        getattr(core(), launcher)(*pointers, rows, cols, *scalars, dtype_name(x, op), device, stream)


@torch.library.custom_op("rslora_fast::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(
    x: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(y, rstd)`` with ``rstd`` float32 of shape ``x.shape[:-1]``."""
    _check(x, w, "rms_norm")
    if not use_kernels(x):
        return rms_norm_reference(x, w, eps, gemma)
    x, w = x.contiguous(), w.contiguous()
    y = torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    _launch_rows("rms_norm_fwd", x, (x, w, y, rstd), eps, gemma, op="rms_norm")
    return y, rstd


@rms_norm_fwd.register_fake
def _(x, w, eps, gemma):
    _check(x, w, "rms_norm")
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, x.new_empty(x.shape[:-1], dtype=torch.float32)


def _check_backward(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor) -> None:
    _check(x, w, "rms_norm backward")
    if dy.shape != x.shape or rstd.shape != x.shape[:-1]:
        raise ValueError(
            f"rms_norm backward: grad shape {tuple(dy.shape)} / rstd shape {tuple(rstd.shape)} "
            f"do not match input shape {tuple(x.shape)}"
        )


def _backward_operands(dy, x, w, rstd):
    """What both backward kernels read: dy in x's dtype, everything contiguous, rstd float32."""
    return dy.to(x.dtype).contiguous(), x.contiguous(), w.contiguous(), rstd.float().contiguous()


def launch_bwd(dy, x, w, rstd, dx, partial, gemma: bool) -> None:
    """Runs ``core().rms_norm_bwd`` over the rows of contiguous ``x``: writes ``dx`` and the float32
    ``dw`` partial sums, one per row of ``partial`` (``rms_norm_bwd_partial_rows`` of them)."""
    cols = x.shape[-1]
    device, stream = stream_of(x)
    pointers = [t.data_ptr() for t in (dy, x, w, rstd, dx, partial)]
    core().rms_norm_bwd(
        *pointers, partial.shape[0], x.numel() // cols, cols, gemma, dtype_name(x, "rms_norm"), device, stream
    )


@torch.library.custom_op("rslora_fast::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, gemma: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward: ``(dx, dw)`` from the output gradient, the saved input, the weight and ``rstd``."""
    _check_backward(dy, x, w, rstd)
    if not use_kernels(x):
        return rms_norm_backward_reference(dy, x, w, rstd, gemma)
    dy, x, w, rstd = _backward_operands(dy, x, w, rstd)
    cols = x.shape[-1]
    rows = x.numel() // cols
    dx = torch.empty_like(x)
    if rows == 0:
        return dx, torch.zeros_like(w)
    n = core().rms_norm_bwd_partial_rows(rows, cols, dtype_name(x, "rms_norm"), stream_of(x)[0])
    partial = torch.empty(n, cols, dtype=torch.float32, device=x.device)
    launch_bwd(dy, x, w, rstd, dx, partial, gemma)
    # torch's reduction of a fixed shape runs in a fixed order: dw is deterministic.
    return dx, partial.sum(0).to(w.dtype)


@rms_norm_bwd.register_fake
def _(dy, x, w, rstd, gemma):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(w, memory_format=torch.contiguous_format),
    )


@torch.library.custom_op("rslora_fast::rms_norm_bwd_dx", mutates_args=())
def rms_norm_bwd_dx(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, gemma: bool
) -> torch.Tensor:
    """Backward for a frozen weight: ``dx`` only, without the ``dw`` reduction."""
    _check_backward(dy, x, w, rstd)
    if not use_kernels(x):
        return _dx_reference(dy, x, w, rstd, gemma)[0].to(x.dtype)
    dy, x, w, rstd = _backward_operands(dy, x, w, rstd)
    dx = torch.empty_like(x)
    _launch_rows("rms_norm_bwd_dx", x, (dy, x, w, rstd, dx), gemma, op="rms_norm")
    return dx


@rms_norm_bwd_dx.register_fake
def _(dy, x, w, rstd, gemma):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, w, _eps, gemma = inputs
    _y, rstd = output
    ctx.save_for_backward(x, w, rstd)
    ctx.gemma = gemma
    ctx.mark_non_differentiable(rstd)


def _backward(ctx, dy, _drstd):
    x, w, rstd = ctx.saved_tensors
    if not ctx.needs_input_grad[1]:
        # LoRA training freezes the norm weight: no dw partials, one read of x and dy.
        return rms_norm_bwd_dx(dy, x, w, rstd, ctx.gemma), None, None, None
    dx, dw = rms_norm_bwd(dy, x, w, rstd, ctx.gemma)
    return (
        dx if ctx.needs_input_grad[0] else None,
        dw if ctx.needs_input_grad[1] else None,
        None,
        None,
    )


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, gemma: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension through our kernel on CUDA (plain torch on CPU).

    Args:
        x: input of any shape ``[..., hidden]``; float32, float16 or bfloat16 on CUDA.
        weight: ``[hidden]`` in ``x``'s dtype and on its device.
        eps: added to the mean square before the reciprocal square root.
        gemma: ``False`` for ``LlamaRMSNorm`` (``weight * x_hat`` with ``x_hat`` rounded to the input
            dtype first), ``True`` for ``GemmaRMSNorm`` (``x_hat * (1 + weight)`` in float32).

    Returns:
        A new contiguous tensor shaped and typed like ``x``; differentiable in ``x`` and ``weight``.

    Raises:
        ValueError: the weight does not match the last dimension, dtype or device of ``x``, the last
            dimension is empty, or the dtype is unsupported on CUDA.
    """
    y, _rstd = rms_norm_fwd(x, weight, eps, gemma)
    return y


# ---------------------------------------------------------------------------- residual add + RMSNorm
def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool = False
):
    """Plain-torch ``(s, y, rstd)``: ``s = x + residual`` in the input dtype, ``y, rstd`` its RMSNorm."""
    s = x + residual
    y, rstd = rms_norm_reference(s, w, eps, gemma)
    return s, y, rstd


def add_rms_norm_backward_reference(
    dy: torch.Tensor,
    ds: torch.Tensor,
    s: torch.Tensor,
    w: torch.Tensor,
    rstd: torch.Tensor,
    gemma: bool = False,
) -> torch.Tensor:
    """Plain-torch gradient of both addends: ``ds + d y / d s`` in float32, rounded once to the dtype."""
    dx, _ = _dx_reference(dy, s, w, rstd, gemma)
    return (dx + ds.float()).to(s.dtype)


def _check_add(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, op: str) -> None:
    _check(x, w, op)
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(
            f"{op}: residual ({tuple(residual.shape)}, {residual.dtype}, {residual.device}) does not "
            f"match the input ({tuple(x.shape)}, {x.dtype}, {x.device})"
        )


@torch.library.custom_op("rslora_fast::add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: ``(s, y, rstd)`` with ``s = x + residual``, ``y = rms_norm(s)``, ``rstd`` float32."""
    _check_add(x, residual, w, "add_rms_norm")
    if not use_kernels(x):
        return add_rms_norm_reference(x, residual, w, eps, gemma)
    x, residual, w = x.contiguous(), residual.contiguous(), w.contiguous()
    s, y = torch.empty_like(x), torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    _launch_rows("add_rms_norm_fwd", x, (x, residual, w, s, y, rstd), eps, gemma, op="add_rms_norm")
    return s, y, rstd


@add_rms_norm_fwd.register_fake
def _(x, residual, w, eps, gemma):
    _check_add(x, residual, w, "add_rms_norm")
    s = torch.empty_like(x, memory_format=torch.contiguous_format)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return s, y, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("rslora_fast::add_rms_norm_bwd_dx", mutates_args=())
def add_rms_norm_bwd_dx(
    dy: torch.Tensor, ds: torch.Tensor, s: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, gemma: bool
) -> torch.Tensor:
    """Backward for a frozen weight: the gradient of both addends, ``ds + d y / d s`` (one rounding)."""
    _check_backward(dy, s, w, rstd)
    if ds.shape != s.shape:
        raise ValueError(f"add_rms_norm backward: sum grad shape {tuple(ds.shape)} != {tuple(s.shape)}")
    if not use_kernels(s):
        return add_rms_norm_backward_reference(dy, ds, s, w, rstd, gemma)
    dy, s, w, rstd = _backward_operands(dy, s, w, rstd)
    ds = ds.to(s.dtype).contiguous()
    dx = torch.empty_like(s)
    _launch_rows("add_rms_norm_bwd_dx", s, (dy, ds, s, w, rstd, dx), gemma, op="add_rms_norm")
    return dx


@add_rms_norm_bwd_dx.register_fake
def _(dy, ds, s, w, rstd, gemma):
    return torch.empty_like(s, memory_format=torch.contiguous_format)


def _setup_add_context(ctx, inputs, output):
    _x, _residual, w, _eps, gemma = inputs
    s, _y, rstd = output
    ctx.save_for_backward(s, w, rstd)
    ctx.gemma = gemma
    ctx.mark_non_differentiable(rstd)


def _add_backward(ctx, ds, dy, _drstd):
    s, w, rstd = ctx.saved_tensors
    ds = torch.zeros_like(s) if ds is None else ds
    dw = None
    if dy is None:  # only the sum was used downstream
        d = ds.to(s.dtype)
    elif ctx.needs_input_grad[2]:  # trainable weight: the dw kernel, then the sum's own gradient
        dn, dw = rms_norm_bwd(dy, s, w, rstd, ctx.gemma)
        d = dn + ds.to(s.dtype)
    else:
        d = add_rms_norm_bwd_dx(dy, ds, s, w, rstd, ctx.gemma)
    return (
        d if ctx.needs_input_grad[0] else None,
        d if ctx.needs_input_grad[1] else None,
        dw,
        None,
        None,
    )


add_rms_norm_fwd.register_autograd(_add_backward, setup_context=_setup_add_context)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, gemma: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` and ``rms_norm(s)`` in one kernel on CUDA (plain torch on CPU).

    Args:
        x: the branch output ``[..., hidden]`` (e.g. attention's); float32, float16 or bfloat16 on CUDA.
        residual: the residual stream, same shape, dtype and device as ``x``.
        weight: ``[hidden]`` in ``x``'s dtype and on its device.
        eps: added to the mean square before the reciprocal square root.
        gemma: ``False`` for ``LlamaRMSNorm``, ``True`` for ``GemmaRMSNorm`` (as :func:`rms_norm`).

    Returns:
        ``(s, normed)``: the sum (rounded to the dtype, as ``x + residual``) and its RMSNorm, both new
        contiguous tensors; differentiable in ``x``, ``residual`` and ``weight`` (the gradient of
        both addends is the sum's gradient plus the norm's input gradient).

    Raises:
        ValueError: the residual does not match ``x``, the weight does not match the last dimension,
            dtype or device of ``x``, the last dimension is empty, or the dtype is unsupported on CUDA.
    """
    s, y, _rstd = add_rms_norm_fwd(x, residual, weight, eps, gemma)
    return s, y
