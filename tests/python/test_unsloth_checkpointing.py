"""get_peft_model(use_gradient_checkpointing="unsloth") really offloads, and trains exactly like True."""

from __future__ import annotations

import torch

from rslora_fast import get_peft_model
from rslora_fast.checkpointing import offload_handle


def _model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def _train(mode, steps=2, seq=640):
    model = get_peft_model(_model(), r=4, lora_alpha=8, use_gradient_checkpointing=mode, random_state=1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(hash(n) % 1000))
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 64, (1, seq), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return model, losses, grads


def test_unsloth_mode_offloads_and_matches_plain_checkpointing_bitwise():
    model_u, losses_u, grads_u = _train("unsloth")
    handle = offload_handle(model_u.base_model.model)
    assert handle is not None
    stats = handle.stats()
    # 3 layers, the last one stays on the device: 2 offloads per step, each 640 x 32 floats
    assert stats["offloads"] == 4 and stats["bytes_to_host"] == 4 * 640 * 32 * 4
    assert stats["in_use_bytes"] == 0  # every buffer released after backward
    _, losses_p, grads_p = _train(True)
    assert torch.equal(torch.stack(losses_u), torch.stack(losses_p))
    assert grads_u.keys() == grads_p.keys()
    for n in grads_p:
        assert torch.equal(grads_u[n], grads_p[n]), n
    assert any(g.abs().sum() > 0 for n, g in grads_u.items() if "lora_A" in n)


def test_switching_modes_uninstalls_offload():
    from rslora_fast.checkpointing import apply_gradient_checkpointing

    model = get_peft_model(_model(), r=4, use_gradient_checkpointing="unsloth")
    inner = model.base_model.model
    assert offload_handle(inner) is not None
    apply_gradient_checkpointing(inner, True)
    assert offload_handle(inner) is None
    apply_gradient_checkpointing(inner, "unsloth")
    assert offload_handle(inner) is not None
    model.unload()
    assert offload_handle(inner) is None


def test_trainer_style_gradient_checkpointing_enable_keeps_offloading():
    model = get_peft_model(_model(), r=4, use_gradient_checkpointing="unsloth")
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )  # as Trainer does
    assert offload_handle(model.base_model.model) is not None
    plain = get_peft_model(_model(), r=4, use_gradient_checkpointing=False)
    plain.gradient_checkpointing_enable()
    assert offload_handle(plain.base_model.model) is None and plain.base_model.model.is_gradient_checkpointing
