"""RMSNorm op: reference on CPU (opcheck + float64 + transformers), our kernel on CUDA (marker ``cuda``)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import rslora_fast.ops.rms_norm as rms_norm_module
from rslora_fast.ops.rms_norm import rms_norm, rms_norm_bwd, rms_norm_bwd_dx, rms_norm_fwd

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative-norm tolerances against a float64 reference (the op rounds to dtype, Llama twice)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
# one-element tolerance against transformers' own module in the same dtype: two units in the last place
ULP2 = {torch.float32: 2.0**-22, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}
EPS = 1e-6
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def rel_dx(got, ref, x64, w64, dy, gemma) -> float:
    """Error of dx relative to the size of the two terms it is the difference of.

    dx = rstd * (g - x_hat * mean(g * x_hat)) cancels almost exactly when a row is one element
    wide, so its own norm is no scale for rounding errors; rstd * g is.
    """
    rstd = torch.rsqrt(x64.detach().pow(2).mean(-1, keepdim=True) + EPS)
    scale = (rstd * dy.double() * (w64.detach() + (1 if gemma else 0))).norm()
    got, ref = got.detach().double(), ref.detach()
    return float((got - ref).norm() / torch.maximum(ref.norm(), scale).clamp_min(1e-30))


def float64_reference(x: torch.Tensor, w: torch.Tensor, gemma: bool) -> torch.Tensor:
    """Exact RMSNorm in float64 (no intermediate rounding), differentiable."""
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return xn * (1 + w) if gemma else xn * w


def make_inputs(device, dtype, shape, gemma):
    x = torch.randn(shape, device=device) * 2 + 0.5  # non-zero mean: the dot term of dx matters
    w = torch.randn(shape[-1], device=device) * (0.1 if gemma else 1.0) + (0.0 if gemma else 1.0)
    return x.to(dtype), w.to(dtype)


def check_against_float64(device, dtype, shape, gemma, make=lambda t: t, make_w=lambda t: t):
    x0, w0 = make_inputs(device, dtype, shape, gemma)
    x, w = make(x0).requires_grad_(), make_w(w0).requires_grad_()
    y = rms_norm(x, w, EPS, gemma)
    assert y.shape == x.shape and y.dtype == dtype
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = float64_reference(x64, w64, gemma)
    ref.backward(dy.double())
    tol = TOL[dtype]
    for got in (y, x.grad, w.grad):
        assert torch.isfinite(got).all()
    assert rel(y, ref) < tol, "output"
    assert rel_dx(x.grad, x64.grad, x64, w64, dy, gemma) < tol, "dx"
    assert rel(w.grad, w64.grad) < tol, "dw"


@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 64)])
def test_cpu_matches_float64(dtype, shape, gemma):
    check_against_float64("cpu", dtype, shape, gemma)


@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_is_transformers_exactly(dtype, gemma):
    x, w = make_inputs("cpu", dtype, (4, 48), gemma)
    module = (GemmaRMSNorm if gemma else LlamaRMSNorm)(48, eps=EPS).to(dtype)
    with torch.no_grad():
        module.weight.copy_(w)
        assert torch.equal(rms_norm(x, w, EPS, gemma), module(x))


@pytest.mark.parametrize("gemma", [False, True])
def test_opcheck_cpu(gemma):
    x = torch.randn(3, 17, dtype=torch.float32, requires_grad=True)
    w = torch.randn(17, dtype=torch.float32, requires_grad=True)
    torch.library.opcheck(rms_norm_fwd, (x, w, EPS, gemma))
    _, rstd = rms_norm_fwd(x.detach(), w.detach(), EPS, gemma)
    torch.library.opcheck(rms_norm_bwd, (torch.randn(3, 17), x.detach(), w.detach(), rstd, gemma))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 4, 9, dtype=torch.bfloat16)
        y, rstd = rms_norm_fwd(x, torch.empty(9, dtype=torch.bfloat16), EPS, False)
        assert y.shape == (2, 4, 9) and y.dtype == torch.bfloat16
        assert rstd.shape == (2, 4) and rstd.dtype == torch.float32


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(torch.randn(3, 4), torch.randn(5))
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(torch.randn(3, 4), torch.randn(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="last dimension"):
        rms_norm(torch.randn(3, 0), torch.randn(0))


def test_non_contiguous_cpu():
    check_against_float64("cpu", torch.float32, (40, 24), False, make=lambda t: t.t().contiguous().t())
    check_against_float64("cpu", torch.float32, (24, 40), True, make=lambda t: t.repeat(1, 2)[:, ::2])


def test_frozen_weight_gets_no_gradient():
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(8)
    rms_norm(x, w).sum().backward()
    assert x.grad is not None and w.grad is None


@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_dx_only_op_matches_float64(dtype, gemma):
    x, w = make_inputs("cpu", dtype, (5, 3, 40), gemma)
    dy = torch.randn_like(x)
    _, rstd = rms_norm_fwd(x, w, EPS, gemma)
    dx = rms_norm_bwd_dx(dy, x, w, rstd, gemma)
    assert dx.shape == x.shape and dx.dtype == dtype
    x64, w64 = x.double().requires_grad_(), w.double()
    float64_reference(x64, w64, gemma).backward(dy.double())
    assert rel_dx(dx, x64.grad, x64, w64, dy, gemma) < TOL[dtype]


def test_opcheck_cpu_dx_only():
    x, w = torch.randn(3, 17), torch.randn(17)
    _, rstd = rms_norm_fwd(x, w, EPS, False)
    torch.library.opcheck(rms_norm_bwd_dx, (torch.randn(3, 17), x, w, rstd, False))
    torch.library.opcheck(rms_norm_bwd_dx, (torch.randn(3, 17), x, w, rstd, True))


class _Recorder:
    """Stands in for one of the module's backward ops: records calls, or refuses them."""

    def __init__(self, op=None):
        self.op, self.calls = op, 0

    def __call__(self, *args):
        if self.op is None:
            raise AssertionError("this backward op must not run here")
        self.calls += 1
        return self.op(*args)


@pytest.mark.parametrize("gemma", [False, True])
def test_frozen_weight_backward_takes_the_dx_only_op(gemma, monkeypatch):
    # The routing is the same on every device (the op decides, then dispatches by device): a
    # frozen weight must never reach the dw-computing op.
    dx_only = _Recorder(rms_norm_bwd_dx)
    monkeypatch.setattr(rms_norm_module, "rms_norm_bwd_dx", dx_only)
    monkeypatch.setattr(rms_norm_module, "rms_norm_bwd", _Recorder())
    x, w = make_inputs("cpu", torch.float32, (6, 24), gemma)
    x.requires_grad_()
    dy = torch.randn(6, 24)
    rms_norm(x, w, EPS, gemma).backward(dy)
    assert dx_only.calls == 1 and w.grad is None
    x64 = x.detach().double().requires_grad_()
    float64_reference(x64, w.double(), gemma).backward(dy.double())
    assert rel_dx(x.grad, x64.grad, x64, w.double(), dy, gemma) < TOL[torch.float32]


@pytest.mark.parametrize("x_trains", [True, False])
def test_trainable_weight_backward_computes_dw(x_trains, monkeypatch):
    with_dw = _Recorder(rms_norm_bwd)
    monkeypatch.setattr(rms_norm_module, "rms_norm_bwd", with_dw)
    monkeypatch.setattr(rms_norm_module, "rms_norm_bwd_dx", _Recorder())
    x, w = make_inputs("cpu", torch.float32, (6, 24), False)
    x.requires_grad_(x_trains)
    w.requires_grad_()
    dy = torch.randn(6, 24)
    rms_norm(x, w, EPS).backward(dy)
    assert with_dw.calls == 1 and (x.grad is not None) == x_trains
    w64 = w.detach().double().requires_grad_()
    float64_reference(x.detach().double(), w64, False).backward(dy.double())
    assert rel(w.grad, w64.grad) < TOL[torch.float32]


# ---------------------------------------------------------------- GPU (our kernel)

# Warp-per-row and block-per-row layouts, widths that are not multiples of the vector (generic
# paths), one row, rows not a multiple of 8, a two-warp 16-bit forward block (4096 at 64 elements),
# very wide rows: 16384 (the last fast-path width of the backward with dw and of the 4-vector
# dx-only entry), 20000 (generic backward with dw, 8-vector dx-only), 32768 (the last 16-bit forward
# fast-path width: 512 threads x 64 elements) and 32776 (the first past it).
CUDA_SHAPES = [
    (1, 1),
    (1, 8),
    (3, 7),
    (13, 512),
    (5, 1000),
    (2, 3, 1024),
    (4, 1031),
    (9, 2048),
    (6, 4096),
    (33, 4096),
    (3, 5000),
    (3, 8192),
    (2, 16384),
    (1, 16383),
    (2, 20000),
    (2, 32768),
    (1, 32776),
    (257, 96),
]


def check_frozen_weight_against_float64(device, dtype, shape, gemma, monkeypatch, make=lambda t: t):
    """Input gradient with a frozen weight; fails if the dw-computing op is called at all."""
    monkeypatch.setattr(rms_norm_module, "rms_norm_bwd", _Recorder())
    x0, w = make_inputs(device, dtype, shape, gemma)
    x = make(x0).requires_grad_()
    y = rms_norm(x, w, EPS, gemma)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert w.grad is None and torch.isfinite(x.grad).all()
    x64, w64 = x.detach().double().requires_grad_(), w.double()
    ref = float64_reference(x64, w64, gemma)
    ref.backward(dy.double())
    assert rel(y, ref) < TOL[dtype], "output"
    assert rel_dx(x.grad, x64.grad, x64, w64, dy, gemma) < TOL[dtype], "dx"


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_matches_float64(dtype, shape, gemma):
    check_against_float64("cuda", dtype, shape, gemma)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_frozen_weight_matches_float64(dtype, shape, gemma, monkeypatch):
    check_frozen_weight_against_float64("cuda", dtype, shape, gemma, monkeypatch)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_realistic_size_matches_float64(dtype, gemma, monkeypatch):
    # many rows per group in the one-wave dw grid (partial sums and their reduction); one group
    # per row in the dx-only grid
    check_against_float64("cuda", dtype, (4, 2048, 4096), gemma)
    check_frozen_weight_against_float64("cuda", dtype, (4, 2048, 4096), gemma, monkeypatch)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 64), (5, 4096), (3, 16384), (7, 1031), (2, 32768)])
def test_cuda_matches_transformers_module(dtype, shape, gemma):
    x, w = make_inputs("cuda", dtype, shape, gemma)
    module = (GemmaRMSNorm if gemma else LlamaRMSNorm)(shape[-1], eps=EPS).to("cuda", dtype)
    with torch.no_grad():
        module.weight.copy_(w)
        ref = module(x)
    y = rms_norm(x, w, EPS, gemma)
    # the kernel's sum of squares runs in another order: allow two units in the last place
    torch.testing.assert_close(y, ref, rtol=ULP2[dtype], atol=1e-6)


CORE_DTYPE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def rows_per_block(cols: int) -> int:
    """Rows a block of the backward with dw holds at once: rows of at most 32 x 32 elements are a
    warp's each, eight warps to a block; wider rows are a whole block's."""
    return 8 if cols <= 32 * 32 else 1


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(13, 512), (5, 4096), (3, 1031), (2, 20000), (1000, 64), (3, 32768)])
def test_cuda_poisoned_outputs_are_all_written(dtype, shape, gemma):
    from rslora_fast import _core

    x, w = make_inputs("cuda", dtype, shape, gemma)
    dy = torch.randn_like(x)
    rows, cols = shape
    y = torch.full_like(x, float("nan"))
    rstd = torch.full((rows,), float("nan"), device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    name = CORE_DTYPE[dtype]
    _core.rms_norm_fwd(
        x.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr(), rows, cols, EPS, gemma, name, 0, stream
    )
    n = _core.rms_norm_bwd_partial_rows(rows, cols, name, 0)
    # one partial row per group of whole blocks: a narrow-row block's idle groups write zero rows
    per_block = rows_per_block(cols)
    assert n % per_block == 0 and 1 <= n <= -(-rows // per_block) * per_block
    dx = torch.full_like(x, float("nan"))
    partial = torch.full((n, cols), float("nan"), device="cuda")
    rms_norm_module.launch_bwd(dy, x, w, rstd, dx, partial, gemma)
    dx_only = torch.full_like(x, float("nan"))
    _core.rms_norm_bwd_dx(
        dy.data_ptr(),
        x.data_ptr(),
        w.data_ptr(),
        rstd.data_ptr(),
        dx_only.data_ptr(),
        rows,
        cols,
        gemma,
        name,
        0,
        stream,
    )
    torch.cuda.synchronize()
    for t in (y, rstd, dx, partial, dx_only):
        assert torch.isfinite(t).all()
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = float64_reference(x64, w64, gemma)
    ref.backward(dy.double())
    ref_rstd = torch.rsqrt(x.double().pow(2).mean(-1) + EPS)
    assert rel(rstd, ref_rstd) < 1e-6
    assert rel(y, ref) < TOL[dtype]
    assert rel_dx(dx, x64.grad, x64, w64, dy, gemma) < TOL[dtype]
    assert rel_dx(dx_only, x64.grad, x64, w64, dy, gemma) < TOL[dtype]
    assert rel(partial.sum(0), w64.grad) < TOL[dtype]


@cuda
@pytest.mark.cuda
def test_cuda_wrong_partial_rows_is_refused():
    from rslora_fast import _core

    x, w = make_inputs("cuda", torch.bfloat16, (100, 4096), False)
    rows, cols = x.shape
    _, rstd = rms_norm_fwd(x, w, EPS, False)
    n = _core.rms_norm_bwd_partial_rows(rows, cols, "bfloat16", 0)
    partial = torch.empty(n + 1, cols, device="cuda")
    dx = torch.empty_like(x)
    with pytest.raises(ValueError, match="partial buffer"):
        rms_norm_module.launch_bwd(x, x, w, rstd, dx, partial, False)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_non_contiguous_and_unaligned(dtype, monkeypatch):
    # transposed input, a last-dimension stride of 2 and a strided weight view
    check_against_float64("cuda", dtype, (96, 80), False, make=lambda t: t.t().contiguous().t())
    check_against_float64(
        "cuda",
        dtype,
        (80, 96),
        True,
        make=lambda t: t.repeat(1, 2)[:, ::2],
        make_w=lambda t: t.repeat(2)[::2],
    )
    # rows with a strided last dimension (a transpose of a contiguous buffer)
    check_against_float64(
        "cuda", dtype, (64, 48), False, make=lambda t: t.reshape(t.shape[1], t.shape[0]).t()
    )
    # an odd storage offset breaks 16-byte alignment although the width is whole vectors: the
    # generic paths of every kernel, with a trainable and then a frozen weight
    storage = torch.randn(3 * 1024 + 1, device="cuda", dtype=dtype)
    x = storage[1:].view(3, 1024).requires_grad_()
    w = (torch.randn(1024 + 1, device="cuda", dtype=dtype)[1:] * 0.5 + 1).requires_grad_()
    y = rms_norm(x, w, EPS)
    dy = torch.randn_like(y).t().contiguous().t()  # non-contiguous incoming gradient
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = float64_reference(x64, w64, False)
    ref.backward(dy.double())
    assert rel(y, ref) < TOL[dtype]
    assert rel_dx(x.grad, x64.grad, x64, w64, dy, False) < TOL[dtype]
    assert rel(w.grad, w64.grad) < TOL[dtype]
    monkeypatch.setattr(rms_norm_module, "rms_norm_bwd", _Recorder())
    x.grad = None
    y = rms_norm(x, w.detach(), EPS)
    y.backward(dy)
    assert rel_dx(x.grad, x64.grad, x64, w64, dy, False) < TOL[dtype]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("gemma", [False, True])
def test_cuda_backward_is_deterministic(gemma):
    x, w = make_inputs("cuda", torch.bfloat16, (3000, 2048), gemma)
    dy = torch.randn_like(x)
    _, rstd = rms_norm_fwd(x, w, EPS, gemma)
    first = rms_norm_bwd(dy, x, w, rstd, gemma)
    first_dx = rms_norm_bwd_dx(dy, x, w, rstd, gemma)
    for _ in range(3):
        again = rms_norm_bwd(dy, x, w, rstd, gemma)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
        assert torch.equal(rms_norm_bwd_dx(dy, x, w, rstd, gemma), first_dx)


@cuda
@pytest.mark.cuda
def test_cuda_opcheck():
    x = torch.randn(5, 33, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(33, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(rms_norm_fwd, (x, w, EPS, False))
    torch.library.opcheck(rms_norm_fwd, (x, w, EPS, True))
    _, rstd = rms_norm_fwd(x.detach(), w.detach(), EPS, False)
    dy = torch.randn_like(x)
    torch.library.opcheck(rms_norm_bwd_dx, (dy, x.detach(), w.detach(), rstd, False))


@cuda
@pytest.mark.cuda
def test_cuda_empty_rows():
    x = torch.empty(0, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = rms_norm(x, w)
    y.sum().backward()
    assert y.shape == (0, 64) and torch.equal(w.grad, torch.zeros_like(w))
    x.grad = None
    rms_norm(x, w.detach()).sum().backward()  # frozen weight: the dx-only op
    assert x.grad.shape == (0, 64)


@cuda
@pytest.mark.cuda
def test_cuda_side_stream():
    x, w = make_inputs("cuda", torch.bfloat16, (4096, 4096), False)
    ref = rms_norm(x, w)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = rms_norm(x, w)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(y, ref)
