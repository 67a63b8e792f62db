"""The fused SwiGLU MLP path: installed by get_peft_model on llama-family MLPs, same math, removed by unload."""

from __future__ import annotations

import pytest
import torch

from rslora_fast import get_peft_model


def _model(family: str):
    import transformers

    torch.manual_seed(0)
    cfg_cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
        "gemma": transformers.GemmaConfig,
    }[family]
    cfg = cfg_cls(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
    )
    return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_fused_mlp_installed_and_equal(family):
    ref = _model(family)
    model = get_peft_model(_model(family), r=4, use_gradient_checkpointing=False)
    inner = model.base_model.model
    mlps = [m for m in inner.modules() if type(m).__name__.endswith("MLP")]
    assert mlps and all("forward" in m.__dict__ for m in mlps)  # instance-level fused forward
    x = torch.randn(2, 5, 32)
    for m_ref, m in zip([m for m in ref.modules() if type(m).__name__.endswith("MLP")], mlps):
        want = m_ref(x)  # transformers' act_fn(gate) * up path
        got = m(x)  # LoRA B is zero at init, so the adapters add nothing
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    model.unload()
    assert all("forward" not in m.__dict__ for m in mlps)


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu"])
def test_gemma_geglu_mlp_is_fused_and_equal(act):
    import transformers

    def gemma():
        torch.manual_seed(0)
        cfg = transformers.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_act=act)  # fmt: skip
        return transformers.AutoModelForCausalLM.from_config(cfg)

    ref = gemma().model.layers[0].mlp
    model = get_peft_model(gemma(), r=4, use_gradient_checkpointing=False)
    mlp = model.base_model.model.model.layers[0].mlp
    assert "forward" in mlp.__dict__
    x = torch.randn(2, 5, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    torch.testing.assert_close(mlp(x2), ref(x), rtol=1e-6, atol=1e-6)  # B = 0: adapters add nothing
    g = torch.randn(2, 5, 32)
    ref(x).backward(g)
    mlp(x2).backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)


def test_gemma_with_another_gelu_stays_on_the_generic_path():
    import transformers

    cfg = transformers.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_act="gelu_new")  # fmt: skip
    model = get_peft_model(
        transformers.AutoModelForCausalLM.from_config(cfg), r=4, use_gradient_checkpointing=False
    )
    mlp = model.base_model.model.model.layers[0].mlp
    assert "forward" not in mlp.__dict__


def test_fused_mlp_gradients_match_transformers():
    ref = _model("llama")
    model = get_peft_model(_model("llama"), r=4, use_gradient_checkpointing=False)
    m_ref = ref.model.layers[0].mlp
    m = model.base_model.model.model.layers[0].mlp
    x = torch.randn(3, 7, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(3, 7, 32)
    m_ref(x).backward(g)
    m(x2).backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    assert m.gate_proj.lora_A.weight.grad is not None or m.gate_proj.lora_B.weight.grad is not None


@pytest.mark.parametrize("mode", [False, True, "unsloth"])
def test_tiled_mlp_matches_the_untiled_one(monkeypatch, mode):
    """Long calls run the MLP tile by tile (less memory): same loss and LoRA gradients."""
    import rslora_fast.models.fast_mlp as fast_mlp

    def run(tile):
        monkeypatch.setattr(fast_mlp, "TILE_TOKENS", tile)
        model = get_peft_model(_model("llama"), r=4, lora_alpha=8, use_gradient_checkpointing=mode)
        for name, p in model.named_parameters():  # non-zero B: every adapter matters
            if "lora_B" in name:
                p.data.copy_(torch.linspace(-0.05, 0.05, p.numel()).view_as(p))
        model.train()
        ids = torch.arange(2 * 37).view(2, 37) % 64
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    calls = []
    real = fast_mlp._TiledMLP.apply
    monkeypatch.setattr(fast_mlp._TiledMLP, "apply", lambda *a: calls.append(1) or real(*a))
    loss_ref, g_ref = run(10**9)
    assert not calls
    loss_tiled, g_tiled = run(16)  # 74 tokens: tiles of 16, a partial last one
    assert calls  # the tiled path ran
    torch.testing.assert_close(loss_tiled, loss_ref, rtol=1e-6, atol=1e-6)
    assert g_ref.keys() == g_tiled.keys()
    for name in g_ref:
        torch.testing.assert_close(g_tiled[name], g_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_tiled_mlp_without_grad_and_with_dropout(monkeypatch):
    import rslora_fast.models.fast_mlp as fast_mlp

    model = get_peft_model(_model("llama"), r=4, use_gradient_checkpointing=False)
    mlp = model.base_model.model.model.layers[0].mlp
    x = torch.randn(3, 11, 32)
    want = mlp(x)
    monkeypatch.setattr(fast_mlp, "TILE_TOKENS", 4)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), want, rtol=1e-6, atol=1e-6)
    dropped = get_peft_model(_model("llama"), r=4, lora_dropout=0.1, use_gradient_checkpointing=False)
    assert not fast_mlp._tileable(dropped.base_model.model.model.layers[0].mlp)
