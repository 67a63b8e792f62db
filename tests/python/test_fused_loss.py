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
