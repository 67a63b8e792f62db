"""Interop with HF PEFT (test-only dependency): adapter files both ways, trainable-parameter counts."""

from __future__ import annotations

import pytest
import torch

from rslora_fast import PeftModel, get_peft_model

peft = pytest.importorskip("peft")

SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                n += 1
    assert n > 0


def _ids():
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


# our kwargs -> the same adapter in PEFT's LoraConfig terms
CASES = {
    "default": ({}, {}),
    "rslora_alpha": (
        {"r": 4, "lora_alpha": 32, "use_rslora": True},
        {"r": 4, "lora_alpha": 32, "use_rslora": True},
    ),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, {"modules_to_save": ["lm_head"]}),
    "bias_all": ({"bias": "all"}, {"bias": "all"}),
    "bias_lora_only": ({"bias": "lora_only"}, {"bias": "lora_only"}),
    "layers_to_transform": (
        {"layers_to_transform": [1], "layers_pattern": "layers"},
        {"layers_to_transform": [1], "layers_pattern": "layers"},
    ),
    "all_linear": ({"target_modules": "all-linear"}, {"target_modules": "all-linear"}),
    "rank_alpha_pattern": (
        {"r": 4, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 3}},
        {"r": 4, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 3}},
    ),
}


def _peft_config(kw):
    kw = {
        "r": 16,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": SEED_TARGETS,
        "task_type": "CAUSAL_LM",
        **kw,
    }
    return peft.LoraConfig(**kw)


@pytest.mark.parametrize("case", sorted(CASES))
def test_ours_loads_in_peft(case, peft_tiny_model, tmp_path):
    ours_kw, _ = CASES[case]
    pm = get_peft_model(peft_tiny_model("qwen2"), use_gradient_checkpointing=False, **ours_kw)
    _randomize(pm)
    pm.save_pretrained(tmp_path)
    ids = _ids()
    want = pm(input_ids=ids).logits
    theirs = peft.PeftModel.from_pretrained(peft_tiny_model("qwen2"), str(tmp_path))
    base_logits = peft_tiny_model("qwen2")(input_ids=ids).logits
    got = theirs(input_ids=ids).logits
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the adapter really changes the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_loads_in_ours(case, peft_tiny_model, tmp_path):
    _, peft_kw = CASES[case]
    theirs = peft.get_peft_model(peft_tiny_model("qwen2"), _peft_config(peft_kw))
    _randomize(theirs)
    theirs.save_pretrained(str(tmp_path))
    ids = _ids()
    want = theirs(input_ids=ids).logits
    ours = PeftModel.from_pretrained(peft_tiny_model("qwen2"), tmp_path)
    base_logits = peft_tiny_model("qwen2")(input_ids=ids).logits
    got = ours(input_ids=ids).logits
    assert not torch.allclose(got, base_logits, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _family_targets(family):
    return ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if family == "phi3" else SEED_TARGETS


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"])
@pytest.mark.parametrize("variant", ["seed", "all_linear_rslora_bias_all", "modules_to_save"])
def test_counts_equal_peft(family, variant, peft_tiny_model, capsys):
    kw = {"r": 8, "lora_alpha": 16, "target_modules": _family_targets(family)}
    if variant == "all_linear_rslora_bias_all":
        kw.update(target_modules="all-linear", use_rslora=True, bias="all")
    elif variant == "modules_to_save":
        kw.update(modules_to_save=["lm_head"], layers_to_transform=[0])
    theirs = peft.get_peft_model(peft_tiny_model(family), peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    ours = get_peft_model(peft_tiny_model(family), use_gradient_checkpointing=False, **kw)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    theirs.print_trainable_parameters()
    line_theirs = capsys.readouterr().out
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == line_theirs
    names_theirs = sorted(n.replace(".default", "") for n, p in theirs.named_parameters() if p.requires_grad)
    names_ours = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert names_ours == names_theirs
