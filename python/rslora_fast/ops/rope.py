"""Rotary position embedding on q and k, in place, as a ``torch.library`` op with autograd.

Shapes follow transformers' attention code: q ``[batch, heads, seq, head_dim]``, k ``[batch,
kv_heads, seq, head_dim]``, cos/sin ``[batch, seq, head_dim]`` as ``LlamaRotaryEmbedding`` returns
them (scaling such as llama3 / linear and ``attention_scaling`` already folded in; they are built
from position ids, so packed sequences whose positions restart just work). A batch of 1 in cos/sin
broadcasts over q's batch. Convention: ``out = x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = cat(-x2, x1)``.

q and k may have any batch/head/seq strides (e.g. the ``transpose(1, 2)`` view of a projection
output) but the last dimension must be contiguous and distinct (batch, head, seq) rows must not
overlap; cos/sin likewise. CUDA tensors run ``kernels/rope.cu`` (one launch for q and k); CPU
tensors run the plain-torch expression (the reference). cos and sin are constants for autograd
(no gradient flows into them; transformers computes them under ``no_grad``).
"""

from __future__ import annotations

import torch

from ._launch import core, dtype_name, stream_of, use_kernels


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain-torch rotation of ``x [b, h, s, d]`` by ``cos/sin [b, s, d]`` in (at least) float32."""
    wide = torch.promote_types(x.dtype, torch.float32)
    c, s = cos.to(wide).unsqueeze(1), sin.to(wide).unsqueeze(1)
    xf = x.to(wide)
    return (xf * c + rotate_half(xf) * s).to(x.dtype)


def rope_backward_reference(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Transpose of :func:`rope_reference` applied to a gradient: ``g * cos + R^T(g * sin)``."""
    wide = torch.promote_types(g.dtype, torch.float32)
    c, s = cos.to(wide).unsqueeze(1), sin.to(wide).unsqueeze(1)
    gf = g.to(wide)
    gs1, gs2 = (gf * s).chunk(2, dim=-1)
    return (gf * c + torch.cat((gs2, -gs1), dim=-1)).to(g.dtype)


def _rows_ok(t: torch.Tensor) -> bool:
    """Last dim contiguous and (batch, head, seq) rows pairwise disjoint (safe to write in place)."""
    if t.numel() == 0:
        return True
    if t.stride(-1) != 1:
        return False
    # Rows are disjoint when, taking dims by increasing stride, each stride clears the whole
    # extent of the smaller ones (size-1 dims never repeat a row).
    extent = t.shape[-1]
    for stride, size in sorted((s, d) for d, s in zip(t.shape[:-1], t.stride()[:-1]) if d > 1):
        if stride < extent:
            return False
        extent += stride * (size - 1)
    return True


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, op: str) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"{op}: q and k must be [batch, heads, seq, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    b, _, s, d = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"{op}: k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}")
    if d % 2:
        raise ValueError(f"{op}: head_dim must be even, got {d}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, b) or t.shape[1] != s or t.shape[2] != d:
            raise ValueError(
                f"{op}: {name} shape {tuple(t.shape)} is not [batch or 1, seq, head_dim] = [{b}, {s}, {d}]"
            )
    if len({q.dtype, k.dtype, cos.dtype, sin.dtype}) != 1:
        raise ValueError(
            f"{op}: q, k, cos, sin dtypes differ: {q.dtype}, {k.dtype}, {cos.dtype}, {sin.dtype}"
        )
    if len({q.device, k.device, cos.device, sin.device}) != 1:
        raise ValueError(f"{op}: q, k, cos, sin are on different devices")
    for name, t in (("q", q), ("k", k)):
        if not _rows_ok(t):
            raise ValueError(
                f"{op}: {name} needs a contiguous last dim and non-overlapping rows (strides {t.stride()})"
            )


def _check_disjoint(q: torch.Tensor, k: torch.Tensor, op: str) -> None:
    """q and k may share a storage only with disjoint element ranges (one launch writes both).

    Real tensors only: fake tensors (torch.compile, opcheck) have no addresses to compare.
    """
    if q.numel() and k.numel() and q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr():
        qa, ka = _span(q), _span(k)
        if qa[0] < ka[1] and ka[0] < qa[1]:
            raise ValueError(f"{op}: q and k overlap in memory")


def _span(t: torch.Tensor) -> tuple[int, int]:
    lo = t.data_ptr()
    hi = lo + t.element_size() * (1 + sum((d - 1) * s for d, s in zip(t.shape, t.stride())))
    return lo, hi


def _launch(q, k, cos, sin, backward: bool) -> None:
    """One kernel launch over q and (when given) k; ``k=None`` rotates q alone."""
    b, hq, s, d = q.shape
    if q.numel() == 0 and (k is None or k.numel() == 0):
        return
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    cs = (0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1))
    ss = (0 if sin.shape[0] == 1 else sin.stride(0), sin.stride(1))
    # a size-1 dim's stride is never used for addressing; 0 keeps the vector-alignment check honest
    qs = tuple(0 if q.shape[i] == 1 else q.stride(i) for i in range(3))
    ks = qs if k is None else tuple(0 if k.shape[i] == 1 else k.stride(i) for i in range(3))
    device, stream = stream_of(q)
    core().rope_apply(
        q.data_ptr(),
        # never read with 0 k heads (an empty k, whose data_ptr() is 0, rotates q alone)
        q.data_ptr() if k is None or k.numel() == 0 else k.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        b,
        s,
        hq,
        0 if k is None else k.shape[1],
        d,
        qs,
        ks,
        cs,
        ss,
        backward,
        dtype_name(q, "rope"),
        device,
        stream,
    )


def _rotate_pair(a: torch.Tensor, b: torch.Tensor, cos, sin, backward: bool) -> None:
    """The forward map (``backward=False``) or its transpose, in place on both tensors."""
    op = "rope backward" if backward else "rope"
    _check(a, b, cos, sin, op)
    _check_disjoint(a, b, op)
    if not use_kernels(a):
        ref = rope_backward_reference if backward else rope_reference
        a.copy_(ref(a, cos, sin))
        b.copy_(ref(b, cos, sin))
        return
    _launch(a, b, cos, sin, backward=backward)


def _checks_only(op: str):
    """The fake implementation of a pair op (torch.compile, opcheck): its argument checks alone."""
    return lambda a, b, cos, sin: _check(a, b, cos, sin, op)


@torch.library.custom_op("rslora_fast::rope_", mutates_args=("q", "k"))
def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate ``q`` and ``k`` in place by ``cos``/``sin`` (one CUDA launch for both)."""
    _rotate_pair(q, k, cos, sin, backward=False)


rope_.register_fake(_checks_only("rope"))


@torch.library.custom_op("rslora_fast::rope_backward_", mutates_args=("dq", "dk"))
def rope_backward_(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Turn the gradients of rotated q/k into gradients of the unrotated ones, in place."""
    _rotate_pair(dq, dk, cos, sin, backward=True)


rope_backward_.register_fake(_checks_only("rope backward"))


@torch.library.custom_op("rslora_fast::rope_grad_", mutates_args=("g",))
def rope_grad_(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """:func:`rope_backward_` for one tensor (what autograd calls: q's and k's gradients arrive apart)."""
    _check(g, g, cos, sin, "rope backward")
    if not use_kernels(g):
        g.copy_(rope_backward_reference(g, cos, sin))
        return
    _launch(g, None, cos, sin, backward=True)


@rope_grad_.register_fake
def _(g, cos, sin):
    _check(g, g, cos, sin, "rope backward")


def _writable_grad(g: torch.Tensor | None, like: tuple) -> torch.Tensor:
    """The incoming gradient if it can be rotated in place, else a fresh contiguous copy (autograd
    may hand over an expanded gradient with zero strides, or None for an output that was unused)."""
    if g is None:
        shape, dtype, device = like
        return torch.zeros(shape, dtype=dtype, device=device)
    if _rows_ok(g) and all(s != 0 or d == 1 for d, s in zip(g.shape, g.stride())):
        return g
    return g.clone(memory_format=torch.contiguous_format)


class _Rotated(torch.autograd.Function):
    """Autograd record of a rotation already applied in place (by one ``rope_`` launch for q and k).

    PyTorch lets a Function rewrite an input view in place only if it returns that one tensor, and
    q/k are usually views (``transpose(1, 2)`` of a projection); so the launch happens once for
    both and each tensor then passes through its own single-output Function, which marks it dirty
    and, in backward, rotates its gradient in place by the transposed map.
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        ctx.like = (x.shape, x.dtype, x.device)
        return x

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        g = _writable_grad(g, ctx.like)
        rope_grad_(g, cos, sin)
        return g, None, None


def apply_rope_(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary position embedding to ``q`` and ``k`` in place and return them.

    Same math as transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` (``unsqueeze_dim=1``), but
    ``q`` and ``k`` are overwritten (one CUDA launch for both) and the backward rotates the
    incoming gradients in place as well (one launch per gradient, see ``_Rotated``). That is safe when the rotated q/k feed ops whose backward
    hands over gradients nobody else reads (attention does); do not use it on tensors whose
    pre-rotation values something else still needs.

    Args:
        q: ``[batch, heads, seq, head_dim]``; float32, float16 or bfloat16; last dim contiguous.
        k: ``[batch, kv_heads, seq, head_dim]``, same batch/seq/head_dim, dtype and device as q.
        cos: ``[batch or 1, seq, head_dim]`` as returned by the model's rotary embedding; same dtype.
        sin: like ``cos``.

    Returns:
        ``(q, k)``, the same tensors, rotated.

    Raises:
        ValueError: shapes, dtypes, devices or layouts that the op does not accept, or cos/sin
            that require a gradient (not implemented).
    """
    track = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("rope: gradients with respect to cos/sin are not implemented")
    for name, t in (("q", q), ("k", k)):
        base = t if t._base is None else t._base
        if track and t.requires_grad and base.is_leaf:
            # autograd would refuse after the launch had already overwritten the tensor
            raise ValueError(
                f"rope: {name} is (a view of) a leaf that requires grad; it cannot be rotated in place"
            )
    with torch.no_grad():
        rope_(q, k, cos, sin)
    if not track:
        return q, k
    return _Rotated.apply(q, cos, sin), _Rotated.apply(k, cos, sin)
