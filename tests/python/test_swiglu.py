"""SwiGLU op: reference on CPU (opcheck + float64), our kernel on CUDA (marker ``cuda``)."""

from __future__ import annotations

import pytest
import torch

from rslora_fast.ops.swiglu import swiglu, swiglu_bwd, swiglu_fwd

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative-norm tolerances against a float64 reference (the op rounds its output to dtype)
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [(1,), (7,), (3, 1021), (2, 5, 333), (4099, 13)]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_against_float64(device: str, dtype: torch.dtype, shape, make=lambda t: t) -> None:
    g0 = torch.randn(shape, dtype=dtype, device=device) * 3
    u0 = torch.randn(shape, dtype=dtype, device=device) * 3
    g, u = make(g0).requires_grad_(), make(u0).requires_grad_()
    h = swiglu(g, u)
    assert h.shape == g.shape and h.dtype == dtype
    dh = torch.randn_like(h)
    h.backward(dh)
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    ref = torch.nn.functional.silu(g64) * u64
    ref.backward(dh.double())
    tol = TOL[dtype]
    assert torch.isfinite(h).all()
    assert rel(h, ref) < tol
    assert rel(g.grad, g64.grad) < tol
    assert rel(u.grad, u64.grad) < tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_cpu_matches_float64(dtype, shape):
    check_against_float64("cpu", dtype, shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cpu(dtype):
    g = torch.randn(3, 17, dtype=dtype, requires_grad=True)
    u = torch.randn(3, 17, dtype=dtype, requires_grad=True)
    torch.library.opcheck(swiglu_fwd, (g, u))
    torch.library.opcheck(swiglu_bwd, (torch.randn(3, 17, dtype=dtype), g.detach(), u.detach()))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        g = torch.empty(4, 9, dtype=torch.bfloat16)
        h = swiglu(g, torch.empty(4, 9, dtype=torch.bfloat16))
        assert h.shape == (4, 9) and h.dtype == torch.bfloat16


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="shape"):
        swiglu(torch.randn(3, 4), torch.randn(4, 3))
    with pytest.raises(ValueError, match="dtype"):
        swiglu(torch.randn(3), torch.randn(3, dtype=torch.float64))


def test_non_contiguous_cpu():
    check_against_float64("cpu", torch.float32, (64, 48), make=lambda t: t.t())


# ---------------------------------------------------------------- GPU (our kernel)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_matches_float64(dtype, shape):
    check_against_float64("cuda", dtype, shape)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_unaligned_and_non_contiguous(dtype):
    # an odd offset into storage breaks 16-byte alignment: the scalar path must still be right
    check_against_float64("cuda", dtype, (1, 4097), make=lambda t: t.view(-1)[1:].clone()[None])
    storage = torch.randn(4099, dtype=dtype, device="cuda")
    g, u = storage[1:4098], storage.flip(0)[1:4098]  # unaligned and a negative-stride view
    h = swiglu(g, u)
    assert rel(h, torch.nn.functional.silu(g.double()) * u.double()) < TOL[dtype]
    check_against_float64("cuda", dtype, (96, 80), make=lambda t: t.t())


@cuda
@pytest.mark.cuda
def test_cuda_opcheck():
    g = torch.randn(5, 33, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn(5, 33, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(swiglu_fwd, (g, u))


@cuda
@pytest.mark.cuda
def test_cuda_side_stream_and_poisoned_output():
    g = torch.randn(1 << 20, device="cuda", dtype=torch.bfloat16)
    u = torch.randn(1 << 20, device="cuda", dtype=torch.bfloat16)
    ref = (torch.nn.functional.silu(g.float()) * u.float()).to(torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        h = swiglu(g, u)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(h, ref) or rel(h, ref) < 1e-2
    assert torch.isfinite(h).all()


@cuda
@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    g = torch.randn(3, 4097, device="cuda", dtype=torch.float32)
    u = torch.randn(3, 4097, device="cuda", dtype=torch.float32)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside capture loads the module
        swiglu(g, u)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = swiglu(g, u)
    g.copy_(torch.randn_like(g))
    u.copy_(torch.randn_like(u))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert rel(out, torch.nn.functional.silu(g.double()) * u.double()) < 1e-6


@cuda
@pytest.mark.cuda
def test_cuda_no_device_synchronization():
    g = torch.randn(1 << 16, device="cuda")
    u = torch.randn(1 << 16, device="cuda")
    swiglu(g, u)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        h = swiglu(g, u)
        h.sum()
    finally:
        torch.cuda.set_sync_debug_mode("default")
