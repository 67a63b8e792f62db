"""Gradient-checkpointing modes: layers recompute in backward and LoRA gradients stay non-zero."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from rslora_fast import get_peft_model
from rslora_fast.checkpointing import apply_gradient_checkpointing, validate_mode


def _count_layer_calls(model):
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1

    for layer in model.model.layers:
        layer.self_attn.q_proj.base_layer.register_forward_hook(hook)
    return calls


def _grads(pm, ids):
    pm.train()
    out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    return {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}


def _setup(peft_tiny_model, mode, **kw):
    base = peft_tiny_model()
    pm = get_peft_model(base, use_gradient_checkpointing=mode, r=4, **kw)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-zero B so A gets a gradient too
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pm


@pytest.mark.parametrize(
    ("mode", "use_reentrant", "expected_calls"),
    [(False, False, 2), (True, False, 4), (True, True, 4), ("unsloth", False, 4), ("unsloth", True, 4)],
)
def test_modes_recompute_and_lora_grads_match_plain(mode, use_reentrant, expected_calls, peft_tiny_model):
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    plain = _setup(peft_tiny_model, False)
    want = _grads(plain, ids)
    pm = _setup(peft_tiny_model, mode, use_reentrant=use_reentrant)
    calls = _count_layer_calls(pm.get_base_model())
    got = _grads(pm, ids)
    assert calls["n"] == expected_calls  # 2 layers: forward once, plus a recompute each when checkpointed
    assert got.keys() == want.keys() and len(got) == 2 * 7 * 2
    for name in want:
        assert got[name] is not None and torch.count_nonzero(got[name]) > 0, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def test_reentrant_without_input_grads_is_the_trap(peft_tiny_model):
    """Show the test above would catch the pitfall: reentrant checkpointing minus our fix loses grads."""
    pm = _setup(peft_tiny_model, False)
    model = pm.get_base_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()  # transformers 5 adds this hook itself; remove it to expose the trap
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    pm.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that no input requires grad
        loss = pm(input_ids=ids, labels=ids).loss
    lora_grads = []
    try:
        loss.backward()
        lora_grads = [p.grad for n, p in pm.named_parameters() if "layers" in n and "lora_" in n]
    except RuntimeError as e:  # "element 0 of tensors does not require grad"
        assert "does not require grad" in str(e)
    assert all(g is None for g in lora_grads)


def test_false_turns_checkpointing_off_and_bad_modes(peft_tiny_model):
    model = peft_tiny_model()
    apply_gradient_checkpointing(model, True)
    assert model.is_gradient_checkpointing
    apply_gradient_checkpointing(model, False)
    assert not model.is_gradient_checkpointing
    for bad in ("offload", 1, "True"):
        with pytest.raises(
            ValueError, match=r"use_gradient_checkpointing must be one of \[False, True, 'unsloth'\]"
        ):
            validate_mode(bad)


def test_unload_restores_checkpointing_state(peft_tiny_model):
    base = peft_tiny_model()
    ref = copy.deepcopy(base)
    pm = get_peft_model(base, use_gradient_checkpointing=True)
    assert base.is_gradient_checkpointing
    pm.unload()
    assert base.is_gradient_checkpointing == ref.is_gradient_checkpointing
