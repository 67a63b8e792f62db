"""Edge cases of the fast decoder path found in review: hooks, DDP with the tiled MLP, autograd.grad,
pickling, other per-instance forwards, older transformers layouts, error propagation."""

from __future__ import annotations

import copy
import io
import os
import socket

import pytest
import torch
import torch.distributed as dist

import rslora_fast.models.fast_mlp as fast_mlp
import rslora_fast.ops.lora_linear as lora_linear
from rslora_fast import get_peft_model
from rslora_fast.models.fast_decoder import _attention_why_not, install_fast_decoder, uninstall_fast_decoder
from rslora_fast.peft.layer import LoraLinear


def _llama(layers: int = 2):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
    )
    return transformers.AutoModelForCausalLM.from_config(cfg)


def _peft(**kw):
    model = get_peft_model(_llama(), r=4, lora_alpha=8, use_gradient_checkpointing=False, **kw)
    for m in model.modules():
        if isinstance(m, LoraLinear):
            m.lora_B.weight.data.copy_(
                torch.linspace(-0.05, 0.05, m.lora_B.weight.numel()).view_as(m.lora_B.weight)
            )
    return model


def _ids(n=37):
    return (torch.arange(2 * n).view(2, n) * 7) % 64


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


# ---------------------------------------------------------------------------- tiled MLP
def test_tiled_mlp_under_plain_ddp_and_autograd_grad(monkeypatch):
    """One gradient per parameter from the tiled node: DDP's reducer (no static graph) accepts it,
    torch.autograd.grad sees it, and post-accumulate hooks fire once."""
    ids = _ids()
    ref = _peft()
    ref(input_ids=ids, labels=ids).loss.backward()
    want = _grads(ref)

    monkeypatch.setattr(fast_mlp, "TILE_TOKENS", 16)
    model = _peft()
    a = model.base_model.model.model.layers[0].mlp.gate_proj.lora_A.weight
    calls = []
    a.register_post_accumulate_grad_hook(lambda p: calls.append(1))
    (g,) = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, [a])
    torch.testing.assert_close(g, want[next(n for n in want if "layers.0.mlp.gate_proj.lora_A" in n)])
    assert a.grad is None and not calls  # autograd.grad does not accumulate

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setitem(os.environ, "MASTER_ADDR", "127.0.0.1")
    monkeypatch.setitem(os.environ, "MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # plain: what HF Trainer builds
        ddp(input_ids=ids, labels=ids).loss.backward()
    finally:
        dist.destroy_process_group()
    assert len(calls) == 1
    got = _grads(model)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------- hooks
def test_backward_hook_on_q_proj_rotates_out_of_place_and_matches_transformers():
    ids = _ids(11)
    model = _peft()
    seen = []
    attn = model.base_model.model.model.layers[0].self_attn
    attn.q_proj.register_full_backward_hook(lambda m, gi, go: seen.append(1))
    model(input_ids=ids, labels=ids).loss.backward()  # in-place rotation here would raise
    fast = _grads(model)
    assert seen
    model.zero_grad(set_to_none=True)
    uninstall_fast_decoder(model.base_model.model)
    with lora_linear.fused_lora_disabled():
        model(input_ids=ids, labels=ids).loss.backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(fast[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_global_backward_pre_hook_reaches_every_projection():
    ids = _ids(11)
    model = _peft()
    seen = set()
    handle = torch.nn.modules.module.register_module_full_backward_pre_hook(
        lambda m, go: seen.add(id(m)) if isinstance(m, LoraLinear) else None
    )
    try:
        model(input_ids=ids, labels=ids).loss.backward()
    finally:
        handle.remove()
    # every projection, not only the ones outside a fused group (q/k/v and gate/up run inside one)
    assert seen == {id(m) for m in model.modules() if isinstance(m, LoraLinear)}
    assert lora_linear.fusable(model.base_model.model.model.layers[0].self_attn.q_proj) is None  # hook gone


# ---------------------------------------------------------------------------- install / remove
def test_someone_elses_instance_forward_is_kept_and_survives_unload():
    base = _llama()
    mlp = base.model.layers[0].mlp
    calls = []
    original = mlp.forward

    def wrapped(*a, **k):  # what accelerate's add_hook_to_module installs
        calls.append(1)
        return original(*a, **k)

    mlp.forward = wrapped
    model = get_peft_model(base, r=4, use_gradient_checkpointing=False)
    assert mlp.__dict__["forward"] is wrapped
    ids = _ids(5)
    model(input_ids=ids)
    assert calls
    model.unload()
    assert mlp.__dict__["forward"] is wrapped


def test_the_model_pickles_and_deep_copies_with_the_fast_path_installed():
    ids = _ids(9)
    model = _peft().eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    buf = io.BytesIO()
    torch.save(model.base_model.model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    clone = copy.deepcopy(model.base_model.model)
    for other in (loaded, clone):
        fwd = other.model.layers[0].self_attn.__dict__["forward"]
        assert fwd.args[0] is other.model.layers[0].self_attn  # bound to the copy, not the original
        with torch.no_grad():
            torch.testing.assert_close(other(input_ids=ids).logits, want)


def test_reinstall_is_idempotent_and_old_transformers_layouts_are_refused():
    model = _peft()
    inner = model.base_model.model
    counts = install_fast_decoder(inner)
    assert counts["attention"] == 2 and counts["MLP"] == 2

    class OldAttention(torch.nn.Module):  # transformers < 4.56: singular past_key_value
        head_dim = scaling = attention_dropout = layer_idx = config = None

        def __init__(self):
            super().__init__()
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(self, p, torch.nn.Linear(2, 2))

        def forward(self, hidden_states, position_embeddings, attention_mask, past_key_value=None):
            return hidden_states

    OldAttention.__name__ = "LlamaAttention"
    OldAttention.__module__ = type(inner.model.layers[0].self_attn).__module__
    assert "past_key_values" in _attention_why_not(OldAttention())


# ---------------------------------------------------------------------------- lora_linears
def test_a_real_error_in_the_out_dtype_gemm_surfaces_and_does_not_disable_it(monkeypatch):
    real = torch.addmm

    def failing(*args, **kwargs):
        if "out_dtype" in kwargs:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", failing)
    monkeypatch.setattr(lora_linear, "_OUT_DTYPE_OK", {})
    a, b = torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(4, 5, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="out of memory"):
        lora_linear._mm_scaled(a, b, 2.0, torch.float32)
    assert lora_linear._OUT_DTYPE_OK == {}
    monkeypatch.setattr(torch, "addmm", real)
    out = lora_linear._mm_scaled(a, b, 2.0, torch.float32)  # CPU: no such overload -> fallback, remembered
    torch.testing.assert_close(out, 2.0 * (a.float() @ b.float()), rtol=1e-2, atol=1e-2)
    assert lora_linear._OUT_DTYPE_OK == {("cpu", torch.bfloat16, torch.float32): False}


def test_double_backward_through_the_fused_node_is_refused_clearly():
    model = _peft()
    ids = _ids(5)
    loss = model(input_ids=ids, labels=ids).loss
    a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A.weight
    (g,) = torch.autograd.grad(loss, [a], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()
