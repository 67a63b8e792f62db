"""Fused lm_head + cross-entropy, chunked over tokens, so the full ``[tokens, vocab]`` logits never exist.

Forward: for each chunk of tokens, ``logits = h @ W^T`` in the activation dtype (as ``nn.Linear`` computes
them), upcast to float32 (as transformers' loss does), log-sum-exp and the target logit; and, when
``h`` needs a gradient, the chunk's ``dh = (softmax - onehot) / denom @ W`` right there, while its
logits exist. The loss is a sum over tokens divided by ``denom``, so its upstream gradient only scales
that ``dh``: backward is one multiply by ``grad_output`` and runs no head GEMM (recomputing the logits
would be a third one). What is kept for backward is ``dh`` (``[tokens, hidden]``, the size of ``h``
that the recompute kept instead). The head weight stays frozen (no gradient): a trainable or adapted
head never reaches this function (``models/causal_lm.py`` routes it through the model's own forward).
A forward whose result is never backpropagated (loss only, ``h`` requiring grad) still pays the
gradient GEMM; under ``torch.no_grad()`` or with a frozen ``h`` it is skipped.

On CUDA (float32/float16/bfloat16) each chunk runs our cross-entropy kernels instead
(``ops/cross_entropy.py``): the forward kernel reads the chunk's logits once for the log-sum-exp and
the target logit, the backward kernel turns them into their gradient in place; no float32 copy of a
chunk exists.

Peak extra memory is one chunk of logits instead of the whole tensor: chunks are sized so that a
float32 chunk is about 0.25 GiB (on the CUDA kernel path the chunk stays in the activation dtype, so
a bf16 chunk is half that), instead of about 6 GiB of logits, their float32 copy and their gradients
for Llama-3 at 4,096 tokens.

With ``softcap`` (Gemma 2's ``final_logit_softcapping``) the logits are ``softcap * tanh(logits /
softcap)`` before the loss, as transformers computes them; the chunks then run the plain-torch path
in float32 on every device (our kernels take the logits as they are).

A target outside ``[0, vocab)`` other than ``-100``: the CPU path raises ``IndexError``; the CUDA
kernels give that token a NaN loss (so the step's loss is NaN) rather than stopping the device.
"""

from __future__ import annotations

import torch

from ._launch import KERNEL_DTYPES, use_kernels

IGNORE_INDEX = -100


def _use_kernels(hidden: torch.Tensor) -> bool:
    """Whether the chunks run our CUDA cross-entropy kernels (a kernel dtype where they load)."""
    return hidden.dtype in KERNEL_DTYPES and use_kernels(hidden)


def default_chunk_tokens(vocab_size: int, budget_bytes: int = 256 * 2**20) -> int:
    """Tokens per chunk so one chunk's float32 logits fit in ``budget_bytes`` (at least 16)."""
    return max(16, budget_bytes // (4 * max(1, vocab_size)))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, denom, chunk, softcap, want_dh):  # noqa: D417
        # d loss / d loss_row is 1/denom on valid rows, 0 on ignored ones; backward's grad_output
        # only scales it, so each chunk's gradient is taken here, while its logits exist.
        if softcap is None and _use_kernels(hidden):
            total, dh = _forward_kernels(hidden, weight, targets.long(), denom, chunk, want_dh)
        else:
            total, dh = _forward_torch(hidden, weight, targets, denom, chunk, softcap, want_dh)
        ctx.save_for_backward(dh)
        return total / denom

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (dh,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        return dh * grad, None, None, None, None, None, None


def _forward_kernels(hidden, weight, targets, denom, chunk, want_dh):
    """Chunk loop on our CUDA kernels: loss sum and (``want_dh``) d(sum / denom) / d hidden."""
    from .cross_entropy import cross_entropy_bwd_, cross_entropy_fwd

    n = hidden.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden) if want_dh else None
    row_scale = (targets != IGNORE_INDEX).float() / denom if want_dh else None
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        logits = hidden[s:e] @ weight.t()
        lse, loss = cross_entropy_fwd(logits, targets[s:e], IGNORE_INDEX)
        total += loss.sum()
        if want_dh:  # the chunk's logits are read by nobody else: their gradient overwrites them
            cross_entropy_bwd_(logits, lse, targets[s:e], row_scale[s:e], IGNORE_INDEX)
            torch.mm(logits, weight, out=dh[s:e])
    return total, dh


def _forward_torch(hidden, weight, targets, denom, chunk, softcap, want_dh):
    """Chunk loop in float32 torch (any device, soft-cap): loss sum and (``want_dh``) its gradient."""
    n = hidden.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden) if want_dh else None
    valid = targets != IGNORE_INDEX
    safe_t = torch.where(valid, targets, 0)
    row_scale = valid.float() / denom
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        logits, t = _capped(hidden[s:e] @ weight.t(), softcap)
        lse = torch.logsumexp(logits, dim=-1)
        tgt = logits.gather(1, safe_t[s:e, None]).squeeze(1)
        total += ((lse - tgt) * valid[s:e]).sum()
        if not want_dh:
            continue
        p = torch.exp(logits - lse[:, None])
        p.scatter_add_(1, safe_t[s:e, None], torch.full((e - s, 1), -1.0, device=p.device))
        p *= row_scale[s:e, None]
        if t is not None:  # d(c * tanh(z / c)) / dz = 1 - tanh(z / c)^2
            p *= 1.0 - t * t
        dh[s:e] = p.to(hidden.dtype) @ weight
    return total, dh


def _capped(logits: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 ``softcap * tanh(logits / softcap)`` and the tanh (``logits, None`` without a cap)."""
    logits = logits.float()
    if softcap is None:
        return logits, None
    t = torch.tanh(logits / softcap)
    return t * softcap, t


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_tokens: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight^T`` against ``targets`` without materializing the logits.

    Args:
        hidden: ``[tokens, hidden]`` activations (any float dtype; the matmul runs in it).
        weight: ``[vocab, hidden]`` frozen output head (same dtype and device as ``hidden``).
        targets: ``[tokens]`` int64 class ids; ``-100`` entries are ignored.
        num_items_in_batch: divide the summed loss by this (transformers' gradient-accumulation
            convention); default: the number of non-ignored targets (a mean).
        chunk_tokens: tokens per chunk; default keeps one chunk's float32 logits near 256 MiB.
        softcap: when given, the loss is taken on ``softcap * tanh(logits / softcap)`` (a positive
            float: Gemma 2's ``final_logit_softcapping``).

    Returns:
        A scalar float32 loss, differentiable (once) with respect to ``hidden`` only; its gradient
        is computed in this call's forward (see the module docstring).

    Raises:
        ValueError: on mismatched shapes, dtypes or devices, or a ``softcap`` that is not positive.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # Run the head GEMMs (loss and gradient) in autocast's dtype, cast once here, and the
        # chunk loop without autocast (it would otherwise pick the dtype GEMM by GEMM).
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return fused_linear_cross_entropy(
                hidden.to(dtype),
                weight.to(dtype),
                targets,
                num_items_in_batch=num_items_in_batch,
                chunk_tokens=chunk_tokens,
                softcap=softcap,
            )
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and head weight {tuple(weight.shape)} do not fit")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match {hidden.shape[0]} tokens")
    if hidden.dtype != weight.dtype or hidden.device != weight.device:
        raise ValueError(
            f"hidden ({hidden.dtype}, {hidden.device}) and weight ({weight.dtype}, {weight.device})"
        )
    if chunk_tokens is not None and chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be a positive number of tokens, got {chunk_tokens}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive float (or None for no soft-capping), got {softcap!r}")
    if num_items_in_batch is None:
        denom = (targets != IGNORE_INDEX).sum().clamp_min(1).float()
    else:
        denom = torch.as_tensor(num_items_in_batch, device=hidden.device).float()
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    cap = None if softcap is None else float(softcap)
    want_dh = hidden.requires_grad and torch.is_grad_enabled()  # forward runs with grad mode off
    return _FusedLinearCrossEntropy.apply(
        hidden, weight, targets.to(hidden.device), denom, chunk, cap, want_dh
    )
