"""LoRA over the package's own NF4 ``Linear4bit`` (skipped until rslora_fast.quant provides it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rslora_fast import get_peft_model

try:
    from rslora_fast.quant import Linear4bit
except ImportError:
    try:
        from rslora_fast.quant.linear4bit import Linear4bit
    except ImportError:
        Linear4bit = None
if Linear4bit is None:
    pytest.skip("rslora_fast.quant.Linear4bit not available yet", allow_module_level=True)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _quantize(model):
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in TARGETS:
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[-1], Linear4bit.from_linear(module))
    return model


def test_counts_forward_and_merge_on_4bit(peft_tiny_model):
    dense = peft_tiny_model()
    dense_total = sum(p.numel() for p in dense.parameters())
    pm = get_peft_model(_quantize(peft_tiny_model()), r=4, use_gradient_checkpointing=False)
    t, a = pm.get_nb_trainable_parameters()
    lora = 2 * 4 * sum(4 * (32 + x) for x in (32, 16, 16, 32)) // 4 + 2 * 4 * 3 * (32 + 64)
    assert t == lora and a == dense_total + lora
    layer = pm.get_base_model().model.layers[0].self_attn.q_proj
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randn(3, 32, generator=g)
    w = layer.base_layer.dequantize().float()
    want = F.linear(x, w) + layer.scaling * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-5)
    old = {
        i: lay.self_attn.q_proj.base_layer.dequantize().float()
        for i, lay in enumerate(pm.get_base_model().model.layers)
    }
    delta = {
        i: lay.self_attn.q_proj.scaling
        * lay.self_attn.q_proj.lora_B.weight
        @ lay.self_attn.q_proj.lora_A.weight
        for i, lay in enumerate(pm.get_base_model().model.layers)
    }
    merged = pm.merge_and_unload()
    for i, lay in enumerate(merged.model.layers):
        assert isinstance(lay.self_attn.q_proj, Linear4bit)
        new = lay.self_attn.q_proj.dequantize().float()
        # requantizing is lossy, but the merged weight must sit near old + delta, far from old
        assert (new - (old[i] + delta[i])).norm() < 0.5 * delta[i].norm()


def test_loftq_on_4bit_base_warns(peft_tiny_model):
    with pytest.warns(UserWarning, match="already 4-bit"):
        pm = get_peft_model(
            _quantize(peft_tiny_model()),
            r=4,
            target_modules=["down_proj"],
            init_lora_weights="loftq",
            use_gradient_checkpointing=False,
        )
    for layer in pm.get_base_model().model.layers:
        assert isinstance(layer.mlp.down_proj.base_layer, Linear4bit)
