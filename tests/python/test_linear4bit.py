"""Linear4bit: forward/backward against a float64 reference built from bitsandbytes' own
dequantization, the bitsandbytes state_dict layout, and device/dtype moves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

bnbf = pytest.importorskip("bitsandbytes.functional")

from rslora_fast.errors import QuantFormatError  # noqa: E402
from rslora_fast.quant.linear4bit import Linear4bit, check_quant_args  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _bnb_dense(w: torch.Tensor, blocksize: int, quant_type: str, dq: bool) -> torch.Tensor:
    """Independent reference: bitsandbytes quantizes the weight (CPU); float64 decode of its output.

    bitsandbytes' own CPU ``dequantize_4bit`` is not used: in 0.50.2 it decodes wrongly when
    ``in_features % blocksize != 0`` while ``numel % blocksize == 0`` (e.g. 48x80), so the codes
    are decoded here from bnb's packed bytes, code table and (nested) scales.
    """
    packed, st = bnbf.quantize_4bit(
        w.detach().float().cpu().contiguous(),
        blocksize=blocksize,
        compress_statistics=dq,
        quant_type=quant_type,
    )
    return _decode_bnb(packed, st)


def _decode_bnb(packed: torch.Tensor, st) -> torch.Tensor:
    n = st.shape.numel()
    b = packed.view(torch.uint8).view(-1).long()
    codes = torch.stack([b >> 4, b & 15], 1).view(-1)[:n]
    if st.nested:
        absmax = bnbf.dequantize_blockwise(st.absmax, st.state2).double() + float(st.offset)
    else:
        absmax = st.absmax.double()
    return (st.code.double()[codes] * absmax[torch.arange(n) // st.blocksize]).view(st.shape)


def _linear(out_f: int, in_f: int, bias: bool, dtype: torch.dtype, seed: int) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
    return lin.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape,blocksize,qt,dq,bias",
    [
        ((64, 128), 64, "nf4", True, True),
        ((33, 67), 64, "nf4", False, True),  # odd element count, partial last block
        ((40, 96), 128, "fp4", True, False),
        ((17, 300), 32, "nf4", True, True),
    ],
)
def test_forward_backward_match_reference(dtype, shape, blocksize, qt, dq, bias):
    out_f, in_f = shape
    lin = _linear(out_f, in_f, bias, dtype, seed=out_f * 7 + in_f)
    mod = Linear4bit.from_linear(lin, blocksize=blocksize, quant_type=qt, compress_statistics=dq)
    w_ref = _bnb_dense(lin.weight, blocksize, qt, dq)
    b_ref = lin.bias.detach().double() if bias else None

    x = torch.randn(3, 5, in_f, dtype=dtype, requires_grad=True)
    y = mod(x)
    assert y.dtype == dtype and y.shape == (3, 5, out_f)
    x64 = x.detach().double().requires_grad_(True)
    bias64 = b_ref.clone().requires_grad_(True) if bias else None
    y_ref = torch.nn.functional.linear(x64, w_ref, bias64)
    tol = TOL[dtype]
    scale = y_ref.abs().max().item() + 1.0
    assert (y.double() - y_ref).abs().max().item() <= tol * scale

    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy.double())
    assert (x.grad.double() - x64.grad).abs().max().item() <= tol * (x64.grad.abs().max().item() + 1.0)
    assert mod.weight.grad is None and not mod.weight.requires_grad
    if bias:
        assert (mod.bias.grad.double() - bias64.grad).abs().max().item() <= tol * (
            bias64.grad.abs().max().item() + 1
        )


def test_dequantize_equals_bitsandbytes():
    lin = _linear(48, 80, False, torch.float32, seed=1)
    mod = Linear4bit.from_linear(lin)
    assert torch.allclose(
        mod.dequantize().double(), _bnb_dense(lin.weight, 64, "nf4", True), rtol=1e-6, atol=1e-9
    )
    assert mod.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_shared_scratch_is_not_saved_for_backward():
    # Two layers share one scratch buffer; the second forward overwrites it before the first
    # layer's backward runs. Gradients must still be right and no dense weight may be saved.
    la, lb = _linear(64, 64, True, torch.float32, 2), _linear(64, 64, True, torch.float32, 3)
    ma, mb = Linear4bit.from_linear(la), Linear4bit.from_linear(lb)
    wa, wb = _bnb_dense(la.weight, 64, "nf4", True), _bnb_dense(lb.weight, 64, "nf4", True)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(4, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mb(torch.relu(ma(x)))
    assert 64 * 64 not in saved, "a dense weight was saved for backward"
    y.sum().backward()

    x64 = x.detach().double().requires_grad_(True)
    h = torch.relu(x64 @ wa.T + la.bias.double())
    (h @ wb.T + lb.bias.double()).sum().backward()
    assert torch.allclose(x.grad.double(), x64.grad, atol=1e-4)


def test_state_dict_has_bitsandbytes_layout_and_round_trips():
    lin = _linear(24, 70, True, torch.bfloat16, seed=4)
    mod = Linear4bit.from_linear(lin, compress_statistics=True)
    sd = mod.state_dict()
    packed, st = bnbf.quantize_4bit(
        lin.weight.detach(), blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    ref = {"weight": packed, "bias": lin.bias.detach()}
    ref.update({f"weight.{k}": v for k, v in st.as_dict(packed=True).items()})
    assert set(sd) == set(ref)
    for k, v in ref.items():
        assert sd[k].dtype == v.dtype and tuple(sd[k].shape) == tuple(v.shape), k
    assert torch.equal(sd["weight"], packed)

    # Load into an empty shell built on the meta device, as the loader does.
    shell = Linear4bit(70, 24, bias=True, compute_dtype=torch.bfloat16, device="meta")
    shell.load_state_dict(sd)
    assert shell.weight.device.type == "cpu" and shell.bias.dtype == torch.bfloat16
    x = torch.randn(5, 70, dtype=torch.bfloat16)
    assert torch.equal(shell(x), mod(x))

    # Also through a parent module (non-empty prefix), strict.
    parent = nn.Sequential(mod)
    other = nn.Sequential(Linear4bit(70, 24, compute_dtype=torch.bfloat16, device="meta"))
    other.load_state_dict(parent.state_dict(), strict=True)
    assert torch.equal(other(x), parent(x))


def test_state_dict_without_double_quant():
    mod = Linear4bit.from_linear(_linear(8, 64, False, torch.float32, 5), compress_statistics=False)
    sd = mod.state_dict()
    assert set(sd) == {"weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"}
    assert sd["weight.absmax"].dtype == torch.float32


def test_load_dense_linear_state_dict_quantizes():
    lin = _linear(16, 64, True, torch.float32, 6)
    shell = Linear4bit(64, 16, compute_dtype=torch.float32)
    shell.load_state_dict(lin.state_dict())
    assert torch.allclose(
        shell.dequantize().double(), _bnb_dense(lin.weight, 64, "nf4", True), rtol=1e-6, atol=1e-9
    )


def test_to_dtype_never_casts_packed_bytes():
    mod = Linear4bit.from_linear(_linear(32, 64, True, torch.float32, 7))
    before = mod.weight.detach().clone()
    absmax = mod.quant_state.absmax.clone()
    mod.to(torch.bfloat16)
    assert mod.weight.dtype == torch.uint8 and torch.equal(mod.weight, before)
    assert torch.equal(mod.quant_state.absmax, absmax)
    assert mod.compute_dtype == torch.bfloat16 and mod.bias.dtype == torch.bfloat16
    mod.half()
    assert mod.weight.dtype == torch.uint8 and mod.compute_dtype == torch.float16
    mod.cpu()
    assert torch.equal(mod.weight, before)
    assert [n for n, _ in mod.named_parameters()] == ["weight", "bias"]


def test_counts_repr_and_requantize():
    mod = Linear4bit.from_linear(_linear(30, 64, False, torch.float32, 8), blocksize=128, quant_type="fp4")
    assert mod.weight.numel() * 2 == 30 * 64 and Linear4bit.is_4bit_linear
    r = repr(mod)
    for part in ("in_features=64", "out_features=30", "fp4", "blocksize=128", "double_quant=True"):
        assert part in r
    dense = torch.randn(30, 64)
    mod.requantize_(dense)
    assert torch.allclose(
        mod.dequantize().double(), _bnb_dense(dense, 128, "fp4", True), rtol=1e-6, atol=1e-9
    )
    with pytest.raises(ValueError):
        mod.requantize_(torch.randn(64, 30))


def test_bad_arguments():
    with pytest.raises(QuantFormatError):
        check_quant_args(64, "int4")
    for bs in (16, 48, 8192, 0, True):
        with pytest.raises(QuantFormatError):
            check_quant_args(bs, "nf4")
    with pytest.raises(QuantFormatError):
        Linear4bit(8, 8, blocksize=100)
    with pytest.raises(QuantFormatError):
        Linear4bit(8, 8)(torch.randn(2, 8))  # empty shell


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_forward_backward_and_moves(dtype):
    lin = _linear(257, 131, True, dtype, seed=9)
    mod = Linear4bit.from_linear(lin, device="cuda")
    assert mod.weight.is_cuda and mod.quant_state.absmax.is_cuda
    w_ref = _bnb_dense(lin.weight, 64, "nf4", True).cuda()
    x = torch.randn(2, 9, 131, device="cuda", dtype=dtype, requires_grad=True)
    y = mod(x)
    x64 = x.detach().double().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x64, w_ref, lin.bias.detach().double().cuda())
    tol = TOL[dtype]
    assert (y.double() - y_ref).abs().max().item() <= tol * (y_ref.abs().max().item() + 1)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy.double())
    assert (x.grad.double() - x64.grad).abs().max().item() <= tol * (x64.grad.abs().max().item() + 1)
    packed = mod.weight.detach().cpu().clone()
    mod.cpu()
    assert torch.equal(mod.weight, packed) and mod.quant_state.absmax.device.type == "cpu"
    mod.cuda()
    assert mod.weight.is_cuda and torch.equal(mod.weight.cpu(), packed)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize(
    "shape,dq,carrier",
    [
        ((33, 67), False, torch.float32),  # odd byte counts: every carrier is zero-padded
        ((33, 67), True, torch.bfloat16),
        ((40, 96), True, torch.float16),
        ((17, 300), True, torch.float32),
    ],
)
def test_exposed_storage_is_floating_and_behaves_the_same(shape, dq, carrier):
    # what FSDP2 needs: codes and scales as frozen floating Parameters holding the same bytes
    out_f, in_f = shape
    lin = _linear(out_f, in_f, True, torch.float32, seed=out_f + in_f)
    plain = Linear4bit.from_linear(lin, compress_statistics=dq)
    mod = Linear4bit.from_linear(lin, compress_statistics=dq)
    mod._expose_storage_as_params(carrier)
    mod._expose_storage_as_params(carrier)  # idempotent
    names = ["weight", "bias", "absmax"] + (["nested_absmax"] if dq else [])
    assert [n for n, _ in mod.named_parameters()] == names and mod.storage_exposed
    for n in ("weight", "absmax", "nested_absmax")[: 3 if dq else 2]:
        p = getattr(mod, n)
        assert p.dtype == carrier and not p.requires_grad and p.is_contiguous()
    assert mod.weight.shape[1] == 1 and mod.weight.numel() * carrier.itemsize >= (out_f * in_f + 1) // 2
    state = mod.quant_state
    assert torch.equal(state.absmax, plain.quant_state.absmax) and state.absmax.dtype == (
        torch.uint8 if dq else torch.float32
    )
    w_ref = _bnb_dense(lin.weight, 64, "nf4", dq)
    assert torch.allclose(mod.dequantize().double(), w_ref, rtol=1e-6, atol=1e-9)

    x = torch.randn(2, 3, in_f, requires_grad=True)
    y = mod(x)
    x64 = x.detach().double().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x64, w_ref, lin.bias.detach().double())
    assert (y.double() - y_ref).abs().max().item() <= 1e-4 * (y_ref.abs().max().item() + 1)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy.double())
    assert (x.grad.double() - x64.grad).abs().max().item() <= 1e-4 * (x64.grad.abs().max().item() + 1)

    # state_dict: bitsandbytes keys, dtypes and bytes, exactly as without exposing
    sd, ref = mod.state_dict(), plain.state_dict()
    assert sd.keys() == ref.keys()
    for k in ref:
        assert sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]), k
        assert not isinstance(sd[k], nn.Parameter), k

    # moves and casts never touch the carriers; loading and requantizing keep the storage exposed
    before = {n: p.detach().clone() for n, p in mod.named_parameters() if n != "bias"}
    mod.to(torch.bfloat16).half()
    assert mod.compute_dtype == torch.float16
    for n, t in before.items():
        # compare bytes: a carrier may hold NaN bit patterns
        assert getattr(mod, n).dtype == carrier and torch.equal(_bytes(getattr(mod, n)), _bytes(t)), n
    fresh = Linear4bit.from_linear(_linear(out_f, in_f, True, torch.float32, seed=1), compress_statistics=dq)
    fresh._expose_storage_as_params(carrier)
    fresh.load_state_dict(ref)
    assert fresh.storage_exposed and fresh.weight.dtype == carrier
    assert torch.equal(fresh.dequantize(torch.float32), plain.dequantize(torch.float32))
    dense = torch.randn(out_f, in_f)
    fresh.requantize_(dense)
    assert fresh.storage_exposed and fresh.weight.dtype == carrier
    assert torch.allclose(
        fresh.dequantize(torch.float32).double(), _bnb_dense(dense, 64, "nf4", dq), atol=1e-9
    )
    with pytest.raises(TypeError):
        fresh._expose_storage_as_params(torch.float64 if carrier != torch.float64 else torch.float32)
    with pytest.raises(TypeError):
        Linear4bit.from_linear(lin)._expose_storage_as_params(torch.int32)
    with pytest.raises(QuantFormatError):
        Linear4bit(8, 8)._expose_storage_as_params()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("carrier", [torch.bfloat16, torch.float32])
def test_cuda_exposed_storage_forward_backward(carrier):
    lin = _linear(257, 131, True, torch.bfloat16, seed=10)
    mod = Linear4bit.from_linear(lin, device="cuda")
    mod._expose_storage_as_params(carrier)
    assert mod.weight.is_cuda and mod.absmax.is_cuda and mod.weight.dtype == carrier
    w_ref = _bnb_dense(lin.weight, 64, "nf4", True).cuda()
    x = torch.randn(2, 9, 131, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = mod(x)
    x64 = x.detach().double().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x64, w_ref, lin.bias.detach().double().cuda())
    tol = TOL[torch.bfloat16]
    assert (y.double() - y_ref).abs().max().item() <= tol * (y_ref.abs().max().item() + 1)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy.double())
    assert (x.grad.double() - x64.grad).abs().max().item() <= tol * (x64.grad.abs().max().item() + 1)
    before = mod.weight.detach().cpu().clone()
    mod.cpu()
    assert (
        torch.equal(_bytes(mod.weight), _bytes(before)) and mod.quant_state.nested_code.device.type == "cpu"
    )
    assert torch.allclose(mod.dequantize(torch.float32).double(), w_ref.cpu(), rtol=1e-6, atol=1e-9)


def test_sharded_layer_refuses_whole_weight_operations_by_name(monkeypatch):
    """Outside forward an FSDP2-sharded layer holds a slice of the bytes: dequantize, requantize_
    and load_state_dict say so instead of failing deep inside (or computing from a slice)."""
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        m = Linear4bit.from_linear(nn.Linear(64, 32), compute_dtype=torch.float32)
        x = torch.randn(2, 64)
        want = m(x)
        saved = m.state_dict()
        m._expose_storage_as_params(torch.float32)
        wrapper = nn.Sequential(m)
        fully_shard(m)
        fully_shard(wrapper)
        torch.testing.assert_close(wrapper(x), want)  # inside forward: gathered, as before
        for call, what in (
            (lambda: m.dequantize(), "dequantize"),
            (lambda: m.requantize_(torch.randn(32, 64)), "requantize_"),
            (lambda: m.load_state_dict(saved), "load_state_dict"),
        ):
            with pytest.raises(RuntimeError, match=f"{what}: the 4-bit storage is an FSDP2 shard"):
                call()
    finally:
        dist.destroy_process_group()
