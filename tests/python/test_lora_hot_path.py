"""The LoRA hot path: grouped GEMMs, plans built once, adapter copies refreshed in one batch.

Counts are taken with a ``TorchDispatchMode`` (every aten GEMM the fused op issues), so the
grouping is guarded, not only timed. Equivalence is against the generic path (the same layers
called one by one with the fused path off).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import gc
import math
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import rslora_fast.quant.functional as qf
from rslora_fast import _native
from rslora_fast.ops import lora_linear as ll
from rslora_fast.ops.lora_linear import FusableLora, fused_lora_disabled, lora_linears
from rslora_fast.peft.layer import LoraLinear
from rslora_fast.quant.linear4bit import Linear4bit

FUSED = "_LoraLinearsFunctionBackward"
CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")],
)
DEVICES = ["cpu", CUDA]
GEMMS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm}


class _CountGemms(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in GEMMS:
            self.n += 1
        return func(*args, **(kwargs or {}))


def _lora(n_in, n_out, r, kind, dtype, gen, bias=False):
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=gen) / math.sqrt(n_in))
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=gen) * 0.3)
    lin = lin.to(dtype).requires_grad_(False)
    if kind == "4bit":
        lin = Linear4bit.from_linear(lin, compute_dtype=dtype).requires_grad_(False)
    layer = LoraLinear(lin, r, 2 * r)
    layer.set_adapter_weights(
        torch.randn(r, n_in, generator=gen) * 0.2, torch.randn(n_out, r, generator=gen) * 0.2
    )
    return layer


def _decoder_like(kind, dtype, hidden=37, inter=53, seed=0, device="cpu"):
    """The four groups of a decoder layer: [q, k, v], [o], [gate, up], [down] (odd widths, GQA-like k/v)."""
    g = torch.Generator().manual_seed(seed)
    qkv = [_lora(hidden, hidden, 4, kind, dtype, g, bias=True), _lora(hidden, 13, 4, kind, dtype, g)]
    qkv.append(_lora(hidden, 13, 3, kind, dtype, g))
    o = [_lora(hidden, hidden, 4, kind, dtype, g)]
    gate_up = [_lora(hidden, inter, 5, kind, dtype, g), _lora(hidden, inter, 5, kind, dtype, g)]
    down = [_lora(inter, hidden, 4, kind, dtype, g)]
    return [[m.to(device) for m in grp] for grp in (qkv, o, gate_up, down)]


def _layer_pass(groups, x):
    """A decoder-layer-shaped chain: every group's outputs feed the next group's input."""
    q, k, v = lora_linears(x, groups[0])
    h = lora_linears(q * 0.5 + x, groups[1])[0]
    gate, up = lora_linears(h, groups[2])
    return lora_linears(torch.nn.functional.silu(gate) * up, groups[3])[0] + k.mean() + v.mean()


def _params(groups):
    return [p for grp in groups for m in grp for p in (m.lora_A.weight, m.lora_B.weight)]


# ------------------------------------------------------------------------------- GEMM counts
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["dense", "4bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_launches_per_decoder_layer_are_grouped(kind, dtype, device):
    groups = _decoder_like(kind, dtype, device=device)
    x = torch.randn(2, 5, 37, dtype=dtype, device=device, requires_grad=True)
    _layer_pass(groups, x).float().sum().backward()  # warm: plans, copies, the out_dtype probe on CPU
    with _CountGemms() as fwd:
        y = _layer_pass(groups, x)
    with _CountGemms() as bwd:
        y.float().sum().backward()
    # 7 projections in 4 groups. Forward: 7 base GEMMs + 4 stacked A-GEMMs + 7 B-terms added by
    # addmm_ into the base outputs = 18 (one A-GEMM per projection would be 21). Backward: 7 base
    # input-gradient GEMMs + 7 s*dy*B + 4 stacked gs*A_cat + 4 stacked dA + 7 dB = 29 (35 ungrouped).
    assert (fwd.n, bwd.n) == (18, 29)
    with fused_lora_disabled(), _CountGemms() as generic:
        _layer_pass(groups, x).float().sum().backward()
    assert fwd.n + bwd.n < generic.n


# ------------------------------------------------------------------------------- plans
def _count_inits(monkeypatch, cls):
    calls = []
    real = cls.__init__

    def counting(self, *args, **kwargs):
        calls.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__init__", counting)
    return calls


def test_group_plan_is_built_once_and_rebuilt_when_a_layer_changes(monkeypatch):
    (qkv, *_) = _decoder_like("dense", torch.float32)
    builds = _count_inits(monkeypatch, ll._GroupPlan)
    x = torch.randn(3, 37)
    for _ in range(4):
        lora_linears(x, qkv)
    assert len(builds) == 1
    qkv[1].lora_B.weight = nn.Parameter(torch.zeros_like(qkv[1].lora_B.weight))  # a new adapter tensor
    got = lora_linears(x, qkv)
    assert len(builds) == 2
    with fused_lora_disabled():
        want = lora_linears(x, qkv)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    qkv[0].disabled = True  # the protocol reports it: the group leaves the fused path
    assert type(lora_linears(x, qkv)[0].grad_fn).__name__ != FUSED


def test_dequant_plan_built_once_per_layer_and_no_validating_dequantize_per_call(monkeypatch):
    (qkv, *_) = _decoder_like("4bit", torch.bfloat16)
    x = torch.randn(2, 3, 37, dtype=torch.bfloat16, requires_grad=True)
    lora_linears(x, qkv)  # plans every layer
    builds = _count_inits(monkeypatch, qf.DequantPlan)

    def refuse(*_a, **_k):
        raise AssertionError("the hot path must not call the validating dequantize_4bit")

    monkeypatch.setattr(qf, "dequantize_4bit", refuse)
    for _ in range(3):
        sum(o.float().sum() for o in lora_linears(x, qkv)).backward()
    assert builds == []  # forward and backward reuse each layer's plan
    base = qkv[2].base_layer
    base.requantize_(torch.randn(13, 37, generator=torch.Generator().manual_seed(1)).bfloat16())
    got = lora_linears(x, qkv)[2]
    assert len(builds) == 1  # only the requantized layer
    monkeypatch.undo()
    with fused_lora_disabled():
        want = qkv[2](x)
    torch.testing.assert_close(got, want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_one_native_call_per_dequantize(monkeypatch):
    core = _native.core_or_none()
    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(core, name)

        def nf4_dequantize_cuda(self, *args):
            calls.append(1)
            return core.nf4_dequantize_cuda(*args)

    monkeypatch.setattr(_native, "core_or_none", Counting)
    (qkv, *_) = _decoder_like("4bit", torch.bfloat16, hidden=515, device="cuda")
    x = torch.randn(3, 77, 515, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    for _ in range(3):
        sum(o.float().sum() for o in lora_linears(x, qkv)).backward()
    assert len(calls) == 3 * (3 + 3)  # per pass: one launch per weight in forward and in backward
    monkeypatch.undo()
    with fused_lora_disabled():
        want = lora_linears(x, qkv)
    for a, b in zip(lora_linears(x, qkv), want):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------- adapter copies
def _our_copy_calls(monkeypatch):
    calls = []
    real = torch._foreach_copy_

    def counting(dsts, srcs, *args, **kwargs):
        calls.append(len(dsts))
        return real(dsts, srcs, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_copy_", counting)
    return calls


@pytest.mark.parametrize("fused_opt", [False, True], ids=["adamw_foreach", "adamw_fused"])
def test_optimizer_step_refreshes_every_copy_in_one_batched_copy(monkeypatch, fused_opt):
    groups = _decoder_like("dense", torch.bfloat16)
    params = _params(groups)
    opt = torch.optim.AdamW(params, lr=0.05, fused=fused_opt, foreach=None if fused_opt else True)
    x = torch.randn(2, 5, 37, dtype=torch.bfloat16, requires_grad=True)
    _layer_pass(groups, x).float().sum().backward()  # makes the copies
    calls = _our_copy_calls(monkeypatch)
    opt.step()
    assert calls == [len(params)]  # one batched copy for all 14 adapter tensors of the 4 groups
    calls.clear()
    _layer_pass(groups, x)
    assert calls == []  # nothing re-copied per call after the step
    for grp in groups:
        (plan,) = ll._PLANS[grp[0]].values()
        for src, dst in zip(plan.copies.srcs, plan.copies.dsts):
            torch.testing.assert_close(dst, src.detach().bfloat16(), rtol=0, atol=0)


def test_in_place_changes_outside_the_optimizer_are_seen():
    (qkv, *_) = _decoder_like("4bit", torch.bfloat16)
    x = torch.randn(4, 37, dtype=torch.bfloat16)
    lora_linears(x, qkv)
    g = torch.Generator().manual_seed(3)
    qkv[1].set_adapter_weights(
        torch.randn(4, 37, generator=g), torch.randn(13, 4, generator=g)
    )  # load_adapter's way
    with torch.no_grad():
        qkv[2].lora_A.weight.mul_(-2.0)  # user code under no_grad
    got = lora_linears(x, qkv)
    with fused_lora_disabled():
        want = lora_linears(x, qkv)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_another_optimizers_step_leaves_a_live_graph_usable():
    groups = _decoder_like("dense", torch.bfloat16)
    g_opt = torch.optim.AdamW(_params(groups[:1]), lr=0.1)
    x = torch.randn(3, 37, dtype=torch.bfloat16, requires_grad=True)
    q, k, v = lora_linears(x, groups[0])  # graph of group 0 alive
    h = lora_linears(x, groups[1])[0]
    h.float().sum().backward()
    d_opt = torch.optim.AdamW(_params(groups[1:2]), lr=0.1)
    d_opt.step()  # steps group 1 only (a GAN-style second optimizer)
    (q.float().sum() + k.float().sum() + v.float().sum()).backward()  # group 0's buffers untouched
    g_opt.step()


def test_backward_after_a_step_of_its_own_parameters_raises():
    (qkv, *_) = _decoder_like("dense", torch.bfloat16)
    opt = torch.optim.AdamW(_params([qkv]), lr=0.1)
    x = torch.randn(3, 37, dtype=torch.bfloat16, requires_grad=True)
    outs = lora_linears(x, qkv)
    for p in _params([qkv]):
        p.grad = torch.ones_like(p)
    opt.step()  # the buffers the forward read are refreshed in place
    with pytest.raises(RuntimeError, match="modified in place before backward"):
        sum(o.float().sum() for o in outs).backward()


# ------------------------------------------------------------------------------- training equivalence
def _train(groups, xs, steps, fused):
    """``steps`` SGD steps on a loss linear in every group's outputs; outputs and input grads per step."""
    opt = torch.optim.SGD(
        _params(groups), lr=0.02, momentum=0.5
    )  # linear in the gradients: comparable in bf16
    gen = torch.Generator().manual_seed(7)
    wgts = [
        torch.randn(*x.shape[:-1], m.out_features, generator=gen).to(x.device)
        for grp, x in zip(groups, xs)
        for m in grp
    ]
    seen = []
    for _ in range(steps):
        inputs = [x.detach().clone().requires_grad_() for x in xs]
        with contextlib.nullcontext() if fused else fused_lora_disabled():
            outs = [o for grp, x in zip(groups, inputs) for o in lora_linears(x, grp)]
        sum((o.float() * w).sum() for o, w in zip(outs, wgts)).backward()
        seen.append(([o.detach() for o in outs], [x.grad for x in inputs]))
        opt.step()
        opt.zero_grad()
    return seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["dense", "4bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_optimizer_steps_match_the_generic_path(kind, dtype, device):
    groups = _decoder_like(kind, dtype, seed=5, device=device)
    twin = copy.deepcopy(groups)
    start = [p.detach().clone() for p in _params(groups)]
    gen = torch.Generator().manual_seed(6)
    xs = [torch.randn(3, 7, grp[0].in_features, generator=gen).to(device, dtype) for grp in groups]
    got = _train(groups, xs, 3, fused=True)
    want = _train(twin, xs, 3, fused=False)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    for step_got, step_want in zip(got, want):
        for a, b in zip(step_got[0] + step_got[1], step_want[0] + step_want[1]):
            torch.testing.assert_close(
                a.float(), b.float(), rtol=tol, atol=tol * max(float(b.abs().max()), 1.0)
            )
    for p1, p2, p0 in zip(_params(groups), _params(twin), start):
        torch.testing.assert_close(p1, p2, rtol=tol, atol=tol)
        assert (p1 - p0).abs().max() > 2 * tol  # the steps really moved every adapter
    for grp in groups:  # the refreshed copies equal the parameters after the steps
        (plan,) = ll._PLANS[grp[0]].values()
        for src, dst in zip(plan.copies.srcs, plan.copies.dsts):
            torch.testing.assert_close(dst, src.detach().to(dtype), rtol=0, atol=0)


# ------------------------------------------------------------------------------- boundaries
def test_ops_does_not_import_peft():
    ops = Path(ll.__file__).parent
    for path in ops.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                name = ("." * node.level) + (node.module or "")
                assert "peft" not in name, f"{path.name} imports {name}"
            elif isinstance(node, ast.Import):
                assert not any("peft" in a.name for a in node.names), path.name
    assert isinstance(_lora(8, 8, 2, "dense", torch.float32, torch.Generator()), FusableLora)


def test_a_replaced_member_is_not_pinned_by_old_plans():
    (qkv, *_) = _decoder_like("dense", torch.float32)
    x = torch.randn(2, 37)
    old = weakref.ref(qkv[1])
    for i in range(6):  # k replaced again and again, q stays the first layer of the group
        qkv[1] = _lora(37, 13, 4, "dense", torch.float32, torch.Generator().manual_seed(i))
        lora_linears(x, qkv)
    gc.collect()
    assert old() is None and len(ll._PLANS[qkv[0]]) <= ll._PLANS_PER_LAYER
