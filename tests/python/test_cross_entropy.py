"""Cross-entropy row ops: reference on CPU (opcheck + float64), our kernels on CUDA (marker ``cuda``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rslora_fast.ops.cross_entropy import cross_entropy, cross_entropy_bwd_, cross_entropy_fwd

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The outputs are float32 computed from the stored (rounded) logits, so they match a float64
# reference of the same stored values closely in every dtype; the backward rounds to the dtype.
FWD_ATOL = 1e-4
BWD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def float64_reference(logits: torch.Tensor, targets: torch.Tensor):
    """(lse, loss_row) of the stored logits in float64, independent of the op's own reference."""
    l64 = logits.double()
    lse = torch.logsumexp(l64, dim=-1)
    valid = targets != -100
    loss = F.cross_entropy(l64, targets, ignore_index=-100, reduction="none")
    return lse, torch.where(valid, loss, 0.0)


def float64_grad(logits, lse, targets, scale):
    """(softmax(logits) - onehot(targets)) * scale in float64 (the in-place backward's formula)."""
    l64 = logits.double()
    p = torch.softmax(l64, dim=-1)
    valid = targets != -100
    onehot = F.one_hot(torch.where(valid, targets, 0), l64.shape[1]).double() * valid[:, None]
    return (p - onehot) * scale.double()[:, None]


def make_targets(rows: int, vocab: int, device: str) -> torch.Tensor:
    t = torch.randint(0, vocab, (rows,), device=device)
    if rows > 2:
        t[0], t[1], t[2] = 0, vocab - 1, -100  # first and last column, one ignored row
    return t


def check_fwd_bwd(device, dtype, rows, vocab, *, scale_logits=4.0, make=lambda t: t, targets=None):
    logits = make((torch.randn(rows, vocab, device=device) * scale_logits).to(dtype))
    t = make_targets(rows, vocab, device) if targets is None else targets
    lse, loss = cross_entropy_fwd(logits, t)
    assert lse.dtype == loss.dtype == torch.float32 and lse.shape == loss.shape == (rows,)
    ref_lse, ref_loss = float64_reference(logits, t)
    assert torch.allclose(lse.double(), ref_lse, rtol=1e-6, atol=FWD_ATOL), (lse - ref_lse).abs().max()
    assert torch.allclose(loss.double(), ref_loss, rtol=1e-6, atol=FWD_ATOL), (loss - ref_loss).abs().max()
    assert (loss[t == -100] == 0).all()

    scale = torch.rand(rows, device=device) + 0.5
    scale[t == -100] = 0.0
    expected = float64_grad(logits, lse, t, scale)
    buf = logits.clone()
    cross_entropy_bwd_(buf, lse, t, scale)
    assert buf.dtype == dtype and torch.isfinite(buf).all()
    assert rel(buf, expected) < BWD_TOL[dtype]
    # elementwise, scaled to the row's largest gradient (softmax entries are tiny next to the -1)
    assert ((buf.double() - expected).abs() <= BWD_TOL[dtype] * (expected.abs().amax() + 1e-30)).all()
    assert (buf[t == -100] == 0).all()


# ---------------------------------------------------------------- CPU (plain-torch reference)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab", [(1, 1), (3, 7), (9, 1000), (2, 4099)])
def test_cpu_matches_float64(dtype, rows, vocab):
    check_fwd_bwd("cpu", dtype, rows, vocab)


def test_cpu_all_ignored_and_large_logits():
    t = torch.full((4,), -100)
    check_fwd_bwd("cpu", torch.float32, 4, 33, targets=t)
    check_fwd_bwd("cpu", torch.float32, 5, 300, scale_logits=1e4)


def test_cpu_strided_rows():
    check_fwd_bwd("cpu", torch.bfloat16, 6, 301, make=lambda x: torch.cat([x, x], 1)[:, 3:304])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cpu(dtype):
    logits = torch.randn(5, 37, dtype=dtype)
    t = torch.tensor([0, 36, -100, 5, 9])
    torch.library.opcheck(cross_entropy_fwd, (logits.requires_grad_(), t))
    lse, _ = cross_entropy_fwd(logits.detach(), t)
    scale = torch.rand(5)
    torch.library.opcheck(cross_entropy_bwd_, (logits.detach().clone(), lse, t, scale))


def test_autograd_matches_torch_cpu():
    logits = (torch.randn(6, 50) * 3).requires_grad_()
    t = torch.tensor([0, 49, -100, 7, 7, -100])
    loss = cross_entropy(logits, t)
    (g,) = torch.autograd.grad(loss, logits)
    l2 = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(l2, t)
    (g_ref,) = torch.autograd.grad(ref, l2)
    assert torch.allclose(loss.double(), ref, atol=1e-6)
    assert torch.allclose(g.double(), g_ref, atol=1e-6)
    # gradient through lse as well as loss (both outputs used)
    lse, per_row = cross_entropy_fwd(logits, t)
    (g2,) = torch.autograd.grad(lse.sum() * 0.5 + per_row.sum(), logits)
    lse64 = torch.logsumexp(l2, -1)
    ref2 = lse64.sum() * 0.5 + F.cross_entropy(l2, t, reduction="sum")
    (g2_ref,) = torch.autograd.grad(ref2, l2)
    assert torch.allclose(g2.double(), g2_ref, atol=1e-6)


def test_reductions_cpu():
    logits = torch.randn(4, 9)
    t = torch.tensor([1, -100, 3, 8])
    for red in ("mean", "sum", "none"):
        ref = F.cross_entropy(logits.double(), t, reduction=red)
        if red == "none":
            ref = torch.where(t != -100, ref, 0.0)
        assert torch.allclose(cross_entropy(logits, t, reduction=red).double(), ref, atol=1e-6)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.empty(4, 11, dtype=torch.bfloat16)
        lse, loss = cross_entropy_fwd(logits, torch.zeros(4, dtype=torch.long))
        assert lse.shape == loss.shape == (4,) and lse.dtype == loss.dtype == torch.float32


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="rows, vocab"):
        cross_entropy_fwd(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        cross_entropy_fwd(torch.randn(2, 3), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="size 0"):
        cross_entropy_fwd(torch.randn(2, 0), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="float32"):
        cross_entropy_bwd_(
            torch.randn(2, 3),
            torch.zeros(2, dtype=torch.float64),
            torch.zeros(2, dtype=torch.long),
            torch.zeros(2),
        )
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), reduction="avg")


# ---------------------------------------------------------------- GPU (our kernels)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows,vocab", [(1, 1), (1, 7), (5, 7), (13, 1000), (3, 4099), (4, 128256 + 3), (2, 262144)]
)
def test_cuda_matches_float64(dtype, rows, vocab):
    check_fwd_bwd("cuda", dtype, rows, vocab)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_all_ignored_and_first_last_targets(dtype):
    check_fwd_bwd("cuda", dtype, 6, 1001, targets=torch.full((6,), -100, device="cuda"))
    t = torch.tensor([0, 1000, 999, 0, 1000, 500], device="cuda")
    check_fwd_bwd("cuda", dtype, 6, 1001, targets=t)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[cuda, pytest.mark.cuda])])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_logits_give_nan_like_torch(device, dtype):
    # a NaN anywhere in a row (a lone NaN, a whole 16-byte vector of them, the whole row) must
    # not be folded away: the loss of that row is NaN, as torch's logsumexp gives
    logits = torch.zeros(4, 64, device=device, dtype=dtype)
    logits[0, 1] = float("nan")
    logits[1, 8:16] = float("nan")
    logits[2] = float("nan")
    logits[3, 63] = float("nan")
    small = torch.tensor([[float("nan"), 0.0]], device=device, dtype=dtype)
    for x in (logits, small):
        t = torch.zeros(x.shape[0], dtype=torch.long, device=device)
        lse, loss = cross_entropy_fwd(x, t, -100)
        want = torch.logsumexp(x.double(), -1)
        assert torch.isnan(want).all()  # the reference really is NaN for every row here
        assert torch.isnan(lse).all() and torch.isnan(loss).all(), (lse, loss)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[cuda, pytest.mark.cuda])])
@pytest.mark.parametrize("dtype", DTYPES)
def test_plus_inf_logits_give_nan_loss_like_torch(device, dtype):
    # a row holding +inf: torch's cross_entropy gives NaN whichever the target (inf - inf inside its
    # log-softmax); so must we, on both paths (the kernel's running max gives inf - inf too)
    logits = torch.zeros(3, 70, device=device, dtype=dtype)
    logits[:, 3] = float("inf")
    logits[2, 40:48] = float("inf")
    t = torch.tensor([1, 3, 44], device=device)
    want = torch.nn.functional.cross_entropy(logits.double(), t, reduction="none")
    assert torch.isnan(want).all()
    lse, loss = cross_entropy_fwd(logits, t, -100)
    assert torch.isnan(loss).all() and torch.isnan(lse).all(), (lse, loss)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large_logits_do_not_overflow(dtype):
    check_fwd_bwd("cuda", dtype, 7, 4099, scale_logits=1e4)
    # a huge spread inside one row: one dominant logit, the rest far below
    logits = torch.full((2, 5003), -1e4, device="cuda").to(dtype)
    logits[:, 17] = 1e4
    t = torch.tensor([17, 4], device="cuda")
    lse, loss = cross_entropy_fwd(logits, t)
    ref_lse, ref_loss = float64_reference(logits, t)
    assert torch.allclose(lse.double(), ref_lse) and torch.allclose(loss.double(), ref_loss)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_terms_stay_exact_at_large_maxima(dtype):
    # Each row's max (1e4..4e4) is shared by a few logits in head, body and tail, with near-ties
    # below it, and the target is one of them: the loss is log(sum of the top terms) ~ 1.5, so a
    # relative error of the terms shows in it unmasked (the fused exponent 2^(x log2e - m log2e)
    # is off by up to |m| 2^-24 in the exponent: ~7e-4 here). lse itself must be within half an
    # fp32 ulp of the float64 value (plus that small error), which the rounding of m
    # mostly hides.
    rows, vocab = 16, 4099
    logits = torch.randn(rows, vocab, device="cuda") * 1e3
    top = torch.empty(rows, device="cuda").uniform_(1e4, 4e4)
    cols = []
    for i in range(rows):
        c = [i % 3, 1000 + 37 * i, 2500 + 11 * i, vocab - 1 - (i % 3)]
        for k, off in zip(c, [0.0, 0.0, 0.5, 1.5]):
            logits[i, k] = top[i] - off
        cols.append(c[i % 2])  # always one at the max (offset 0)
    logits = logits.to(dtype)
    t = torch.tensor(cols, device="cuda")
    lse, loss = cross_entropy_fwd(logits, t)
    ref_lse, ref_loss = float64_reference(logits, t)
    assert (ref_loss > 0.5).all()  # the data really puts a sum of several terms in the loss
    assert torch.allclose(loss.double(), ref_loss, rtol=0, atol=1e-5), (loss.double() - ref_loss).abs().max()
    tol = ref_lse.abs() * 2.0**-24 + 1e-5
    assert ((lse.double() - ref_lse).abs() <= tol).all(), (lse.double() - ref_lse).abs().max()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[cuda, pytest.mark.cuda])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_near_the_float_limit(device, dtype):
    # maxima above 1e38 (fp32 and bf16 reach 3.4e38): max * log2(e) would overflow, so the
    # exponent must subtract the max first (a wrong path gives lse = -inf or NaN); and the loss
    # must be (m - x_t) + log(s): lse - x_t cancels to 0 in row 2 (100 ties at 2e38: ln 100)
    logits = torch.zeros(3, 4099, device=device)
    logits[0, 5], logits[0, 4000], logits[0, 9] = 3e38, 2.9e38, -3e38
    logits[1, :] = -2e38
    logits[1, 4098] = 1.5e38
    logits[2, 100:200] = 2e38
    logits = logits.to(dtype)
    t = torch.tensor([4000, 4098, 150], device=device)
    lse, loss = cross_entropy_fwd(logits, t)
    ref_lse, ref_loss = float64_reference(logits, t)
    assert torch.isfinite(lse).all() and torch.isfinite(loss).all(), (lse, loss)
    assert abs(float(ref_loss[2]) - 4.605170185988091) < 1e-12  # ln 100, the case that cancelled
    assert torch.allclose(lse.double(), ref_lse, rtol=1e-6, atol=FWD_ATOL), (lse, ref_lse)
    assert torch.allclose(loss.double(), ref_loss, rtol=1e-6, atol=FWD_ATOL), (loss, ref_loss)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1, 3, 5])
def test_cuda_strided_and_unaligned_rows(dtype, offset):
    # rows of a wider buffer: row stride 2 * vocab + 8, start `offset` elements in (breaks 16-byte alignment)
    vocab = 1027
    wides = []

    def make(x):
        wide = torch.full((x.shape[0], 2 * vocab + 8), float("nan"), device=x.device, dtype=x.dtype)
        wide[:, offset : offset + vocab] = x
        wides.append(wide)
        return wide[:, offset : offset + vocab]

    check_fwd_bwd("cuda", dtype, 9, vocab, make=make)
    # the in-place backward writes only the view: the NaNs outside it stay
    wide = wides[0]
    outside = torch.cat([wide[:, :offset], wide[:, offset + vocab :]], 1)
    assert torch.isnan(outside).all()


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_cuda_every_column_is_read(dtype, offset):
    # one spike per row at a different column (scalar head, vector body, scalar tail): a skipped
    # column would drop the row's lse from about 50 to log(vocab) ~ 11.8
    vocab = 128256 + 3
    cols = [0, 1, 2, 7, 8, 9, 15, 16, 17, vocab // 2, vocab - 9, vocab - 8, vocab - 2, vocab - 1]
    wide = torch.zeros(len(cols), vocab + 11, device="cuda", dtype=dtype)
    logits = wide[:, offset : offset + vocab]
    for i, c in enumerate(cols):
        logits[i, c] = 50.0
    t = torch.tensor(cols, device="cuda")
    lse, loss = cross_entropy_fwd(logits, t)
    ref_lse, ref_loss = float64_reference(logits, t)
    assert torch.allclose(lse.double(), ref_lse, atol=FWD_ATOL) and torch.allclose(
        loss.double(), ref_loss, atol=FWD_ATOL
    )
    assert (lse > 49).all()


@cuda
@pytest.mark.cuda
def test_cuda_non_contiguous_last_dim_falls_back_to_a_copy():
    x = (torch.randn(1003, 6, device="cuda") * 3).to(torch.bfloat16)
    logits = x.t()  # stride(1) != 1
    t = make_targets(6, 1003, "cuda")
    check_fwd_bwd("cuda", torch.bfloat16, 6, 1003, targets=t, make=lambda y: y.t().contiguous().t())
    lse, _ = cross_entropy_fwd(logits, t)
    expected = float64_grad(logits, lse, t, torch.ones(6, device="cuda"))
    cross_entropy_bwd_(logits, lse, t, torch.ones(6, device="cuda"))
    assert rel(logits, expected) < BWD_TOL[torch.bfloat16] and rel(x.t(), expected) < BWD_TOL[torch.bfloat16]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_poisoned_outputs_are_all_written(dtype):
    rows, vocab = 37, 5001
    logits = (torch.randn(rows, vocab, device="cuda") * 2).to(dtype)
    t = make_targets(rows, vocab, "cuda")
    # fill the caching allocator's next blocks with NaN so unwritten lse/loss entries would show
    torch.full((4 * rows,), float("nan"), device="cuda")
    lse, loss = cross_entropy_fwd(logits, t)
    assert torch.isfinite(lse).all() and torch.isfinite(loss).all()
    # every element of the buffer is rewritten: NaN in the buffer where the kernel skipped one
    buf = logits.clone()
    scale = torch.ones(rows, device="cuda")
    cross_entropy_bwd_(buf, lse, t, scale)
    assert torch.isfinite(buf).all()
    assert not torch.equal(buf, logits)
    assert rel(buf, float64_grad(logits, lse, t, scale)) < BWD_TOL[dtype]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_autograd_matches_torch(dtype):
    logits = (torch.randn(33, 30011, device="cuda") * 3).to(dtype).requires_grad_()
    t = make_targets(33, 30011, "cuda")
    loss = cross_entropy(logits, t)
    (g,) = torch.autograd.grad(loss, logits)
    l2 = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(l2, t)
    (g_ref,) = torch.autograd.grad(ref, l2)
    assert abs(float(loss) - float(ref)) < 1e-5
    assert rel(g, g_ref) < BWD_TOL[dtype]


@cuda
@pytest.mark.cuda
def test_cuda_opcheck():
    logits = torch.randn(5, 333, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([0, 332, -100, 5, 9], device="cuda")
    torch.library.opcheck(cross_entropy_fwd, (logits.clone().requires_grad_(), t))
    lse, _ = cross_entropy_fwd(logits, t)
    torch.library.opcheck(cross_entropy_bwd_, (logits.clone(), lse, t, torch.rand(5, device="cuda")))


@cuda
@pytest.mark.cuda
def test_cuda_side_stream_and_no_sync():
    logits = torch.randn(64, 32003, device="cuda", dtype=torch.bfloat16)
    t = make_targets(64, 32003, "cuda")
    ref_lse, ref_loss = float64_reference(logits, t)
    cross_entropy_fwd(logits, t)  # warm-up (module load)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            lse, loss = cross_entropy_fwd(logits, t)
            buf = logits.clone()
            cross_entropy_bwd_(buf, lse, t, torch.ones(64, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.allclose(lse.double(), ref_lse, atol=FWD_ATOL) and torch.allclose(
        loss.double(), ref_loss, atol=FWD_ATOL
    )
