"""LoftQ initialization: NF4 round trip against a plain reference, error falls with iterations."""

from __future__ import annotations

import pytest
import torch

from rslora_fast import get_peft_model
from rslora_fast.peft.init import _nf4_roundtrip_torch, nf4_roundtrip

NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # fmt: skip


def _reference_nf4(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Nearest NF4 code by brute-force argmin, per block of 64 consecutive elements."""
    flat = w.reshape(-1, blocksize).float()
    absmax = flat.abs().amax(dim=1, keepdim=True)
    idx = ((flat / absmax)[..., None] - NF4).abs().argmin(dim=-1)
    return (NF4[idx] * absmax).reshape(w.shape)


@pytest.mark.parametrize("fn", [_nf4_roundtrip_torch, nf4_roundtrip])
def test_nf4_roundtrip_matches_reference(fn):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fn(w), _reference_nf4(w), rtol=0, atol=1e-6)


def _structured_weight(out_f, in_f, seed):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(out_f, 3, generator=g) @ torch.randn(3, in_f, generator=g)
    return 0.02 * (torch.randn(out_f, in_f, generator=g) + 0.5 * low)


def _loftq_errors(peft_tiny_model, iters, lora_alpha=16, r=4):
    model = peft_tiny_model()
    originals = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            w = _structured_weight(*layer.mlp.down_proj.weight.shape, seed=i)
            layer.mlp.down_proj.weight.copy_(w)
            originals[i] = w
    pm = get_peft_model(
        model,
        r=r,
        lora_alpha=lora_alpha,
        target_modules=["down_proj"],
        use_gradient_checkpointing=False,
        loftq_config={"loftq_bits": 4, "loftq_iter": iters},
    )
    errs, plain = [], []
    for i, layer in enumerate(pm.get_base_model().model.layers):
        lora = layer.mlp.down_proj
        base = lora.base_layer.weight.detach()
        # the base weight is on the NF4 grid of its blocks
        torch.testing.assert_close(_reference_nf4(base), base, rtol=0, atol=1e-6)
        scaling = lora_alpha / r  # != 1: the scaling must be divided out of the factors
        rec = base + scaling * lora.lora_B.weight.detach() @ lora.lora_A.weight.detach()
        errs.append((originals[i] - rec).norm().item())
        plain.append((originals[i] - _reference_nf4(originals[i])).norm().item())
    return sum(errs), sum(plain)


def test_loftq_error_falls_with_iterations_and_beats_nf4(peft_tiny_model):
    e1, plain = _loftq_errors(peft_tiny_model, 1)
    e5, _ = _loftq_errors(peft_tiny_model, 5)
    assert e1 < 0.9 * plain
    assert e5 < e1


def test_init_lora_weights_loftq_alias(peft_tiny_model):
    pm = get_peft_model(
        peft_tiny_model(),
        r=4,
        target_modules=["q_proj"],
        init_lora_weights="loftq",
        use_gradient_checkpointing=False,
    )
    cfg = pm.peft_config["default"]
    assert cfg.loftq_config == {"loftq_bits": 4, "loftq_iter": 1}
    for layer in pm.get_base_model().model.layers:
        assert torch.count_nonzero(layer.self_attn.q_proj.lora_B.weight) > 0
