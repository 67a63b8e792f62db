"""Fused lm_head + cross-entropy against transformers' loss and plain float64 math (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rslora_fast.ops.fused_ce import fused_linear_cross_entropy


def _reference(h, w, t, num_items=None):
    logits = h.double() @ w.double().t()
    loss = F.cross_entropy(logits, t, ignore_index=-100, reduction="sum")
    return loss / (num_items if num_items is not None else (t != -100).sum())


@pytest.mark.parametrize("n,hdim,vocab,chunk", [(37, 16, 101, 8), (64, 32, 257, 64), (5, 8, 3, 2)])
@pytest.mark.parametrize("num_items", [None, 50])
def test_matches_float64_reference(n, hdim, vocab, chunk, num_items):
    h = torch.randn(n, hdim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hdim, dtype=torch.float64) / hdim**0.5
    t = torch.randint(0, vocab, (n,))
    t[::3] = -100  # ignored tokens
    loss = fused_linear_cross_entropy(h, w, t, num_items_in_batch=num_items, chunk_tokens=chunk)
    (g,) = torch.autograd.grad(loss, h)
    h2 = h.detach().clone().requires_grad_()
    ref = _reference(h2, w, t, num_items)
    (g_ref,) = torch.autograd.grad(ref, h2)
    assert torch.allclose(loss.double(), ref, rtol=1e-6, atol=1e-7)
    assert torch.allclose(g, g_ref, rtol=1e-5, atol=1e-8)
    assert g[::3].abs().max() == 0  # ignored tokens get no gradient


def test_bad_shapes():
    with pytest.raises(ValueError, match="do not fit"):
        fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))
    for bad in (0, -4):  # a non-positive chunk would skip every token and hand back garbage
        with pytest.raises(ValueError, match=f"chunk_tokens .* got {bad}"):
            fused_linear_cross_entropy(
                torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), chunk_tokens=bad
            )


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_peft_model_loss_and_lora_grads_equal_transformers_path(checkpointing):
    from rslora_fast import get_peft_model

    model = get_peft_model(_tiny_llama(), r=4, lora_alpha=8, use_gradient_checkpointing=checkpointing)
    with torch.no_grad():  # non-zero B so every LoRA matrix gets a gradient that can differ
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.train()
    ids = torch.randint(0, 97, (2, 13))
    labels = ids.clone()
    labels[0, :4] = -100
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0

    def run(fused: bool):
        model.fused_loss = fused
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out, grads

    fused_out, fused_grads = run(True)
    hf_out, hf_grads = run(False)
    assert fused_out.logits is None and hf_out.logits is not None  # the fused path really ran
    assert torch.allclose(fused_out.loss, hf_out.loss, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == hf_grads.keys() and len(fused_grads) > 0
    for name in hf_grads:
        assert torch.allclose(fused_grads[name], hf_grads[name], rtol=1e-4, atol=1e-6), name


def test_eval_mode_keeps_logits():
    from rslora_fast import get_peft_model

    model = get_peft_model(_tiny_llama(), r=4, use_gradient_checkpointing=False)
    model.eval()
    ids = torch.randint(0, 97, (1, 7))
    out = model(input_ids=ids, labels=ids)
    assert out.logits is not None and out.logits.shape == (1, 7, 97)


def test_autocast_gradients_match_torch_under_autocast():
    # fp32 hidden and head under bf16 autocast (an fp32 model trained with bf16=True)
    torch.manual_seed(0)
    h = torch.randn(50, 32, requires_grad=True)
    w = torch.randn(97, 32) / 32**0.5
    t = torch.randint(0, 97, (50,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, t, chunk_tokens=16)
    (g,) = torch.autograd.grad(loss, h)
    h2 = h.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((h2 @ w.t()).float(), t)
    (g_ref,) = torch.autograd.grad(ref, h2)
    assert torch.allclose(loss, ref, rtol=1e-3, atol=1e-3)
    assert (g - g_ref).norm() / g_ref.norm() < 1e-2


def test_return_dict_false_keeps_the_tuple_contract():
    from rslora_fast import get_peft_model

    model = get_peft_model(_tiny_llama(), r=4, use_gradient_checkpointing=False)
    model.train()
    ids = torch.randint(0, 97, (1, 6))
    out = model(input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0 and out[1].shape == (1, 6, 97)


@pytest.mark.parametrize("num_items", [None, 50])
def test_kernel_branch_wiring_on_cpu(monkeypatch, num_items):
    # the CUDA chunk loop (cross-entropy ops) run with the ops' CPU reference: same loss and dh
    import rslora_fast.ops.fused_ce as fused_ce

    monkeypatch.setattr(fused_ce, "_use_kernels", lambda hidden: True)
    h = torch.randn(37, 16, dtype=torch.float32, requires_grad=True)
    w = torch.randn(101, 16) / 4
    t = torch.randint(0, 101, (37,))
    t[::3] = -100
    loss = fused_linear_cross_entropy(h, w, t, num_items_in_batch=num_items, chunk_tokens=8)
    (g,) = torch.autograd.grad(loss, h)
    h2 = h.detach().double().requires_grad_()
    ref = _reference(h2, w, t, num_items)
    (g_ref,) = torch.autograd.grad(ref, h2)
    assert torch.allclose(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(g.double(), g_ref, rtol=1e-4, atol=1e-6)
    assert g[::3].abs().max() == 0


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "n,hdim,vocab,chunk", [(1, 64, 1000, None), (67, 128, 32003, 16), (300, 256, 128256 + 3, 97)]
)
def test_cuda_matches_torch_cross_entropy_on_full_logits(dtype, n, hdim, vocab, chunk):
    import rslora_fast.ops.fused_ce as fused_ce

    h = (torch.randn(n, hdim, device="cuda") * 2).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hdim, device="cuda") / hdim**0.5).to(dtype)
    t = torch.randint(0, vocab, (n,), device="cuda")
    if n > 1:  # a lone ignored token would leave nothing to average (torch: nan; ours: 0, tested apart)
        t[::5] = -100
    if n > 2:
        t[1], t[2] = 0, vocab - 1
    assert fused_ce._use_kernels(h)
    loss = fused_linear_cross_entropy(h, w, t, chunk_tokens=chunk)
    (g,) = torch.autograd.grad(loss, h)
    # transformers' path: full logits in the dtype, upcast, F.cross_entropy (float64 for the reference)
    h2 = h.detach().clone().requires_grad_()
    logits = (h2 @ w.t()).double()
    ref = F.cross_entropy(logits, t, ignore_index=-100)
    (g_ref,) = torch.autograd.grad(ref, h2)
    # the chunked matmul may round a few logits differently from the full one (one ulp of the dtype)
    loss_tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}[dtype]
    assert abs(float(loss) - float(ref)) < loss_tol * max(1.0, abs(float(ref)))
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    err = float((g.double() - g_ref.double()).norm() / g_ref.double().norm())
    assert err < tol, err
    assert torch.isfinite(g).all()
    if n > 1:
        assert g[::5].abs().max() == 0


@cuda
@pytest.mark.cuda
def test_cuda_all_ignored_gives_zero_gradient():
    h = torch.randn(9, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1001, 32, device="cuda", dtype=torch.bfloat16)
    t = torch.full((9,), -100, device="cuda")
    loss = fused_linear_cross_entropy(h, w, t, chunk_tokens=4)
    (g,) = torch.autograd.grad(loss, h)
    assert float(loss) == 0.0 and g.abs().max() == 0


def _count_mm(fn):
    """Run ``fn`` and count the matrix products (aten mm/addmm/matmul) it dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_backward_runs_no_head_gemm(monkeypatch, kernels, softcap):
    # the chunk's gradient is taken in the forward; backward only scales it by grad_output
    import rslora_fast.ops.fused_ce as fused_ce

    monkeypatch.setattr(fused_ce, "_use_kernels", lambda hidden: kernels)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(101, 16) / 4
    t = torch.randint(0, 101, (37,))
    loss = fused_linear_cross_entropy(h, w, t, chunk_tokens=8, softcap=softcap)
    assert _count_mm(lambda: loss.backward()) == 0
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_no_gradient_gemm_when_hidden_is_frozen():
    # a loss-only forward (frozen hidden or no_grad) runs one head GEMM per chunk, not two
    h = torch.randn(37, 16)
    w = torch.randn(101, 16) / 4
    t = torch.randint(0, 101, (37,))
    assert _count_mm(lambda: fused_linear_cross_entropy(h, w, t, chunk_tokens=8)) == 5
    h.requires_grad_()
    assert _count_mm(lambda: fused_linear_cross_entropy(h, w, t, chunk_tokens=8)) == 10
    with torch.no_grad():
        assert _count_mm(lambda: fused_linear_cross_entropy(h, w, t, chunk_tokens=8)) == 5


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_upstream_gradient_scales_the_forward_gradient(monkeypatch, kernels, softcap, dtype):
    # loss * 3.7 (gradient accumulation's scaling) and a second backward with retain_graph: every
    # gradient equals float64 autograd on the full logits with the same scale
    import rslora_fast.ops.fused_ce as fused_ce

    monkeypatch.setattr(fused_ce, "_use_kernels", lambda hidden: kernels)
    torch.manual_seed(3)
    h = torch.randn(29, 24).to(dtype).requires_grad_()
    w = (torch.randn(53, 24) / 5).to(dtype)
    t = torch.randint(0, 53, (29,))
    t[::4] = -100
    loss = fused_linear_cross_entropy(h, w, t, chunk_tokens=7, softcap=softcap, num_items_in_batch=31)
    (loss * 3.7).backward(retain_graph=True)
    g1 = h.grad.clone()
    (loss * -0.5).backward()
    g2 = h.grad - g1
    h64 = h.detach().double().requires_grad_()
    logits = h64 @ w.double().t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    ref = F.cross_entropy(logits, t, ignore_index=-100, reduction="sum") / 31
    (g_ref,) = torch.autograd.grad(ref, h64)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    assert abs(float(loss) - float(ref)) < tol * max(1.0, float(ref))
    for got, scale in ((g1, 3.7), (g2, -0.5)):
        err = float((got.double() - scale * g_ref).norm() / (abs(scale) * g_ref.norm()))
        assert err < tol, (scale, err)
        assert got[::4].abs().max() == 0
