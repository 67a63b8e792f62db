"""Cross-entropy rows for large vocabularies as ``torch.library`` custom ops.

``cross_entropy_fwd(logits, targets)`` gives the per-row float32 log-sum-exp and loss
(``lse - logits[i, target]``, 0 for ignored rows) in one pass over each row, without an fp32 copy
of the logits; ``cross_entropy_bwd_(logits, lse, targets, scale)`` overwrites the logits with their
gradient ``(softmax - onehot) * scale`` (one read and one write of the buffer). CUDA tensors run
``kernels/cross_entropy.cu``; CPU tensors run the plain-torch float32 reference (the math
``fused_ce.py`` uses). Rows may be strided; a last dimension that is not contiguous is copied.
"""

from __future__ import annotations

import torch

from ._launch import core, dtype_name, stream_of, use_kernels

IGNORE_INDEX = -100


def cross_entropy_reference(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch ``(lse, loss_row)`` in float32 (what the forward kernel must match)."""
    lf = logits.float()
    valid = targets != ignore_index
    tgt = lf.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    # lse = m + log(sum e^(x - m)) and loss = (m - x_t) + log(sum e^(x - m)), not lse - x_t: at
    # |x| ~ 1e38 lse rounds to m and the difference cancels. A non-finite max (all -inf, NaN)
    # shifts by 0: the same -inf/NaN results as torch's logsumexp. One pass over the row serves both.
    m = lf.amax(dim=-1)
    plus_inf = m == float("inf")
    m = torch.where(torch.isfinite(m), m, 0.0)
    log_sum = torch.logsumexp(lf - m[:, None], dim=-1)
    lse = m + log_sum
    loss = (m - tgt) + log_sum
    # A row holding +inf: NaN, as torch's cross_entropy (inf - inf in its log-softmax) and the
    # kernel (inf - inf in its running max) give; logsumexp alone would say inf.
    nan = torch.full_like(loss, float("nan"))
    lse = torch.where(plus_inf, nan, lse)
    loss = torch.where(plus_inf, nan, loss)
    return lse, torch.where(valid, loss, 0.0)


def cross_entropy_backward_reference(
    logits: torch.Tensor,
    lse: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Plain-torch ``(exp(logits - lse) - onehot(targets)) * scale`` in float32, cast to the logits dtype."""
    p = torch.exp(logits.float() - lse[:, None])
    valid = targets != ignore_index
    hit = -valid.float()[:, None]
    p.scatter_add_(1, torch.where(valid, targets, 0)[:, None], hit)
    return (p * scale[:, None]).to(logits.dtype)


def _check(logits: torch.Tensor, targets: torch.Tensor, op: str, *rows: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be [rows, vocab], got shape {tuple(logits.shape)}")
    if logits.shape[1] == 0:
        raise ValueError(f"{op}: logits have a vocabulary of size 0")
    n = logits.shape[0]
    if targets.shape != (n,) or targets.dtype != torch.int64:
        raise ValueError(
            f"{op}: targets must be int64 of shape ({n},), got {targets.dtype} {tuple(targets.shape)}"
        )
    for t in rows:
        if t.shape != (n,) or t.dtype != torch.float32:
            raise ValueError(
                f"{op}: per-row tensors must be float32 of shape ({n},), got {t.dtype} {tuple(t.shape)}"
            )
    for t in (targets, *rows):
        if t.device != logits.device:
            raise ValueError(f"{op}: logits on {logits.device} but a per-row tensor on {t.device}")


def _row_layout(logits: torch.Tensor) -> bool:
    """Whether the kernel can read ``logits`` in place: contiguous last dim, rows ``stride(0)`` apart."""
    return logits.stride(1) == 1 and (logits.shape[0] <= 1 or logits.stride(0) >= logits.shape[1])


@torch.library.custom_op("rslora_fast::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: float32 ``(lse, loss_row)`` of ``[rows, vocab]`` logits against int64 targets."""
    _check(logits, targets, "cross_entropy")
    if not use_kernels(logits):
        return cross_entropy_reference(logits, targets, ignore_index)
    name = dtype_name(logits, "cross_entropy")
    if not _row_layout(logits):
        logits = logits.contiguous()
    targets = targets.contiguous()
    lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    loss = torch.empty_like(lse)
    _launch("cross_entropy_fwd", logits, (targets, lse, loss), ignore_index, name)
    return lse, loss


@cross_entropy_fwd.register_fake
def _(logits, targets, ignore_index=IGNORE_INDEX):
    _check(logits, targets, "cross_entropy")
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("rslora_fast::cross_entropy_bwd_", mutates_args=("logits",))
def cross_entropy_bwd_(
    logits: torch.Tensor,
    lse: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> None:
    """Backward in place: ``logits <- (exp(logits - lse) - onehot(targets)) * scale`` (per-row ``lse``, ``scale``)."""
    _check(logits, targets, "cross_entropy backward", lse, scale)
    if not use_kernels(logits):
        logits.copy_(cross_entropy_backward_reference(logits, lse, targets, scale, ignore_index))
        return
    name = dtype_name(logits, "cross_entropy backward")
    if not _row_layout(logits):  # compute on a copy, write back: still correct, one extra pass
        work = logits.contiguous()
        _launch_bwd(work, lse, targets, scale, ignore_index, name)
        logits.copy_(work)
    else:
        _launch_bwd(logits, lse, targets, scale, ignore_index, name)


def _launch_bwd(logits, lse, targets, scale, ignore_index: int, name: str) -> None:
    lse, targets, scale = lse.contiguous(), targets.contiguous(), scale.contiguous()
    _launch("cross_entropy_bwd", logits, (lse, targets, scale), ignore_index, name)


def _launch(launcher: str, logits, tensors, ignore_index: int, name: str) -> None:
    """``core().<launcher>(logits, its row stride, *tensors, rows, cols, ignore_index, dtype, device,
    stream)``: both kernels read the logits through their row stride."""
    rows, cols = logits.shape
    device, stream = stream_of(logits)
    pointers = [t.data_ptr() for t in tensors]
    getattr(core(), launcher)(
        logits.data_ptr(), logits.stride(0), *pointers, rows, cols, ignore_index, name, device, stream
    )


@cross_entropy_bwd_.register_fake
def _(logits, lse, targets, scale, ignore_index=IGNORE_INDEX):
    _check(logits, targets, "cross_entropy backward", lse, scale)


def _setup_context(ctx, inputs, output):
    logits, targets, ignore_index = inputs
    lse, _ = output
    ctx.save_for_backward(logits, targets, lse)
    ctx.ignore_index = ignore_index


def _backward(ctx, d_lse, d_loss):
    logits, targets, lse = ctx.saved_tensors
    if d_loss is None:
        d_loss = torch.zeros_like(lse)
    valid = targets != ctx.ignore_index
    grad = logits.clone(memory_format=torch.contiguous_format)
    # d loss_i / d l_ij = softmax_ij - [j == t_i] on valid rows: the in-place kernel's formula.
    cross_entropy_bwd_(grad, lse, targets, d_loss.float() * valid, ctx.ignore_index)
    if d_lse is not None:  # d lse_i / d l_ij = softmax_ij (every row)
        soft = torch.exp(logits.float() - lse[:, None])
        grad = (grad.float() + soft * d_lse.float()[:, None]).to(logits.dtype)
    return grad, None, None


cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """``torch.nn.functional.cross_entropy`` for ``[rows, vocab]`` logits, in float32, without an fp32 copy.

    Args:
        logits: ``[rows, vocab]`` float32, float16 or bfloat16 (rows may be strided).
        targets: ``[rows]`` int64 class ids; ``ignore_index`` entries are ignored.
        ignore_index: the target value that marks an ignored row.
        reduction: ``"mean"`` (over non-ignored rows), ``"sum"`` or ``"none"`` (per-row float32).

    Returns:
        The float32 loss, differentiable with respect to ``logits``.

    Raises:
        ValueError: on a bad shape, dtype or device, or an unknown reduction.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: unknown reduction {reduction!r}; expected mean, sum or none")
    _, loss = cross_entropy_fwd(logits, targets, ignore_index)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (targets != ignore_index).sum()
