"""Fused LoRA autograd (ops/lora_linear.py) against the generic path and float64 math.

The generic path is the same layers called one by one with the fused path switched off
(``fused_lora_disabled``): plain torch ops (base linear, ``F.linear`` with the cast adapters,
``addmm``) whose autograd sums the branches. GPU versions carry the ``cuda`` marker.
"""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from torch import nn

from rslora_fast import get_peft_model
from rslora_fast.checkpointing import offload_handle
from rslora_fast.ops import lora_linear as ll
from rslora_fast.ops.lora_linear import fusable, fused_lora_disabled, lora_linears
from rslora_fast.peft.layer import LoraLinear
from rslora_fast.quant.functional import dequantize_4bit_reference
from rslora_fast.quant.linear4bit import Linear4bit

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
FUSED = "_LoraLinearsFunctionBackward"


# ---------------------------------------------------------------------------------------- helpers
def _base(n_in, n_out, bias, kind, dtype, device, gen):
    lin = nn.Linear(n_in, n_out, bias=bias, device=device, dtype=torch.float32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=gen) / math.sqrt(n_in))
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=gen) * 0.5)
    lin = lin.to(dtype).requires_grad_(False)
    if kind.startswith("4bit"):
        lin = Linear4bit.from_linear(lin, compute_dtype=dtype).requires_grad_(False)
        if kind == "4bit_exposed":  # codes and scales carried as floating Parameters (FSDP2 layout)
            lin._expose_storage_as_params()
    return lin


def _lora(n_in, n_out, r, bias, kind, dtype, device, gen, rslora=False):
    layer = LoraLinear(_base(n_in, n_out, bias, kind, dtype, device, gen), r, 2 * r + 1, use_rslora=rslora)
    layer.set_adapter_weights(
        torch.randn(r, n_in, generator=gen) * 0.2, torch.randn(n_out, r, generator=gen) * 0.2
    )
    return layer


def _group(kind, dtype, device="cpu", n_in=37, seed=0):
    """Members with different widths, ranks (3, 16), scalings (rslora), with/without bias, no adapter."""
    g = torch.Generator().manual_seed(seed)
    return [
        _lora(n_in, 29, 3, True, kind, dtype, device, g, rslora=True),
        _lora(n_in, 13, 16, False, kind, dtype, device, g),
        _base(n_in, 11, True, kind, dtype, device, g),
    ]


def _params(layers):
    return [p for m in layers if isinstance(m, LoraLinear) for p in (m.lora_A.weight, m.lora_B.weight)]


def _run(layers, x, grads, fused=True):
    """Outputs, dx and every adapter grad of ``sum_i <layer_i(x), grads_i>``."""
    for p in _params(layers):
        p.grad = None
    xx = x.detach().clone().requires_grad_(x.requires_grad)
    if fused:
        outs = lora_linears(xx, layers)
    else:
        with fused_lora_disabled():
            outs = lora_linears(xx, layers)
    assert all(o.shape == (*x.shape[:-1], m.out_features) for o, m in zip(outs, layers))
    assert (type(outs[0].grad_fn).__name__ == FUSED) == fused
    sum((o.float() * g.float()).sum() for o, g in zip(outs, grads)).backward()
    return [o.detach() for o in outs], xx.grad, [p.grad.clone() for p in _params(layers)]


def _tol(dtype):
    return {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}[dtype]


def _close(got, want, dtype):
    rtol, atol = _tol(dtype)
    scale = max(float(want.abs().max()), 1.0)  # atol relative to the tensor's magnitude
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol * scale)


def _check_group(kind, dtype, device, lead, n_in=37, seed=0):
    layers = _group(kind, dtype, device, n_in, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, n_in, generator=g).to(device, dtype).requires_grad_()
    grads = [torch.randn(*lead, m.out_features, generator=g).to(device, dtype) for m in layers]
    got = _run(layers, x, grads, fused=True)
    want = _run(layers, x, grads, fused=False)
    for a, b in zip(got[0], want[0]):
        assert a.dtype == b.dtype == dtype
        _close(a, b, dtype)
    _close(got[1], want[1], dtype)
    for a, b in zip(got[2], want[2]):
        assert a.dtype == torch.float32 and torch.count_nonzero(b) > 0
        _close(a, b, dtype)


# ------------------------------------------------------------------------------- equivalence (CPU)
@pytest.mark.parametrize("kind", ["dense", "4bit", "4bit_exposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(2, 5), (7,), ()])
def test_group_matches_generic(kind, dtype, lead):
    _check_group(kind, dtype, "cpu", lead)


@pytest.mark.parametrize("kind", ["dense", "4bit"])
def test_fp32_matches_float64_formula(kind):
    layers = _group(kind, torch.float32)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 37, generator=g, requires_grad=True)
    grads = [torch.randn(3, 4, m.out_features, generator=g) for m in layers]
    outs, dx, pgrads = _run(layers, x, grads)
    # float64: y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T, differentiated by autograd
    x64 = x.detach().double().requires_grad_()
    leaves, total = [], 0
    for m, gy, out in zip(layers, grads, outs):
        base = m.base_layer if isinstance(m, LoraLinear) else m
        if kind == "4bit":
            w = dequantize_4bit_reference(base.weight, base.quant_state, torch.float64)
        else:
            w = base.weight.double()
        y = x64 @ w.T
        if base.bias is not None:
            y = y + base.bias.double()
        if isinstance(m, LoraLinear):
            a = m.lora_A.weight.detach().double().requires_grad_()
            b = m.lora_B.weight.detach().double().requires_grad_()
            leaves += [a, b]
            y = y + m.scaling * (x64 @ a.T) @ b.T
        torch.testing.assert_close(out.double(), y.detach(), rtol=1e-5, atol=1e-5)
        total = total + (y * gy.double()).sum()
    total.backward()
    torch.testing.assert_close(dx.double(), x64.grad, rtol=1e-5, atol=1e-5)
    for got, leaf in zip(pgrads, leaves):
        torch.testing.assert_close(got.double(), leaf.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["dense", "4bit"])
def test_single_layer_forward_takes_the_fused_path(kind):
    layer = _group(kind, torch.bfloat16)[0]
    x = torch.randn(4, 6, 37, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == FUSED
    with fused_lora_disabled():
        want = layer(x)
    assert type(want.grad_fn).__name__ != FUSED
    torch.testing.assert_close(y, want)


def test_partial_grads_unused_outputs_and_frozen_adapters():
    layers = _group("dense", torch.float32)
    layers[1].lora_A.weight.requires_grad_(False)  # only B of member 1 trains
    x = torch.randn(2, 9, 37)  # no input grad wanted
    gx = torch.randn(2, 9, 29)

    def grads(fused):
        for p in _params(layers):
            p.grad = None
        if fused:
            outs = lora_linears(x, layers)
        else:
            with fused_lora_disabled():
                outs = lora_linears(x, layers)
        # member 2's output is unused: its gradient arrives as None
        ((outs[0] * gx).sum() + outs[1].square().sum()).backward()
        return [None if p.grad is None else p.grad.clone() for p in _params(layers)]

    got, want = grads(True), grads(False)
    assert got[2] is None and want[2] is None  # frozen A_1
    for a, b in zip(got, want):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_outputs_are_not_views_and_can_be_modified_in_place():
    layers = _group("dense", torch.float32)
    x = torch.randn(2, 3, 37, requires_grad=True)
    q, k, _ = lora_linears(x, layers)
    assert q._base is None and k._base is None
    q.view(2, 3, 29).mul_(2.0)  # what an in-place RoPE does; autograd must accept it
    q.sum().backward()
    assert x.grad is not None


# ------------------------------------------------------------------------------- fallback cases
def _fallback_equal(layer, x, reason):
    assert fusable(layer) is not None and reason in fusable(layer)
    torch.manual_seed(11)
    (got,) = lora_linears(x, [layer])
    assert type(got.grad_fn).__name__ != FUSED
    torch.manual_seed(11)
    with fused_lora_disabled():
        want = layer(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fallback_dropout():
    g = torch.Generator().manual_seed(0)
    base = _base(37, 29, True, "dense", torch.float32, "cpu", g)
    layer = LoraLinear(base, 4, 8, lora_dropout=0.3)
    layer.set_adapter_weights(torch.randn(4, 37, generator=g), torch.randn(29, 4, generator=g))
    layer.train()
    _fallback_equal(layer, torch.randn(5, 37, requires_grad=True), "dropout")


def test_fallback_disabled_and_merged():
    layer = _group("dense", torch.float32)[0]
    x = torch.randn(5, 37, requires_grad=True)
    layer.disabled = True
    _fallback_equal(layer, x, "disabled")
    want_base = layer.base_layer(x)
    torch.testing.assert_close(lora_linears(x, [layer])[0], want_base)  # adapter really off
    layer.disabled = False
    layer.merge()
    _fallback_equal(layer, x, "merged")


def test_fallback_trainable_base_and_hooks():
    layers = _group("dense", torch.float32)
    layers[0].base_layer.bias.requires_grad_(True)
    assert "bias is trainable" in fusable(layers[0])
    assert fusable(layers[1]) is None and fusable(layers[2]) is None
    x = torch.randn(3, 37, requires_grad=True)
    outs = lora_linears(x, layers)  # one unfusable member: the group runs layer by layer
    assert all(type(o.grad_fn).__name__ != FUSED for o in outs[:1])
    with fused_lora_disabled():
        want = [m(x) for m in layers]
    for a, b in zip(outs, want):
        torch.testing.assert_close(a, b)
    layers[0].base_layer.bias.requires_grad_(False)
    calls = []
    handle = layers[1].base_layer.register_forward_hook(lambda *_: calls.append(1))
    assert "hooks" in fusable(layers[1])
    layers[1](x)
    assert calls == [1]  # the fused path would have skipped the hook
    handle.remove()
    assert fusable(layers[1]) is None


def test_fallback_dtype_mismatch():
    layers = _group("dense", torch.bfloat16)
    x = torch.randn(3, 37)  # fp32 input into bf16 weights: the generic path decides (and raises)
    with pytest.raises(RuntimeError):
        lora_linears(x, layers)


# ------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("kind", ["dense", "4bit"])
def test_autocast_bf16_model_is_fused_and_matches(kind):
    layers = _group(kind, torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 37, generator=g).bfloat16().requires_grad_()
    grads = [torch.randn(2, 7, m.out_features, generator=g).bfloat16() for m in layers]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(layers, x, grads, fused=True)
        want = _run(layers, x, grads, fused=False)
    for a, b in zip(got[0] + [got[1]] + got[2], want[0] + [want[1]] + want[2]):
        _close(a, b, torch.bfloat16)


def test_autocast_fp32_model_falls_back_with_generic_dtypes():
    layers = _group("dense", torch.float32)
    x = torch.randn(2, 7, 37, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lora_linears(x, layers)
        with fused_lora_disabled():
            want = [m(x) for m in layers]
    for a, b in zip(got, want):
        assert type(a.grad_fn).__name__ != FUSED
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------- cast cache
def _fused_out(layer, x):
    return lora_linears(x, [layer])[0].detach()


def _generic_out(layer, x):
    with fused_lora_disabled():
        return layer(x).detach()


def _copies(layer):
    (plan,) = ll._PLANS[layer].values()
    return plan.copies


def test_cast_cache_reuses_copy_until_the_parameter_changes():
    layer = _group("dense", torch.bfloat16)[0]
    a = layer.lora_A.weight
    x = torch.randn(3, 37, dtype=torch.bfloat16)
    _fused_out(layer, x)
    copies = _copies(layer)
    buf = copies.a_cat
    _fused_out(layer, x)
    assert _copies(layer) is copies and copies.a_cat is buf and copies.gen == 1  # reused, not re-copied
    with torch.no_grad():
        a.add_(1.0)  # in-place update bumps the version
    got = _fused_out(layer, x)
    assert copies.a_cat is buf and copies.gen == 2  # refreshed in place
    torch.testing.assert_close(buf, a.detach().bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(got, _generic_out(layer, x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.AdamW(ps, lr=0.5, fused=True),  # does not bump _version on CPU
        lambda ps: torch.optim.SGD(ps, lr=0.5, foreach=True),
    ],
    ids=["adamw_fused", "sgd_foreach"],
)
def test_cast_cache_never_stale_after_optimizer_step(make_opt):
    layer = _group("dense", torch.bfloat16)[0]
    x = torch.randn(4, 37, dtype=torch.bfloat16)
    before = _fused_out(layer, x)
    opt = make_opt(_params([layer]))
    for p in _params([layer]):
        p.grad = torch.randn_like(p)  # no backward: only the optimizer hook can invalidate
    opt.step()
    after = _fused_out(layer, x)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, _generic_out(layer, x), rtol=0, atol=0)


def test_cast_cache_never_stale_after_bitsandbytes_8bit_step():
    bnb = pytest.importorskip("bitsandbytes")
    layer = _group("dense", torch.bfloat16, n_in=300)[0]  # 8-bit state needs >= 4096 elements
    x = torch.randn(4, 300, dtype=torch.bfloat16)
    before = _fused_out(layer, x)
    a = layer.lora_A.weight
    layer.lora_B.weight.requires_grad_(False)
    opt = bnb.optim.AdamW8bit([a], lr=0.5)
    a.grad = torch.randn_like(a)
    v = a._version
    opt.step()
    after = _fused_out(layer, x)
    if a._version == v:  # the case the optimizer hook exists for
        assert not torch.equal(after, before)
    torch.testing.assert_close(after, _generic_out(layer, x), rtol=0, atol=0)


def test_cast_cache_never_stale_after_data_write_following_backward():
    layer = _group("dense", torch.bfloat16)[0]
    x = torch.randn(4, 37, dtype=torch.bfloat16)
    lora_linears(x, [layer])[0].float().sum().backward()
    a = layer.lora_A.weight
    v = a._version
    a.data.mul_(-1.0)  # manual update through .data: no version bump, no optimizer
    assert a._version == v
    torch.testing.assert_close(_fused_out(layer, x), _generic_out(layer, x), rtol=0, atol=0)


def test_cast_cache_is_bounded_and_weak():
    layer = _group("dense", torch.bfloat16)[0]
    x = torch.randn(3, 37, dtype=torch.bfloat16)
    for _ in range(3):
        _fused_out(layer, x)
    gc.collect()
    n = len(ll._REGISTRY.live)
    copies = weakref.ref(_copies(layer))
    layer.half()  # another dtype: new copies replace the old ones (one set per group)
    _fused_out(layer, x.half())
    gc.collect()
    assert copies() is None and len(ll._REGISTRY.live) == n
    copies = weakref.ref(_copies(layer))
    del layer
    gc.collect()
    assert copies() is None and len(ll._REGISTRY.live) == n - 1  # gone with the layer


def test_inference_mode_then_training_uses_a_normal_cached_copy():
    layers = _group("dense", torch.bfloat16)
    x = torch.randn(2, 3, 37, dtype=torch.bfloat16)
    with torch.inference_mode():
        inf = lora_linears(x, layers)  # e.g. generate() between training steps
    (plan,) = ll._PLANS[layers[0]].values()
    assert not plan.copies.a_cat.is_inference() and not plan.copies.bs[0].is_inference()
    got = _run(layers, x.requires_grad_(), [torch.ones_like(o) for o in inf], fused=True)
    want = _run(layers, x, [torch.ones_like(o) for o in inf], fused=False)
    for a, b in zip(inf, got[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(got[2], want[2]):
        _close(a, b, torch.bfloat16)
    opt = torch.optim.AdamW(_params(layers), lr=0.1)
    opt.step()  # the copies made under inference mode are refreshed in place by the step
    torch.testing.assert_close(plan.copies.bs[0], layers[0].lora_B.weight.detach().bfloat16(), rtol=0, atol=0)


def test_same_dtype_adapter_modified_before_backward_raises():
    layer = _group("dense", torch.float32)[0]
    x = torch.randn(3, 37, requires_grad=True)
    y = lora_linears(x, [layer])[0]
    with torch.no_grad():
        layer.lora_B.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified"):
        y.sum().backward()


# ------------------------------------------------------------------------------- models + checkpointing
def _quantize(model):
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in names:
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[-1], Linear4bit.from_linear(module))
    return model


def _lora_grads(peft_tiny_model, family, kind, mode, fused, monkeypatch):
    base = peft_tiny_model(family)
    if kind == "4bit":
        base = _quantize(base)
    pm = get_peft_model(base, r=4, lora_alpha=8, use_gradient_checkpointing=mode)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    calls = []
    real = ll._apply
    monkeypatch.setattr(ll, "_apply", lambda x, plan: calls.append(len(plan.members)) or real(x, plan))
    ids = torch.randint(0, 128, (1, 520), generator=torch.Generator().manual_seed(0))  # >= 512: offloaded
    pm.train()
    if fused:
        pm(input_ids=ids, labels=ids).loss.backward()
    else:
        with fused_lora_disabled():
            pm(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    if mode == "unsloth":
        assert offload_handle(pm.get_base_model()).stats()["offloads"] >= 1
    return grads, calls


@pytest.mark.parametrize(
    ("family", "kind"), [("llama", "dense"), ("qwen2", "dense"), ("llama", "4bit")]
)  # qwen2: q/k/v biases
def test_model_fused_grads_match_generic_and_checkpointing(peft_tiny_model, family, kind, monkeypatch):
    want, calls = _lora_grads(peft_tiny_model, family, kind, False, False, monkeypatch)
    assert calls == []
    got, calls = _lora_grads(peft_tiny_model, family, kind, False, True, monkeypatch)
    # every projection of both layers ran fused exactly once, gate+up as one group (q/k/v too when
    # the fast attention forward is installed)
    assert sum(calls) == 7 * 2 and calls.count(2) == 2
    for n in want:
        assert torch.count_nonzero(want[n]) > 0, n
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6)
    for mode in (True, "unsloth"):
        ckpt, calls = _lora_grads(peft_tiny_model, family, kind, mode, True, monkeypatch)
        assert len(calls) > 12  # recomputes go through the fused path too
        for n in want:
            torch.testing.assert_close(ckpt[n], got[n], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------- GPU (H200)
@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["dense", "4bit", "4bit_exposed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("lead", "n_in"), [((3, 171), 1029), ((5,), 37), ((2, 1000), 2051)])
def test_cuda_group_matches_generic(kind, dtype, lead, n_in):
    _check_group(kind, dtype, "cuda", lead, n_in=n_in, seed=7)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["dense", "4bit"])
def test_cuda_fp32_matches_float64(kind):
    layers = _group(kind, torch.float32, "cuda", n_in=515)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 77, 515, generator=g).cuda().requires_grad_()
    grads = [torch.randn(3, 77, m.out_features, generator=g).cuda() for m in layers]
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    try:
        outs, dx, pgrads = _run(layers, x, grads)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    x64 = x.detach().double().requires_grad_()
    leaves, total = [], 0
    for m, gy, out in zip(layers, grads, outs):
        base = m.base_layer if isinstance(m, LoraLinear) else m
        w = (
            dequantize_4bit_reference(base.weight, base.quant_state, torch.float64)
            if kind == "4bit"
            else base.weight.double()
        )
        y = x64 @ w.T + (0 if base.bias is None else base.bias.double())
        if isinstance(m, LoraLinear):
            a = m.lora_A.weight.detach().double().requires_grad_()
            b = m.lora_B.weight.detach().double().requires_grad_()
            leaves += [a, b]
            y = y + m.scaling * (x64 @ a.T) @ b.T
        torch.testing.assert_close(out.double(), y.detach(), rtol=1e-4, atol=1e-4)
        total = total + (y * gy.double()).sum()
    total.backward()
    torch.testing.assert_close(dx.double(), x64.grad, rtol=1e-4, atol=1e-4)
    for got, leaf in zip(pgrads, leaves):
        torch.testing.assert_close(got.double(), leaf.grad, rtol=1e-4, atol=1e-3)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["dense", "4bit"])
def test_cuda_autocast_bf16_model_fused(kind):
    layers = _group(kind, torch.bfloat16, "cuda", n_in=515)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 99, 515, generator=g).cuda().bfloat16().requires_grad_()
    grads = [torch.randn(2, 99, m.out_features, generator=g).cuda().bfloat16() for m in layers]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = _run(layers, x, grads, fused=True)
        want = _run(layers, x, grads, fused=False)
    for a, b in zip(got[0] + [got[1]] + got[2], want[0] + [want[1]] + want[2]):
        _close(a, b, torch.bfloat16)
    layers32 = _group(kind, torch.float32, "cuda", n_in=515)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outs = lora_linears(x.float(), layers32)  # fp32 model: autocast decides, generic path
        with fused_lora_disabled():
            want32 = [m(x.float()) for m in layers32]
    for a, b in zip(outs, want32):
        assert type(a.grad_fn).__name__ != FUSED and a.dtype == b.dtype
        torch.testing.assert_close(a, b)


@cuda
@pytest.mark.cuda
def test_cuda_cast_cache_fresh_after_fused_adamw():
    layer = _group("4bit", torch.bfloat16, "cuda", n_in=515)[0]
    x = torch.randn(64, 515, device="cuda", dtype=torch.bfloat16)
    opt = torch.optim.AdamW(_params([layer]), lr=0.1, fused=True)
    for _ in range(3):
        before = _fused_out(layer, x)
        y = lora_linears(x, [layer])[0]
        y.float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        after = _fused_out(layer, x)
        assert (after.float() - before.float()).abs().max() > 0.1  # the step moved the output
        _close(after, _generic_out(layer, x), torch.bfloat16)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_adapter_grads_come_straight_from_the_fp32_accumulator(dtype):
    """The addmm ``out_dtype`` overload is used on CUDA (a speed check: the fallback is also correct)."""
    _check_group("4bit", dtype, "cuda", (4, 33), n_in=515, seed=3)
    assert ll._OUT_DTYPE_OK.get(("cuda", dtype, torch.float32), True)
