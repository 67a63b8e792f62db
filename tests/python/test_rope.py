"""RoPE op: reference on CPU (opcheck + float64 against transformers), our kernel on CUDA (marker ``cuda``).

Expected values come from transformers' ``apply_rotary_pos_emb`` and its autograd in float64,
with cos/sin from ``LlamaRotaryEmbedding`` (default, llama3 and linear scaling; packed position ids).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from rslora_fast.ops.rope import (
    apply_rope_,
    rope_,
    rope_backward_,
    rope_backward_reference,
    rope_grad_,
    rope_reference,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative-norm tolerances against float64 (the op rounds its result to dtype once)
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# elementwise: |err| <= ATOL_REL * max|ref| catches single unwritten / wrong elements
ATOL_REL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SCALINGS = {
    "default": None,
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "linear": {"rope_type": "linear", "factor": 4.0},
}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def close(a: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(a).all()
    assert rel(a, ref) < TOL[dtype]
    err = (a.double() - ref.double()).abs().max()
    assert err <= ATOL_REL[dtype] * ref.double().abs().max().clamp_min(1e-30)


def cos_sin(batch, seq, head_dim, scaling="default", position_ids=None, device="cpu", dtype=torch.float32):
    """cos/sin exactly as a llama model computes them (scaling and attention_scaling included)."""
    config = LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_scaling=SCALINGS[scaling],
    )
    rotary = LlamaRotaryEmbedding(config).to(device)
    assert rotary.rope_type == scaling  # the scaling really is in effect
    if position_ids is None:
        position_ids = torch.arange(seq, device=device).expand(batch, seq)
    x = torch.zeros(1, dtype=dtype, device=device)
    cos, sin = rotary(x, position_ids.to(device))
    return cos.to(dtype), sin.to(dtype)


def check(
    device,
    dtype,
    batch,
    heads,
    kv_heads,
    seq,
    head_dim,
    scaling="default",
    position_ids=None,
    layout="bhsd",
    cos_batch=None,
):
    """Forward and both input gradients of apply_rope_ against transformers in float64.

    ``layout="bshd"`` makes q/k the ``transpose(1, 2)`` view of a projection output (the real
    attention layout: strided heads/seq); ``"bhsd"`` contiguous.
    """
    cos, sin = cos_sin(
        batch if cos_batch is None else cos_batch, seq, head_dim, scaling, position_ids, device, dtype
    )

    def make(h):
        if layout == "bshd":
            return torch.randn(batch, seq, h, head_dim, dtype=dtype, device=device).transpose(1, 2)
        return torch.randn(batch, h, seq, head_dim, dtype=dtype, device=device)

    q0, k0 = make(heads).requires_grad_(), make(kv_heads).requires_grad_()
    # the op works in place, so it runs on non-leaf copies that keep q0/k0's layout
    q, k = q0 * 1, k0 * 1
    assert q.stride() == q0.stride()
    qr, kr = apply_rope_(q, k, cos, sin)
    assert qr is q and kr is k
    wq, wk = torch.randn_like(qr), torch.randn_like(kr)
    ((qr.float() * wq.float()).sum() + (kr.float() * wk.float()).sum()).backward()

    q64, k64 = q0.detach().double().requires_grad_(), k0.detach().double().requires_grad_()
    rq, rk = apply_rotary_pos_emb(q64, k64, cos.double(), sin.double())
    ((rq * wq.double()).sum() + (rk * wk.double()).sum()).backward()
    close(qr.detach(), rq.detach(), dtype)
    close(kr.detach(), rk.detach(), dtype)
    close(q0.grad, q64.grad, dtype)
    close(k0.grad, k64.grad, dtype)


PACKED = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5]])  # three sequences packed in one row


# ---------------------------------------------------------------- CPU (reference path)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_cpu_matches_transformers(dtype, scaling):
    check("cpu", dtype, 2, 4, 2, 7, 16, scaling)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_cpu_packed_positions_restart(layout):
    check("cpu", torch.float32, 1, 3, 1, PACKED.shape[1], 12, "llama3", PACKED, layout)


def test_cpu_float64_is_exact_and_backward_is_the_transpose():
    cos, sin = cos_sin(2, 5, 8, "llama3", dtype=torch.float64)
    q, k = torch.randn(2, 3, 5, 8, dtype=torch.float64), torch.randn(2, 1, 5, 8, dtype=torch.float64)
    rq, rk = apply_rotary_pos_emb(q, k, cos, sin)
    qq, kk = q.clone(), k.clone()
    rope_(qq, kk, cos, sin)
    torch.testing.assert_close(qq, rq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kk, rk, rtol=1e-12, atol=1e-12)
    # <R x, g> == <x, R^T g> for random x, g: backward is the adjoint of forward
    g, h = torch.randn_like(q), torch.randn_like(k)
    gg, hh = g.clone(), h.clone()
    rope_backward_(gg, hh, cos, sin)
    lhs = (rq * g).sum() + (rk * h).sum()
    rhs = (q * gg).sum() + (k * hh).sum()
    assert abs(float(lhs - rhs)) < 1e-9 * float(lhs.abs() + 1)


def projection_view_grads(device, dtype):
    """The real attention pattern: q/k are transposed views of projection outputs, rotated in place."""
    b, s, h, hk, d = 2, 9, 4, 2, 16
    cos, sin = cos_sin(b, s, d, "llama3", device=device, dtype=dtype)
    x = torch.randn(b, s, 32, device=device, dtype=dtype)
    wq = (torch.randn(h * d, 32, device=device, dtype=dtype) / 6).requires_grad_()
    wk = (torch.randn(hk * d, 32, device=device, dtype=dtype) / 6).requires_grad_()
    gq, gk = torch.randn(b, h, s, d, device=device), torch.randn(b, hk, s, d, device=device)

    q = (x @ wq.t()).view(b, s, h, d).transpose(1, 2)
    k = (x @ wk.t()).view(b, s, hk, d).transpose(1, 2)
    qr, kr = apply_rope_(q, k, cos, sin)
    ((qr.float() * gq).sum() + (kr.float() * gk).sum()).backward()

    x64, c64, s64 = x.double(), cos.double(), sin.double()
    wq64, wk64 = wq.detach().double().requires_grad_(), wk.detach().double().requires_grad_()
    q64 = (x64 @ wq64.t()).view(b, s, h, d).transpose(1, 2)
    k64 = (x64 @ wk64.t()).view(b, s, hk, d).transpose(1, 2)
    rq, rk = apply_rotary_pos_emb(q64, k64, c64, s64)
    ((rq * gq.double()).sum() + (rk * gk.double()).sum()).backward()
    return (qr.detach(), rq.detach()), (kr.detach(), rk.detach()), (wq.grad, wq64.grad), (wk.grad, wk64.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_in_place_on_projection_views(dtype):
    # the matmul itself rounds to dtype, so compare with a looser bound than the op's own
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    for got, ref in projection_view_grads("cpu", dtype):
        assert rel(got, ref) < tol


def test_cpu_cos_sin_batch_one_broadcasts():
    check("cpu", torch.float32, 3, 2, 2, 5, 8, cos_batch=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cpu(dtype):
    cos, sin = cos_sin(2, 5, 8, dtype=dtype)
    q, k = torch.randn(2, 3, 5, 8, dtype=dtype), torch.randn(2, 1, 5, 8, dtype=dtype)
    torch.library.opcheck(rope_, (q, k, cos, sin))
    torch.library.opcheck(rope_backward_, (q.clone(), k.clone(), cos, sin))
    torch.library.opcheck(rope_grad_, (q.clone(), cos, sin))


def test_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k = torch.empty(2, 4, 9, 16, dtype=torch.bfloat16), torch.empty(2, 2, 9, 16, dtype=torch.bfloat16)
        cos, sin = torch.empty(2, 9, 16, dtype=torch.bfloat16), torch.empty(2, 9, 16, dtype=torch.bfloat16)
        rq, rk = apply_rope_(q, k, cos, sin)
        assert rq.shape == (2, 4, 9, 16) and rk.shape == (2, 2, 9, 16)


def test_expanded_incoming_gradient_is_not_written_through():
    # .sum() hands back an expanded (stride-0) gradient: the op must copy it, not rotate it in place
    cos, sin = cos_sin(1, 4, 8, dtype=torch.float64)
    q0 = torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    k0 = torch.randn(1, 1, 4, 8, dtype=torch.float64, requires_grad=True)
    qr, kr = apply_rope_(q0 * 1, k0 * 1, cos, sin)
    (qr.sum() + kr.sum()).backward()
    q64, k64 = q0.detach().clone().requires_grad_(), k0.detach().clone().requires_grad_()
    rq, rk = apply_rotary_pos_emb(q64, k64, cos, sin)
    (rq.sum() + rk.sum()).backward()
    torch.testing.assert_close(q0.grad, q64.grad)
    torch.testing.assert_close(k0.grad, k64.grad)


def test_bad_input_names_the_problem():
    cos, sin = cos_sin(1, 4, 8)
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="head_dim"):
        apply_rope_(
            torch.randn(1, 2, 4, 7), torch.randn(1, 1, 4, 7), torch.randn(1, 4, 7), torch.randn(1, 4, 7)
        )
    with pytest.raises(ValueError, match="k shape"):
        apply_rope_(q, torch.randn(1, 1, 5, 8), cos, sin)
    with pytest.raises(ValueError, match="cos shape"):
        apply_rope_(q, k, cos[:, :3], sin)
    with pytest.raises(ValueError, match="dtypes differ"):
        apply_rope_(q, k.double(), cos, sin)
    with pytest.raises(ValueError, match="contiguous last dim"):
        apply_rope_(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, cos, sin)
    with pytest.raises(ValueError, match="leaf"):
        apply_rope_(q.clone().requires_grad_(), k, cos, sin)
    leaf = torch.randn(1, 4, 2, 8, requires_grad=True)
    q_before = q.clone()
    with pytest.raises(ValueError, match="leaf"):
        apply_rope_(q, leaf.transpose(1, 2), cos, sin)
    assert torch.equal(q, q_before)  # rejected before anything was rotated
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope_(q, k, cos.requires_grad_(), sin)


def test_overlapping_q_and_k_are_refused_but_disjoint_parts_of_one_buffer_work():
    cos, sin = cos_sin(1, 4, 8)
    buf = torch.randn(2, 1, 4, 8)  # q and k as the two halves of one buffer
    q, k = buf[0:1], buf[1:2]
    qkv = torch.randn(1, 4, 3, 8)  # [b, s, heads, d]
    want_q, want_k = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
    apply_rope_(q, k, cos, sin)
    torch.testing.assert_close(q, want_q)
    torch.testing.assert_close(k, want_k)
    with pytest.raises(ValueError, match="overlap"):
        apply_rope_(qkv[:, :, 0:2].transpose(1, 2), qkv[:, :, 1:2].transpose(1, 2), cos, sin)
    with pytest.raises(ValueError, match="overlap"):
        rope_backward_(q, q, cos, sin)
    g = torch.randn(1, 1, 4, 8)  # one gradient alone (what autograd hands over) is not an "overlap"
    want = rope_backward_reference(g, cos, sin)
    rope_grad_(g, cos, sin)
    torch.testing.assert_close(g, want)


# ---------------------------------------------------------------- GPU (our kernel)

GPU_SHAPES = [
    # batch, heads, kv_heads, seq, head_dim
    (1, 1, 1, 1, 2),  # one row, the smallest head
    (2, 4, 2, 7, 16),  # half 8: vector path for 16-bit, two f32 vectors
    (3, 5, 3, 33, 6),  # half 3: scalar path, odd heads (head groups of 2 end mid-group)
    (1, 7, 1, 129, 130),  # half 65: scalar path, odd seq
    (2, 32, 8, 67, 128),  # llama-8B head layout
    (1, 3, 1, 5, 1024),  # very wide rows
    (4, 2, 2, 1, 64),  # decode-like: one position
    (1, 3, 2, 5, 1030),  # half 515: more chunks than a fast-kernel block holds (runs the fallback)
]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_cuda_matches_transformers(dtype, shape, layout):
    check("cuda", dtype, *shape, scaling="llama3", layout=layout)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_cuda_packed_positions_and_scalings(dtype, scaling):
    pid = torch.cat([PACKED, torch.arange(PACKED.shape[1])[None] + 100])
    check("cuda", dtype, 2, 4, 2, PACKED.shape[1], 64, scaling, pid, "bshd")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_cos_sin_broadcast_and_strided(dtype):
    check("cuda", dtype, 3, 4, 2, 9, 32, cos_batch=1)
    # cos/sin as a [b, s, d] slice of a wider table: seq stride != head_dim
    cos, sin = cos_sin(2, 9, 32, "linear", device="cuda", dtype=dtype)
    wide_c = torch.full((2, 9, 48), float("nan"), device="cuda", dtype=dtype)
    wide_s = wide_c.clone()
    wide_c[..., :32], wide_s[..., :32] = cos, sin
    q, k = (
        torch.randn(2, 4, 9, 32, device="cuda", dtype=dtype),
        torch.randn(2, 2, 9, 32, device="cuda", dtype=dtype),
    )
    rq, rk = apply_rotary_pos_emb(q.double(), k.double(), cos.double(), sin.double())
    apply_rope_(q, k, wide_c[..., :32], wide_s[..., :32])
    close(q, rq, dtype)
    close(k, rk, dtype)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [6, 64, 128])
def test_cuda_poisoned_gaps_untouched_and_every_row_written(dtype, head_dim):
    # q/k live inside NaN-filled buffers with gaps between rows and an odd element offset (breaks
    # 16-byte alignment for the first): every row must be rotated, no gap element touched.
    b, h, hk, s = 2, 5, 3, 11
    cos, sin = cos_sin(b, s, head_dim, "llama3", device="cuda", dtype=dtype)
    for offset in (0, 1):
        qbuf = torch.full((b, s, h, head_dim + 8), float("nan"), device="cuda", dtype=dtype).view(-1)
        kbuf = torch.full((b, s, hk, head_dim + 8), float("nan"), device="cuda", dtype=dtype).view(-1)
        qbuf, kbuf = qbuf[offset:], kbuf[offset:]
        q = qbuf.as_strided(
            (b, h, s, head_dim), (s * h * (head_dim + 8), head_dim + 8, h * (head_dim + 8), 1)
        )
        k = kbuf.as_strided(
            (b, hk, s, head_dim), (s * hk * (head_dim + 8), head_dim + 8, hk * (head_dim + 8), 1)
        )
        q.copy_(torch.randn_like(q))
        k.copy_(torch.randn_like(k))
        rq, rk = apply_rotary_pos_emb(q.double(), k.double(), cos.double(), sin.double())
        nan_before = (torch.isnan(qbuf).sum(), torch.isnan(kbuf).sum())
        apply_rope_(q, k, cos, sin)
        close(q, rq, dtype)
        close(k, rk, dtype)
        assert (torch.isnan(qbuf).sum(), torch.isnan(kbuf).sum()) == nan_before
        # backward on the same layout, gradients in place
        gq, gk = torch.randn_like(q), torch.randn_like(k)
        q64 = torch.randn(q.shape, dtype=torch.float64, device="cuda", requires_grad=True)
        k64 = torch.randn(k.shape, dtype=torch.float64, device="cuda", requires_grad=True)
        oq, ok = apply_rotary_pos_emb(q64, k64, cos.double(), sin.double())
        dq64, dk64 = torch.autograd.grad((oq * gq.double()).sum() + (ok * gk.double()).sum(), [q64, k64])
        q.copy_(gq)
        k.copy_(gk)
        rope_backward_(q, k, cos, sin)
        close(q, dq64, dtype)
        close(k, dk64, dtype)
        assert (torch.isnan(qbuf).sum(), torch.isnan(kbuf).sum()) == nan_before


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_in_place_on_projection_views(dtype):
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    for got, ref in projection_view_grads("cuda", dtype):
        assert torch.isfinite(got).all()
        assert rel(got, ref) < tol


@cuda
@pytest.mark.cuda
def test_cuda_matches_cpu_path_bitwise_close():
    # same inputs through the kernel and the CPU reference (both fp32 math, one rounding)
    cos, sin = cos_sin(2, 37, 128, "llama3", dtype=torch.bfloat16)
    q, k = torch.randn(2, 8, 37, 128, dtype=torch.bfloat16), torch.randn(2, 2, 37, 128, dtype=torch.bfloat16)
    qc, kc = q.cuda(), k.cuda()
    rope_(q, k, cos, sin)
    rope_(qc, kc, cos.cuda(), sin.cuda())
    assert (qc.cpu().float() - q.float()).abs().max() <= 2**-7 * q.float().abs().max()
    assert (kc.cpu().float() - k.float()).abs().max() <= 2**-7 * k.float().abs().max()


@cuda
@pytest.mark.cuda
def test_cuda_opcheck():
    cos, sin = cos_sin(2, 5, 16, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(2, 3, 5, 16, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 1, 5, 16, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(rope_, (q, k, cos, sin))
    torch.library.opcheck(rope_backward_, (q.clone(), k.clone(), cos, sin))
    torch.library.opcheck(rope_grad_, (q.clone(), cos, sin))


@cuda
@pytest.mark.cuda
def test_cuda_side_stream_and_graph_replay():
    cos, sin = cos_sin(1, 257, 128, device="cuda", dtype=torch.float32)
    q = torch.randn(1, 4, 257, 128, device="cuda")
    k = torch.randn(1, 2, 257, 128, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture loads the module
        apply_rope_(q, k, cos, sin)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rope_(q, k, cos, sin)
    q.copy_(torch.randn_like(q))
    k.copy_(torch.randn_like(k))
    rq, rk = apply_rotary_pos_emb(q.double(), k.double(), cos.double(), sin.double())
    graph.replay()
    torch.cuda.synchronize()
    close(q, rq, torch.float32)
    close(k, rk, torch.float32)


@cuda
@pytest.mark.cuda
def test_cuda_no_device_synchronization():
    cos, sin = cos_sin(1, 64, 64, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    rope_(q, k, cos, sin)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        rope_(q, k, cos, sin)
        rope_backward_(q, k, cos, sin)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# 65,536 sequences are more than grid z holds, so a whole batch of them runs the grid-stride
# fallback, while each half (32,768) runs the fast kernel (the cut-over is pinned by the Rust test
# `fast_shape_falls_back_beyond_one_pass`).
FALLBACK_BATCH = 65_536


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("head_dim", [16, 6])
def test_cuda_fallback_bitwise_equal_to_fast_kernel(dtype, backward, head_dim):
    # both kernels pin every rounding step (rot_lo/rot_hi in kernels/rope.cu), so the same rows
    # must come out with the same bits; head_dim 16 takes the vector entries, 6 the scalar ones;
    # 3 + 2 heads leave the last head group partial; each sequence has its own positions.
    b, h, hk, s = FALLBACK_BATCH, 3, 2, 2
    pid = torch.randint(0, 4000, (b, s))
    cos, sin = cos_sin(b, s, head_dim, "llama3", pid, device="cuda", dtype=dtype)
    q = torch.randn(b, s, h, head_dim, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.randn(b, s, hk, head_dim, device="cuda", dtype=dtype).transpose(1, 2)
    op = rope_backward_ if backward else rope_
    whole_q, whole_k = q.clone(), k.clone()
    op(whole_q, whole_k, cos, sin)  # the fallback
    halves_q, halves_k = q.clone(), k.clone()
    for part in (slice(0, b // 2), slice(b // 2, b)):  # the fast kernel, on the same rows
        op(halves_q[part], halves_k[part], cos[part], sin[part])
    assert not torch.equal(whole_q, q) and not torch.equal(halves_q, q)  # both launches rotated
    assert torch.equal(whole_q, halves_q)
    assert torch.equal(whole_k, halves_k)


@cuda
@pytest.mark.cuda
def test_cuda_batch_beyond_grid_z_falls_back_and_is_right():
    # the fallback against the float64 reference (forward and both gradients)
    check("cuda", torch.bfloat16, FALLBACK_BATCH, 2, 1, 1, 16, cos_batch=1)
