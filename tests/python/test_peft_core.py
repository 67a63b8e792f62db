"""get_peft_model: signature, LoRA math, init, seeding, target matching, errors (checked against plain torch)."""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rslora_fast
from rslora_fast import FastLanguageModel, FastModel, LoraConfig, get_peft_model
from rslora_fast.peft import LoraLinear

SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _gpm(model, **kw):
    kw.setdefault("use_gradient_checkpointing", False)
    return get_peft_model(model, **kw)


def _lora_layers(pm):
    return {n: m for n, m in pm.get_base_model().named_modules() if isinstance(m, LoraLinear)}


# ---------------------------------------------------------------------- signature
def test_signature_and_static_methods():
    expected = [
        ("model", inspect.Parameter.empty),
        ("r", 16),
        ("target_modules", SEED_TARGETS),
        ("lora_alpha", 16),
        ("lora_dropout", 0),
        ("bias", "none"),
        ("use_gradient_checkpointing", "unsloth"),
        ("random_state", 3407),
        ("max_seq_length", 2048),
        ("use_rslora", False),
        ("loftq_config", None),
    ]
    for fn in (rslora_fast.get_peft_model, FastLanguageModel.get_peft_model, FastModel.get_peft_model):
        params = list(inspect.signature(fn).parameters.values())
        assert [(p.name, p.default) for p in params[:-1]] == expected
        assert params[-1].kind is inspect.Parameter.VAR_KEYWORD
    assert isinstance(inspect.getattr_static(FastLanguageModel, "get_peft_model"), staticmethod)


# ---------------------------------------------------------------------- layer math
def _manual(x, base, a, b, scaling):
    return F.linear(x, base.weight, base.bias) + (x @ a.T @ b.T) * scaling


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_linear_forward_matches_formula(use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=True)
    layer = LoraLinear(base, r=4, lora_alpha=8, use_rslora=use_rslora)
    a, b = torch.randn(4, 12), torch.randn(10, 4)
    layer.set_adapter_weights(a, b)
    scaling = 8 / math.sqrt(4) if use_rslora else 8 / 4
    assert layer.scaling == scaling
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(layer(x), _manual(x, base, a, b, scaling))
    layer.disabled = True
    torch.testing.assert_close(layer(x), F.linear(x, base.weight, base.bias))


def test_bf16_base_float32_adapters_bf16_matmuls():
    torch.manual_seed(0)
    base = nn.Linear(16, 8, bias=False).to(torch.bfloat16)
    layer = LoraLinear(base, r=4, lora_alpha=4)
    a, b = torch.randn(4, 16), torch.randn(8, 4)
    layer.set_adapter_weights(a, b)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    # bf16 operands (the adapters cast to the activation dtype), accumulated in fp32, rounded once
    xd, wd, ad, bd = (t.bfloat16().double() for t in (x, base.weight, a, b))
    down = (xd @ ad.t()).bfloat16().double()  # the A product is a bf16 matmul output
    want = xd @ wd.t() + down @ bd.t() * 1.0
    torch.testing.assert_close(y.double(), want, rtol=1e-2, atol=1e-2)
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32


def test_zero_dropout_runs_no_dropout_code(monkeypatch, peft_tiny_model):
    pm = _gpm(peft_tiny_model(), lora_dropout=0)
    pm.train()

    def boom(*a, **k):
        raise AssertionError("dropout code ran")

    monkeypatch.setattr(F, "dropout", boom)
    monkeypatch.setattr(nn.Dropout, "forward", boom)
    monkeypatch.setattr(nn.Identity, "forward", boom)
    for layer in _lora_layers(pm).values():
        layer(torch.randn(2, layer.in_features))
    # and the dropout path is real when asked for
    pm2 = _gpm(peft_tiny_model(), lora_dropout=0.1)
    pm2.train()
    layer = next(iter(_lora_layers(pm2).values()))
    with pytest.raises(AssertionError, match="dropout code ran"):
        layer(torch.randn(2, layer.in_features))


# ---------------------------------------------------------------------- init and seeding
def test_default_init_distribution(peft_tiny_model):
    pm = _gpm(peft_tiny_model(), r=8)
    layers = _lora_layers(pm)
    assert len(layers) == 2 * 7
    for layer in layers.values():
        bound = 1 / math.sqrt(layer.in_features)
        a = layer.lora_A.weight
        assert a.shape == (8, layer.in_features) and a.dtype == torch.float32
        assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
        assert torch.count_nonzero(layer.lora_B.weight) == 0
        assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
        assert not layer.base_layer.weight.requires_grad


def test_gaussian_and_false_init(peft_tiny_model):
    pm = _gpm(peft_tiny_model(), r=4, target_modules=["down_proj"], init_lora_weights="gaussian")
    a = torch.cat([m.lora_A.weight.flatten() for m in _lora_layers(pm).values()])
    assert abs(a.std().item() - 1 / 4) < 0.03
    assert all(torch.count_nonzero(m.lora_B.weight) == 0 for m in _lora_layers(pm).values())
    pm = _gpm(peft_tiny_model(), r=4, init_lora_weights=False)
    for m in _lora_layers(pm).values():
        assert torch.count_nonzero(m.lora_B.weight) > 0  # not a no-op
        assert m.lora_B.weight.abs().max() <= 1 / math.sqrt(4)


def _adapter_tensors(pm):
    return [t.detach().clone() for n, t in pm.named_parameters() if "lora_" in n]


def test_random_state_reproducible_and_global_rng_untouched(peft_tiny_model):
    m1, m2, m3 = peft_tiny_model(), peft_tiny_model(), peft_tiny_model()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    p1 = _gpm(m1, random_state=7)
    assert torch.equal(torch.get_rng_state(), state), "get_peft_model changed the global RNG state"
    p2 = _gpm(m2, random_state=7)
    p3 = _gpm(m3, random_state=8)
    for x, y in zip(_adapter_tensors(p1), _adapter_tensors(p2)):
        assert torch.equal(x, y)
    a1 = [t for n, t in p1.named_parameters() if "lora_A" in n]
    a3 = [t for n, t in p3.named_parameters() if "lora_A" in n]
    assert all(not torch.equal(x, y) for x, y in zip(a1, a3))


# ---------------------------------------------------------------------- target matching
def test_target_list_regex_all_linear(peft_tiny_model):
    pm = _gpm(peft_tiny_model(), target_modules=["q_proj", "v_proj"])
    assert sorted(_lora_layers(pm)) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    pm = _gpm(peft_tiny_model(), target_modules=r".*\.1\.mlp\.(gate|up)_proj")
    assert sorted(_lora_layers(pm)) == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    model = peft_tiny_model()
    linear = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    pm = _gpm(model, target_modules="all-linear")
    assert sorted(_lora_layers(pm)) == linear
    assert "lm_head" not in _lora_layers(pm)


def test_exclude_layers_to_transform_and_patterns(peft_tiny_model):
    pm = _gpm(
        peft_tiny_model(),
        target_modules=["q_proj", "k_proj"],
        exclude_modules=["model.layers.0.self_attn.k_proj"],
    )
    assert "model.layers.0.self_attn.k_proj" not in _lora_layers(pm)
    assert len(_lora_layers(pm)) == 3
    pm = _gpm(
        peft_tiny_model(),
        target_modules=["q_proj", "down_proj"],
        layers_to_transform=[1],
        layers_pattern="layers",
    )
    assert sorted(_lora_layers(pm)) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    pm = _gpm(
        peft_tiny_model(),
        r=4,
        lora_alpha=8,
        rank_pattern={"down_proj": 2, r"layers\.0\.self_attn\.q_proj": 6},
        alpha_pattern={"q_proj": 3},
    )
    layers = _lora_layers(pm)
    assert layers["model.layers.1.mlp.down_proj"].r == 2
    assert layers["model.layers.0.self_attn.q_proj"].r == 6
    assert layers["model.layers.1.self_attn.q_proj"].r == 4
    assert layers["model.layers.1.self_attn.q_proj"].scaling == 3 / 4
    assert layers["model.layers.0.self_attn.k_proj"].scaling == 8 / 4


def test_bias_modes_trainable_flags(peft_tiny_model):
    def flags(pm):
        return {n for n, p in pm.named_parameters() if p.requires_grad and "lora_" not in n}

    model = peft_tiny_model("qwen2")  # q/k/v carry biases
    assert flags(_gpm(model, bias="none")) == set()
    names = flags(_gpm(peft_tiny_model("qwen2"), bias="lora_only", target_modules=["q_proj", "o_proj"]))
    assert names == {f"base_model.model.model.layers.{i}.self_attn.q_proj.base_layer.bias" for i in range(2)}
    names = flags(_gpm(peft_tiny_model("qwen2"), bias="all", target_modules=["q_proj"]))
    assert {n.split("layers.")[1] for n in names} == {
        f"{i}.self_attn.{p}"
        for i in range(2)
        for p in ("q_proj.base_layer.bias", "k_proj.bias", "v_proj.bias")
    }


def test_embed_and_lm_head_targets_train_in_full(peft_tiny_model):
    pm = _gpm(peft_tiny_model(), target_modules=["q_proj", "lm_head", "embed_tokens"])
    assert sorted(pm.peft_config["default"].modules_to_save) == ["embed_tokens", "lm_head"]
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {
        "base_model.model.lm_head.modules_to_save.weight",
        "base_model.model.model.embed_tokens.modules_to_save.weight",
    }


# ---------------------------------------------------------------------- config
def test_lora_config_json_roundtrip(tmp_path):
    cfg = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj"], modules_to_save=["lm_head"])
    cfg.save_pretrained(tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    import json

    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True)
    assert data["peft_type"] == "LORA" and data["r"] == 8 and data["use_dora"] is False
    data["some_future_key"] = 1
    back = LoraConfig.from_dict(data)
    assert back == cfg
    with pytest.raises(ValueError, match="use_dora"):
        LoraConfig.from_dict({**data, "use_dora": True})


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"r": 0}, ValueError, r"r must be a positive int, got 0"),
        ({"r": 2.5}, ValueError, r"r must be a positive int, got 2\.5"),
        ({"r": True}, ValueError, r"r must be a positive int, got True"),
        ({"lora_alpha": 0}, ValueError, r"lora_alpha must be a positive number, got 0"),
        ({"lora_alpha": -1}, ValueError, r"lora_alpha .* got -1"),
        ({"lora_dropout": 1.0}, ValueError, r"lora_dropout must be a number in \[0, 1\), got 1\.0"),
        ({"lora_dropout": -0.1}, ValueError, r"lora_dropout .* got -0\.1"),
        ({"bias": "some"}, ValueError, r"bias must be one of \['none', 'all', 'lora_only'\], got 'some'"),
        ({"use_gradient_checkpointing": "fast"}, ValueError, r"\[False, True, 'unsloth'\], got 'fast'"),
        ({"init_lora_weights": "pissa"}, ValueError, r"init_lora_weights must be one of .*'pissa'"),
        ({"bogus": 1}, TypeError, r"unexpected keyword argument\(s\) \['bogus'\].*modules_to_save"),
        ({"layers_to_transform": [5]}, ValueError, r"layers_to_transform=\[5\].*\[5\].*0\.\.1"),
        ({"target_modules": ["nope"]}, ValueError, r"matched no module.*'down_proj'.*'q_proj'"),
        ({"loftq_config": {"loftq_bits": 8}}, ValueError, r"loftq_bits must be 4 .*got 8"),
    ],
)
def test_bad_input_errors(kwargs, exc, pattern, peft_tiny_model):
    kwargs = {"use_gradient_checkpointing": False, **kwargs}
    with pytest.raises(exc, match=pattern):
        get_peft_model(peft_tiny_model(), **kwargs)


def test_non_module_input():
    with pytest.raises(TypeError, match="torch.nn.Module.*got dict"):
        get_peft_model({"not": "a model"})


def test_target_matching_non_linear_is_an_error(peft_tiny_model):
    with pytest.raises(ValueError, match=re.escape("input_layernorm (LlamaRMSNorm)")):
        _gpm(peft_tiny_model(), target_modules=["input_layernorm"])


def test_half_built_wrapper_raises_attribute_error_not_recursion():
    # A wrapper missing the state its delegation reads (half-built, or unpickled from an older
    # layout) must say which attribute is missing, not recurse until the stack runs out.
    from rslora_fast.peft.layer import ModulesToSaveWrapper

    wrapper = ModulesToSaveWrapper(nn.Linear(2, 2))
    del wrapper.disabled
    with pytest.raises(AttributeError, match="disabled|active_module"):
        getattr(wrapper, "anything_missing")  # noqa: B009 - the lookup is what is tested
    assert isinstance(ModulesToSaveWrapper(nn.Linear(2, 2)).weight, nn.Parameter)
