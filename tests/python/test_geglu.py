"""GeGLU op: reference on CPU (opcheck + float64), our kernel on CUDA (marker ``cuda``).

The expected values always come from ``torch.nn.functional.gelu`` in float64 and torch autograd
(never from the op under test).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rslora_fast.ops.geglu import geglu, geglu_bwd, geglu_fwd

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
APPROX = ["tanh", "none"]
# relative-norm tolerances against a float64 reference (the op rounds its output to dtype; fp32
# leaves room for the kernel's __expf, a few ulp off)
TOL = {torch.float32: 4e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# odd sizes: scalar-only, one row, vector body + tail, wide rows, many short rows
SHAPES = [(1,), (7,), (1, 4097), (3, 1021), (2, 5, 333), (4099, 13), (2, 65543), (1, (1 << 20) + 3)]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error norm. Inputs are O(1) here, so the denominator is floored at an RMS of 1: a
    tensor of a few elements that all sit deep in gelu's tail (outputs ~1e-7, where even torch's
    float32 ``1 + tanh`` cancels) is judged by its absolute error instead of by noise / noise."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), b.numel() ** 0.5))


def reference64(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor, approximate: str):
    """(h, dg, du) in float64 from torch's own gelu and autograd."""
    g64 = g.detach().double().requires_grad_()
    u64 = u.detach().double().requires_grad_()
    h64 = F.gelu(g64, approximate=approximate) * u64
    h64.backward(dh.double())
    return h64.detach(), g64.grad, u64.grad


def check_against_float64(device: str, dtype: torch.dtype, shape, approximate: str, make=lambda t: t) -> None:
    g0 = torch.randn(shape, dtype=dtype, device=device) * 3
    u0 = torch.randn(shape, dtype=dtype, device=device) * 3
    g, u = make(g0).requires_grad_(), make(u0).requires_grad_()
    h = geglu(g, u, approximate)
    assert h.shape == g.shape and h.dtype == dtype
    dh = torch.randn_like(h)
    h.backward(dh)
    ref_h, ref_dg, ref_du = reference64(g, u, dh, approximate)
    tol = TOL[dtype]
    for got in (h, g.grad, u.grad):
        assert got.dtype == dtype and got.shape == g.shape
        assert torch.isfinite(got).all()
    assert rel(h, ref_h) < tol
    assert rel(g.grad, ref_dg) < tol
    assert rel(u.grad, ref_du) < tol


# ---------------------------------------------------------------- CPU (plain-torch path)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:5])
def test_cpu_matches_float64(dtype, shape, approximate):
    check_against_float64("cpu", dtype, shape, approximate)


@pytest.mark.parametrize("approximate", APPROX)
def test_cpu_backward_matches_autograd_of_torch_gelu_in_float64(approximate):
    # the hand-written gradient of the CPU path against torch autograd, both in float64 inputs
    # rounded from float32 (so only the closed-form derivative is under test)
    g = torch.linspace(-12, 12, 2001, dtype=torch.float32)
    u = torch.randn(2001)
    dh = torch.randn(2001)
    dg, du = geglu_bwd(dh, g, u, approximate)
    _, ref_dg, ref_du = reference64(g, u, dh, approximate)
    assert rel(dg, ref_dg) < 1e-6
    assert rel(du, ref_du) < 1e-6


def test_variants_differ():
    # guards against one variant silently running the other
    g = torch.linspace(-3, 3, 101)
    u = torch.ones(101)
    assert rel(geglu(g, u, "tanh"), geglu(g, u, "none")) > 1e-5


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cpu(dtype, approximate):
    g = torch.randn(3, 17, dtype=dtype, requires_grad=True)
    u = torch.randn(3, 17, dtype=dtype, requires_grad=True)
    torch.library.opcheck(geglu_fwd, (g, u, approximate))
    torch.library.opcheck(geglu_bwd, (torch.randn(3, 17, dtype=dtype), g.detach(), u.detach(), approximate))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        g = torch.empty(4, 9, dtype=torch.bfloat16)
        h = geglu(g, torch.empty(4, 9, dtype=torch.bfloat16), "none")
        assert h.shape == (4, 9) and h.dtype == torch.bfloat16


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="shape"):
        geglu(torch.randn(3, 4), torch.randn(4, 3))
    with pytest.raises(ValueError, match="dtype"):
        geglu(torch.randn(3), torch.randn(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="approximate"):
        geglu(torch.randn(3), torch.randn(3), "erf")


def test_non_contiguous_cpu():
    check_against_float64("cpu", torch.float32, (64, 48), "tanh", make=lambda t: t.t())


def test_default_is_tanh():
    g, u = torch.randn(50), torch.randn(50)
    assert torch.equal(geglu(g, u), geglu(g, u, "tanh"))


# ---------------------------------------------------------------- GPU (our kernel)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_matches_float64(dtype, shape, approximate):
    check_against_float64("cuda", dtype, shape, approximate)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_unaligned_and_non_contiguous(dtype, approximate):
    # a contiguous view one element into its storage is not 16-byte aligned and is passed as is
    # (no copy): forward and backward must take the scalar path and still be right
    check_against_float64("cuda", dtype, (1, 4097), approximate, make=lambda t: t.view(-1)[1:][None])
    storage = torch.randn(4099, dtype=dtype, device="cuda") * 3
    g, u = storage[1:4098], storage.flip(0)[1:4098]  # unaligned and a negative-stride view
    h = geglu(g, u, approximate)
    assert rel(h, F.gelu(g.double(), approximate=approximate) * u.double()) < TOL[dtype]
    check_against_float64("cuda", dtype, (96, 80), approximate, make=lambda t: t.t())
    check_against_float64("cuda", dtype, (33, 70), approximate, make=lambda t: t[:, 3:67])


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_every_output_element_written(dtype, approximate):
    # outputs poisoned with NaN before the op: any element the kernel skips stays NaN
    n = 3 * 8191 + 5
    g = torch.randn(n, device="cuda", dtype=dtype) * 3
    u = torch.randn(n, device="cuda", dtype=dtype)
    dh = torch.randn(n, device="cuda", dtype=dtype)
    h, dg, du = (torch.full((n,), float("nan"), device="cuda", dtype=dtype) for _ in range(3))
    device, stream = torch.cuda.current_device(), torch.cuda.current_stream().cuda_stream
    from rslora_fast.ops._launch import core, dtype_name

    name = dtype_name(g, "geglu")
    core().geglu_fwd(g.data_ptr(), u.data_ptr(), h.data_ptr(), n, name, approximate, device, stream)
    core().geglu_bwd(
        dh.data_ptr(),
        g.data_ptr(),
        u.data_ptr(),
        dg.data_ptr(),
        du.data_ptr(),
        n,
        name,
        approximate,
        device,
        stream,
    )
    torch.cuda.synchronize()
    ref_h, ref_dg, ref_du = reference64(g, u, dh, approximate)
    for got, ref in ((h, ref_h), (dg, ref_dg), (du, ref_du)):
        assert torch.isfinite(got).all()
        assert rel(got, ref) < TOL[dtype]


@cuda
@pytest.mark.cuda
def test_cuda_saturated_inputs_stay_finite():
    # |g| far past where gelu saturates (and x^3 would overflow float32): exact limits, no NaN
    g = torch.tensor([-1e30, -1e6, -30.0, -20.0, -5.0, 0.0, 5.0, 20.0, 30.0, 1e6, 1e30], device="cuda")
    u = torch.ones_like(g)
    dh = torch.ones_like(g)
    for approximate in APPROX:
        h = geglu(g, u, approximate)
        dg, du = geglu_bwd(dh, g, u, approximate)
        ref_h, ref_dg, _ = reference64(g, u, dh, approximate)
        assert torch.isfinite(h).all() and torch.isfinite(dg).all() and torch.isfinite(du).all()
        torch.testing.assert_close(h.double(), ref_h, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dg.double(), ref_dg, rtol=1e-5, atol=1e-6)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("approximate", APPROX)
def test_cuda_opcheck(approximate):
    g = torch.randn(5, 33, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn(5, 33, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(geglu_fwd, (g, u, approximate))
    torch.library.opcheck(geglu_bwd, (torch.randn_like(g), g.detach(), u.detach(), approximate))


@cuda
@pytest.mark.cuda
def test_cuda_side_stream():
    g = torch.randn(1 << 20, device="cuda", dtype=torch.bfloat16)
    u = torch.randn(1 << 20, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        h = geglu(g, u, "tanh")
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.isfinite(h).all()
    assert rel(h, F.gelu(g.double(), approximate="tanh") * u.double()) < TOL[torch.bfloat16]


@cuda
@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    g = torch.randn(3, 4097, device="cuda", dtype=torch.float32)
    u = torch.randn(3, 4097, device="cuda", dtype=torch.float32)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside capture loads the module
        geglu(g, u, "none")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = geglu(g, u, "none")
    g.copy_(torch.randn_like(g))
    u.copy_(torch.randn_like(u))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert rel(out, F.gelu(g.double()) * u.double()) < TOL[torch.float32]


@cuda
@pytest.mark.cuda
def test_cuda_no_device_synchronization():
    g = torch.randn(1 << 16, device="cuda")
    u = torch.randn(1 << 16, device="cuda")
    geglu(g, u)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        h = geglu(g, u)
        h.sum()
    finally:
        torch.cuda.set_sync_debug_mode("default")
