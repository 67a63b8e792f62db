"""Residual add + RMSNorm op: plain-torch path on CPU (float64, transformers, opcheck), our kernels on
CUDA (marker ``cuda``), against float64 math and transformers' add-then-norm in every dtype."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import rslora_fast.ops.rms_norm as ops
from rslora_fast.ops.rms_norm import add_rms_norm, add_rms_norm_bwd_dx, add_rms_norm_fwd

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative-norm tolerances against float64 (the op rounds the sum and the output to the dtype)
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
EPS = 1e-6
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
CPU_SHAPES = [(1, 1), (3, 7), (2, 5, 64)]
CUDA_SHAPES = [(1, 1), (3, 7), (5, 8), (2, 5, 64), (7, 1031), (5, 4096), (3, 20000), (2, 32768), (1000, 64)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(device, dtype, shape, gemma, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 0.7
    r = torch.randn(shape, generator=gen) * 2 + 0.5  # non-zero mean: the dot term of dx matters
    w = torch.randn(shape[-1], generator=gen) * (0.1 if gemma else 1.0) + (0.0 if gemma else 1.0)
    ds = torch.randn(shape, generator=gen)
    dy = torch.randn(shape, generator=gen)
    return [t.to(device, dtype) for t in (x, r, w, ds, dy)]


def _float64(x, r, w, gemma):
    s = x + r
    xn = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS)
    return s, (xn * (1 + w) if gemma else xn * w)


def check_against_float64(device, dtype, shape, gemma, train_w, make=lambda t: t):
    x0, r0, w0, ds, dy = _inputs(device, dtype, shape, gemma)
    x, r, w = make(x0).requires_grad_(), make(r0).requires_grad_(), w0.requires_grad_(train_w)
    s, y = add_rms_norm(x, r, w, EPS, gemma)
    assert s.shape == y.shape == x.shape and s.dtype == y.dtype == dtype
    torch.autograd.backward([s, y], [ds, dy])
    x64, r64 = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_(train_w)
    s64, y64 = _float64(x64, r64, w64, gemma)
    torch.autograd.backward([s64, y64], [ds.double(), dy.double()])
    tol = TOL[dtype]
    assert rel(s, s64) < tol, "sum"
    assert rel(y, y64) < tol, "normed"
    assert torch.equal(x.grad, r.grad), "both addends get the same gradient"
    assert rel(x.grad, x64.grad) < tol, "d addends"
    if train_w:
        assert rel(w.grad, w64.grad) < tol, "dw"
    else:
        assert w.grad is None


def check_against_transformers(device, dtype, shape, gemma, train_w):
    """Against transformers' ``h = residual + x; norm(h)`` in the same dtype, every gradient."""
    x0, r0, w0, ds, dy = _inputs(device, dtype, shape, gemma, seed=1)
    module = (GemmaRMSNorm if gemma else LlamaRMSNorm)(shape[-1], eps=EPS).to(device, dtype)
    with torch.no_grad():
        module.weight.copy_(w0)
    module.weight.requires_grad_(train_w)
    x, r = x0.clone().requires_grad_(), r0.clone().requires_grad_()
    s_ref = r + x
    y_ref = module(s_ref)
    torch.autograd.backward([s_ref, y_ref], [ds, dy])
    xg, rg = x0.clone().requires_grad_(), r0.clone().requires_grad_()
    w = module.weight.detach().clone().requires_grad_(train_w)
    s, y = add_rms_norm(xg, rg, w, EPS, gemma)
    torch.autograd.backward([s, y], [ds, dy])
    assert torch.equal(s, s_ref)  # the same rounded sum
    # the norm's reduction order differs on CUDA; the addends' gradient is rounded once here,
    # twice in transformers (norm gradient, then the add): a few units in the last place
    ulp = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(y, y_ref, rtol=ulp, atol=ulp)
    torch.testing.assert_close(xg.grad, x.grad, rtol=ulp, atol=ulp * max(1.0, float(x.grad.abs().max())))
    torch.testing.assert_close(rg.grad, r.grad, rtol=ulp, atol=ulp * max(1.0, float(r.grad.abs().max())))
    if train_w:
        assert rel(w.grad, module.weight.grad) < TOL[dtype]


# ---------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("train_w", [False, True])
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_cpu_matches_float64(dtype, shape, gemma, train_w):
    check_against_float64("cpu", dtype, shape, gemma, train_w)


@pytest.mark.parametrize("train_w", [False, True])
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_matches_transformers_add_then_norm(dtype, gemma, train_w):
    check_against_transformers("cpu", dtype, (4, 6, 40), gemma, train_w)


def test_cpu_reference_is_the_unfused_math_exactly():
    x, r, w, ds, dy = _inputs("cpu", torch.bfloat16, (5, 24), False)
    s, y, rstd = ops.add_rms_norm_reference(x, r, w, EPS)
    assert torch.equal(s, x + r) and torch.equal(y, ops.rms_norm_reference(x + r, w, EPS)[0])
    d = ops.add_rms_norm_backward_reference(dy, ds, s, w, rstd)
    dn, _ = ops._dx_reference(dy, s, w, rstd, False)
    assert torch.equal(d, (dn + ds.float()).to(torch.bfloat16))


def test_opcheck_cpu():
    for gemma in (False, True):
        x, r, w, ds, dy = _inputs("cpu", torch.float32, (3, 17), gemma)
        torch.library.opcheck(
            add_rms_norm_fwd, (x.requires_grad_(), r.requires_grad_(), w.requires_grad_(), EPS, gemma)
        )
        s, _, rstd = add_rms_norm_fwd(x.detach(), r.detach(), w.detach(), EPS, gemma)
        torch.library.opcheck(add_rms_norm_bwd_dx, (dy, ds, s, w.detach(), rstd, gemma))


class _Recorder:
    def __init__(self, op=None):
        self.op, self.calls = op, 0

    def __call__(self, *args):
        if self.op is None:
            raise AssertionError("this backward op must not run here")
        self.calls += 1
        return self.op(*args)


def test_frozen_weight_takes_the_fused_backward_and_a_trainable_one_the_dw_op(monkeypatch):
    x, r, w, ds, dy = _inputs("cpu", torch.float32, (4, 32), False)
    fused = _Recorder(add_rms_norm_bwd_dx)
    monkeypatch.setattr(ops, "add_rms_norm_bwd_dx", fused)
    monkeypatch.setattr(ops, "rms_norm_bwd", _Recorder())
    s, y = add_rms_norm(x.requires_grad_(), r, w, EPS)
    torch.autograd.backward([s, y], [ds, dy])
    assert fused.calls == 1 and x.grad is not None
    monkeypatch.undo()
    dw_op = _Recorder(ops.rms_norm_bwd)
    monkeypatch.setattr(ops, "rms_norm_bwd", dw_op)
    monkeypatch.setattr(ops, "add_rms_norm_bwd_dx", _Recorder())
    w.requires_grad_()
    s, y = add_rms_norm(x, r, w, EPS)
    torch.autograd.backward([s, y], [ds, dy])
    assert dw_op.calls == 1 and w.grad is not None


@pytest.mark.parametrize("used", ["sum", "normed"])
def test_one_output_used_alone(used):
    x, r, w, ds, dy = _inputs("cpu", torch.float64, (3, 9), False)
    x.requires_grad_()
    s, y = add_rms_norm(x, r, w, EPS)
    (s if used == "sum" else y).backward(ds if used == "sum" else dy)
    x64 = x.detach().clone().requires_grad_()
    s64, y64 = _float64(x64, r, w, False)
    (s64 if used == "sum" else y64).backward(ds if used == "sum" else dy)
    torch.testing.assert_close(x.grad, x64.grad)


def test_bad_input_names_the_problem():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, torch.randn(3, 9), torch.ones(8))
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, torch.randn(3, 8, dtype=torch.float64), torch.ones(8))
    with pytest.raises(ValueError, match="weight shape"):
        add_rms_norm(x, torch.randn(3, 8), torch.ones(7))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 16, dtype=torch.bfloat16)
        s, y, rstd = add_rms_norm_fwd(
            x, torch.empty_like(x), torch.empty(16, dtype=torch.bfloat16), EPS, False
        )
        assert s.shape == y.shape == x.shape and rstd.shape == (2, 3) and rstd.dtype == torch.float32


# ---------------------------------------------------------------------------- CUDA
@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("train_w", [False, True])
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_matches_float64(dtype, shape, gemma, train_w):
    check_against_float64("cuda", dtype, shape, gemma, train_w)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("train_w", [False, True])
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 64), (5, 4096), (7, 1031), (2, 20000), (2, 1024, 4096)])
def test_cuda_matches_transformers_add_then_norm(dtype, shape, gemma, train_w):
    check_against_transformers("cuda", dtype, shape, gemma, train_w)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_non_contiguous_and_unaligned(dtype):
    # transposed inputs, then an odd storage offset (16-byte alignment lost: the generic paths)
    check_against_float64("cuda", dtype, (96, 80), False, False, make=lambda t: t.t().contiguous().t())
    check_against_float64("cuda", dtype, (96, 80), True, True, make=lambda t: t.t().contiguous().t())
    store = torch.randn(2, 3 * 1024 + 1, device="cuda", dtype=dtype)
    x, r = store[0, 1:].view(3, 1024).requires_grad_(), store[1, 1:].view(3, 1024).requires_grad_()
    w = torch.randn(1024, device="cuda", dtype=dtype) * 0.3 + 1
    s, y = add_rms_norm(x, r, w, EPS)
    ds, dy = torch.randn_like(s), torch.randn_like(y)
    torch.autograd.backward([s, y], [ds, dy])
    x64, r64 = x.detach().double().requires_grad_(), r.detach().double()
    s64, y64 = _float64(x64, r64, w.double(), False)
    torch.autograd.backward([s64, y64], [ds.double(), dy.double()])
    assert rel(y, y64) < TOL[dtype] and rel(x.grad, x64.grad) < TOL[dtype]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(13, 512), (5, 4096), (3, 1031), (2, 20000), (1000, 64), (3, 32768)])
def test_cuda_poisoned_outputs_are_all_written(dtype, shape, gemma):
    from rslora_fast import _core

    x, r, w, ds, dy = _inputs("cuda", dtype, shape, gemma)
    rows, cols = x.numel() // shape[-1], shape[-1]
    name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    stream = torch.cuda.current_stream().cuda_stream
    s, y = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    rstd = torch.full(shape[:-1], float("nan"), device="cuda")
    _core.add_rms_norm_fwd(
        x.data_ptr(), r.data_ptr(), w.data_ptr(), s.data_ptr(), y.data_ptr(), rstd.data_ptr(),
        rows, cols, EPS, gemma, name, 0, stream,
    )  # fmt: skip
    dx = torch.full_like(x, float("nan"))
    _core.add_rms_norm_bwd_dx(
        dy.data_ptr(), ds.data_ptr(), s.data_ptr(), w.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
        rows, cols, gemma, name, 0, stream,
    )  # fmt: skip
    torch.cuda.synchronize()
    for t in (s, y, rstd, dx):
        assert torch.isfinite(t).all()
    ref_s, ref_y, ref_rstd = ops.add_rms_norm_reference(x, r, w, EPS, gemma)
    assert torch.equal(s, ref_s)
    assert rel(y, ref_y) < TOL[dtype] and rel(rstd, ref_rstd) < 1e-5
    assert rel(dx, ops.add_rms_norm_backward_reference(dy, ds, s, w, rstd, gemma)) < TOL[dtype]


@cuda
@pytest.mark.cuda
def test_cuda_opcheck_empty_rows_and_side_stream():
    x, r, w, ds, dy = _inputs("cuda", torch.bfloat16, (5, 33), False)
    torch.library.opcheck(add_rms_norm_fwd, (x.requires_grad_(), r, w, EPS, False))
    s, _, rstd = add_rms_norm_fwd(x.detach(), r, w, EPS, False)
    torch.library.opcheck(add_rms_norm_bwd_dx, (dy, ds, s, w, rstd, False))
    e = torch.empty(0, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    s, y = add_rms_norm(e, torch.empty_like(e), torch.ones(64, device="cuda", dtype=torch.bfloat16))
    (s.sum() + y.sum()).backward()
    assert e.grad.shape == (0, 64)
    x, r, w, _, _ = _inputs("cuda", torch.bfloat16, (4096, 4096), False)
    ref = add_rms_norm(x, r, w)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = add_rms_norm(x, r, w)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
