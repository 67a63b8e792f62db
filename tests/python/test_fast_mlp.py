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


def test_gemma_geglu_stays_on_the_generic_path():
    model = get_peft_model(_model("gemma"), r=4, use_gradient_checkpointing=False)
    mlps = [m for m in model.base_model.model.modules() if type(m).__name__.endswith("MLP")]
    assert mlps and all("forward" not in m.__dict__ for m in mlps)


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
