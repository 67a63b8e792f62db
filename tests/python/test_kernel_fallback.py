"""When our CUDA kernels cannot be loaded, every op runs its plain-torch path after ONE warning.

There is no GPU here, so the tests make CPU tensors look like GPU tensors to the dispatch
(``_device.on_gpu``) and make loading fail: once through a fake extension whose every launch
function raises (so a launch after a failed load would be caught), once through the real extension,
which cannot load the driver on this machine. The results are checked against plain-torch formulas.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from rslora_fast import _device, _native
from rslora_fast.errors import KernelsUnavailableError
from rslora_fast.ops.cross_entropy import cross_entropy
from rslora_fast.ops.fused_ce import fused_linear_cross_entropy
from rslora_fast.ops.geglu import geglu
from rslora_fast.ops.rms_norm import rms_norm
from rslora_fast.ops.rope import apply_rope_, rope_reference
from rslora_fast.ops.swiglu import swiglu
from rslora_fast.quant import functional

REASON = "driver CUDA 12.2 is older than 12.4 (test)"


class _FailingCore:
    """An extension whose kernels do not load; any launch is a bug."""

    def load_kernels(self, index: int):
        raise KernelsUnavailableError(REASON)

    def __getattr__(self, name: str):
        raise AssertionError(f"{name} was called although the kernels did not load")


def _fake_gpu(monkeypatch, core) -> None:
    monkeypatch.setattr(_device, "on_gpu", lambda t: True)
    monkeypatch.setattr(functional, "on_gpu", lambda t: True)
    monkeypatch.setattr(_device, "device_index", lambda t: 0)
    monkeypatch.setattr(_device, "_ready", {})
    monkeypatch.setattr(_device, "_warned", False)
    if core is not None:
        monkeypatch.setattr(_native, "core", lambda: core)
        monkeypatch.setattr(_native, "core_or_none", lambda: core)


def _grad_check(fn, *inputs):
    """Run fn forward and backward on leaf copies; returns the output and the input gradients."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    out.float().square().sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _run_swiglu():
    g, u = torch.randn(4, 64), torch.randn(4, 64)
    out, (dg, du) = _grad_check(swiglu, g, u)
    ref, (rg, ru) = _grad_check(lambda a, b: F.silu(a) * b, g, u)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dg, rg)
    torch.testing.assert_close(du, ru)


def _run_geglu():
    g, u = torch.randn(4, 64), torch.randn(4, 64)
    out, (dg, _) = _grad_check(geglu, g, u)
    ref, (rg, _) = _grad_check(lambda a, b: F.gelu(a, approximate="tanh") * b, g, u)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dg, rg)


def _run_rms_norm():
    x, w = torch.randn(3, 5, 32), torch.randn(32)

    def ref_fn(a, b):
        return a * torch.rsqrt(a.square().mean(-1, keepdim=True) + 1e-6) * b

    out, (dx, dw) = _grad_check(lambda a, b: rms_norm(a, b, 1e-6), x, w)
    ref, (rx, rw) = _grad_check(ref_fn, x, w)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dx, rx)
    torch.testing.assert_close(dw, rw)
    # frozen weight: the dx-only backward op
    out, (dx,) = _grad_check(lambda a: rms_norm(a, w, 1e-6), x)
    torch.testing.assert_close(dx, _grad_check(lambda a: ref_fn(a, w), x)[1][0])


def _run_rope():
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)
    cos, sin = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    q2, k2 = apply_rope_(qq * 1, kk * 1, cos, sin)
    torch.testing.assert_close(q2, rope_reference(q, cos, sin))
    torch.testing.assert_close(k2, rope_reference(k, cos, sin))
    (q2.sum() + k2.sum()).backward()
    assert qq.grad is not None and torch.isfinite(qq.grad).all()


def _run_cross_entropy():
    logits, t = torch.randn(6, 50), torch.tensor([1, 2, -100, 4, 49, 0])
    out, (dl, _) = _grad_check(lambda a, b: cross_entropy(a, b), logits, t)
    ref, (rl, _) = _grad_check(lambda a, b: F.cross_entropy(a, b), logits, t)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dl, rl)


def _run_fused_ce():
    h, w, t = torch.randn(6, 16), torch.randn(50, 16), torch.tensor([1, 2, -100, 4, 49, 0])
    out, (dh, _, _) = _grad_check(lambda a, b, c: fused_linear_cross_entropy(a, b, c), h, w, t)
    ref, (rh, _, _) = _grad_check(lambda a, b, c: F.cross_entropy(a @ b.t(), c), h, w, t)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dh, rh)


def _run_nf4():
    w = torch.randn(32, 64)
    packed, state = functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    rp, rs = functional.quantize_4bit_reference(w, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, rp)
    out = functional.dequantize_4bit(packed, state)
    torch.testing.assert_close(out, functional.dequantize_4bit_reference(rp, rs))


OPS = {
    "swiglu": _run_swiglu,
    "geglu": _run_geglu,
    "rms_norm": _run_rms_norm,
    "rope": _run_rope,
    "cross_entropy": _run_cross_entropy,
    "fused_ce": _run_fused_ce,
    "nf4 quantize/dequantize": _run_nf4,
}


def _fallback_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, _device.KernelsFallbackWarning)]


@pytest.mark.parametrize("op", list(OPS))
def test_each_op_falls_back_with_a_warning(monkeypatch, op):
    """Each op asks the gateway (a fresh process state each time), warns once and runs plain torch."""
    _fake_gpu(monkeypatch, _FailingCore())
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        OPS[op]()
    msgs = _fallback_warnings(caught)
    assert len(msgs) == 1, msgs
    assert REASON in msgs[0] and "slower" in msgs[0] and "rslora-fast info" in msgs[0]


def test_one_warning_for_all_ops(monkeypatch):
    _fake_gpu(monkeypatch, _FailingCore())
    torch.manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for run in OPS.values():
            run()
            run()
    assert len(_fallback_warnings(caught)) == 1
    assert _device.kernel_status() == {0: False}


def test_real_extension_without_a_driver_falls_back(monkeypatch):
    """The real gateway: loading on this GPU-less machine fails inside the extension; no crash."""
    pytest.importorskip("rslora_fast._core")
    _fake_gpu(monkeypatch, None)
    torch.manual_seed(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run_swiglu()
        _run_cross_entropy()
    msgs = _fallback_warnings(caught)
    assert len(msgs) == 1 and "cuda:0" in msgs[0], msgs


def test_info_names_the_kernel_source():
    from rslora_fast.info import kernel_source

    assert kernel_source(["swiglu:sm_90", "nf4:sm_90"]) == "embedded SASS sm_90 (no compile)"
    ptx = kernel_source(["swiglu:compute_90"])
    assert ptx.startswith("embedded PTX compute_90") and "JIT" in ptx


def test_info_says_what_to_do_when_kernels_are_unavailable(monkeypatch, capsys):
    from rslora_fast import info

    monkeypatch.setattr(
        info,
        "collect_info",
        lambda: {
            "cuda_available": True,
            "core_driver_floor": "12.4",
            "kernels_loaded": f"UNAVAILABLE: {REASON}",
        },
    )
    assert info.print_info() == 0
    out = capsys.readouterr().out
    assert REASON in out
    assert "CUDA 12.4 or newer" in out and "550" in out and "8.0+" in out
