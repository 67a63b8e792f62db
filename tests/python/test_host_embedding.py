"""offload_embedding: the frozen input embedding table in pinned host memory (models/host_embedding.py).

CPU: the module wiring (buffer of the same name, forward, generate, restore) and the refusals; CUDA
(marker ``cuda``): the GPU reads the pinned table through its alias, bit-identical results, the
GPU memory freed, no host synchronization, and the host-gather fallback.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from rslora_fast import get_peft_model
from rslora_fast.models import host_embedding as he

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def _tiny(tied=False, vocab=97, hidden=32, device="cpu", dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).to(device, dtype)


def _peft(base, **kw):
    model = get_peft_model(base, r=4, lora_alpha=8, use_gradient_checkpointing=False, **kw)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _step(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _generate(model, ids):
    model.eval()
    with torch.no_grad():
        return model.generate(input_ids=ids[:1, :5], max_new_tokens=6, do_sample=False)


# ---------------------------------------------------------------------------- CPU
def test_cpu_wiring_keeps_names_values_results_and_restores():
    model = _peft(_tiny())
    inner = model.base_model.model
    ids = torch.randint(0, 97, (2, 9))
    loss_ref, grads_ref = _step(model, ids)
    gen_ref = _generate(model, ids)
    emb = inner.get_input_embeddings()
    param, table = emb.weight, emb.weight.detach().clone()
    keys = list(inner.state_dict())

    assert he._move_to_host(emb, pin=False) == table.numel() * 4  # the CPU stand-in of the move
    assert he.is_offloaded(inner)
    assert list(inner.state_dict()) == keys  # same names, same order
    assert torch.equal(inner.state_dict()["model.embed_tokens.weight"], table)
    assert all(p is not param for p in inner.parameters())  # a buffer now, not a parameter
    loss, grads = _step(model, ids)
    assert torch.equal(loss, loss_ref) and grads.keys() == grads_ref.keys()
    for n in grads:
        assert torch.equal(grads[n], grads_ref[n]), n
    assert torch.equal(_generate(model, ids), gen_ref)
    kept = emb.weight
    inner.to("cpu")  # a device move (what trainers do) keeps the table where it is
    assert emb.weight is kept
    inner.to(torch.float64)  # a dtype change converts it
    assert emb.weight.dtype == torch.float64 and torch.equal(emb.weight, table.double())
    inner.to(torch.float32)

    he.restore_embedding(inner)
    assert not he.is_offloaded(inner) and emb.weight is param and torch.equal(param, table)
    assert "forward" not in emb.__dict__


def test_get_peft_model_on_a_cpu_model_moves_nothing():
    model = _peft(_tiny(), offload_embedding=True)
    assert not he.is_offloaded(model.base_model.model)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"offload_embedding": "yes"}, "offload_embedding must be a bool"),
        ({"offload_embedding": True, "modules_to_save": ["embed_tokens"]}, "modules_to_save contradict"),
    ],
)
def test_bad_settings_are_refused_before_the_model_changes(kw, match):
    base = _tiny()
    with pytest.raises(ValueError, match=match):
        get_peft_model(base, r=4, use_gradient_checkpointing=False, **kw)
    assert not any("lora" in n for n, _ in base.named_parameters())


def test_tied_embeddings_are_refused_and_why():
    base = _tiny(tied=True)
    with pytest.raises(ValueError, match="tied to the output head"):
        get_peft_model(base, r=4, use_gradient_checkpointing=False, offload_embedding=True)
    assert not any("lora" in n for n, _ in base.named_parameters())


def test_a_trainable_table_is_refused():
    with pytest.raises(ValueError, match="trains"):
        he.offload_embedding(_tiny())  # a fresh model: every parameter requires grad


def test_from_pretrained_option_refuses_full_finetuning():
    from rslora_fast.fast_language_model import _offload_embedding

    with pytest.raises(ValueError, match="full_finetuning"):
        _offload_embedding(_tiny(), True, full_finetuning=True)
    with pytest.raises(ValueError, match="must be a bool"):
        _offload_embedding(_tiny(), 1, full_finetuning=False)


# ---------------------------------------------------------------------------- CUDA
def _cuda_pair(dtype):
    fast = _peft(_tiny(vocab=5003, hidden=64, device="cuda", dtype=dtype), offload_embedding=True)
    plain = _peft(_tiny(vocab=5003, hidden=64, device="cuda", dtype=dtype))
    return fast, plain


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_results_are_bit_identical_and_the_table_leaves_the_gpu(dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("error", he.HostEmbeddingWarning)  # the alias must work on the H200
        fast, plain = _cuda_pair(dtype)
        inner = fast.base_model.model
        emb = inner.get_input_embeddings()
        assert he.is_offloaded(inner) and emb.weight.device.type == "cpu" and emb.weight.is_pinned()
        ids = torch.randint(0, 5003, (2, 33), device="cuda")
        loss, grads = _step(fast, ids)
        loss_ref, grads_ref = _step(plain, ids)
        assert torch.equal(loss, loss_ref)
        for n in grads_ref:
            assert torch.equal(grads[n], grads_ref[n]), n
        assert torch.equal(_generate(fast, ids), _generate(plain, ids))
        view = emb.__dict__[he._VIEWS][ids.device]
        assert view.data_ptr() == emb.weight.data_ptr()  # the GPU reads the host table itself
        fast.to("cuda")  # what trainers do: the table stays in pinned host memory
        assert emb.weight.device.type == "cpu" and emb.weight.is_pinned()
        assert torch.equal(_step(fast, ids)[0], loss_ref)


@cuda
@pytest.mark.cuda
def test_cuda_the_table_leaves_the_gpu():
    base = _tiny(vocab=5003, hidden=64, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    freed = he.offload_embedding(base)
    after = torch.cuda.memory_allocated()
    table = 5003 * 64 * 2
    assert freed == table
    assert table <= before - after < table + 4096  # the allocator rounds blocks up a little


@cuda
@pytest.mark.cuda
def test_cuda_gather_does_not_synchronize():
    fast, _ = _cuda_pair(torch.bfloat16)
    emb = fast.base_model.model.get_input_embeddings()
    ids = torch.randint(0, 5003, (4, 512), device="cuda")
    emb(ids)  # the alias is built (and checked, with one synchronization) on the first call
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = emb(ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out, emb.weight[ids.cpu()].cuda())


@cuda
@pytest.mark.cuda
def test_cuda_host_gather_fallback_and_restore(monkeypatch):
    fast, plain = _cuda_pair(torch.bfloat16)
    monkeypatch.setattr(he, "_make_view", lambda host, device: None)  # no alias: rows via the host
    ids = torch.randint(0, 5003, (2, 17), device="cuda")
    loss, _ = _step(fast, ids)
    loss_ref, _ = _step(plain, ids)
    assert torch.equal(loss, loss_ref)
    inner = fast.unload()
    emb = inner.get_input_embeddings()
    assert not he.is_offloaded(inner) and emb.weight.is_cuda and isinstance(emb.weight, torch.nn.Parameter)
    assert torch.equal(emb.weight, plain.base_model.model.get_input_embeddings().weight)
