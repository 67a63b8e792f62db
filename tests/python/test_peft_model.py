"""PeftModel: pass-through, loss, generate, counting, save/load, merge/unload, disable_adapter, Trainer."""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from rslora_fast import PeftModel, get_peft_model
from rslora_fast.peft import LoraLinear


def _gpm(model, **kw):
    kw.setdefault("use_gradient_checkpointing", False)
    return get_peft_model(model, **kw)


def _randomize_adapters(pm, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _n, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _ids(seed=0, shape=(2, 8)):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def test_pass_through_loss_generate(peft_tiny_model):
    base = peft_tiny_model()
    ref = copy.deepcopy(base)
    pm = _gpm(base)
    assert pm.config is base.config
    assert pm.get_base_model() is base and pm.base_model.model is base
    assert pm.main_input_name == "input_ids"
    assert "labels" in inspect.signature(pm.forward).parameters
    ids = _ids()
    out = pm(input_ids=ids, labels=ids)
    logits = ref(input_ids=ids).logits  # B == 0 -> same as the base model
    torch.testing.assert_close(out.logits, logits)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want)
    gen = pm.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 7)
    pm.gradient_checkpointing_enable()
    assert base.is_gradient_checkpointing


def test_lora_changes_logits_by_the_formula(peft_tiny_model):
    base = peft_tiny_model()
    ref = copy.deepcopy(base)
    pm = _gpm(base, target_modules=["lm_head_never", "down_proj"][1:], r=4, lora_alpha=8)
    _randomize_adapters(pm)
    # rebuild the expected model by hand: W_down += (alpha/r) B @ A
    with torch.no_grad():
        for name, layer in pm.get_base_model().named_modules():
            if isinstance(layer, LoraLinear):
                w = ref.get_submodule(name).weight
                w += 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    ids = _ids()
    torch.testing.assert_close(pm(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_print_line_and_counts(peft_tiny_model, capsys):
    pm = _gpm(peft_tiny_model(), r=8)
    base_total = sum(p.numel() for p in peft_tiny_model().parameters())
    lora = sum(8 * (m.in_features + m.out_features) for m in pm.modules() if isinstance(m, LoraLinear))
    assert pm.get_nb_trainable_parameters() == (lora, base_total + lora)
    pm.print_trainable_parameters()
    t, a = lora, base_total + lora
    assert (
        capsys.readouterr().out
        == f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}\n"
    )


class _Fake4bit(nn.Module):
    """Duck-typed packed 4-bit linear: weight holds ceil(in*out/2) uint8 bytes."""

    is_4bit_linear = True

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.dense = lin.weight.detach().clone()
        self.weight = nn.Parameter(
            torch.zeros((lin.in_features * lin.out_features + 1) // 2, 1, dtype=torch.uint8),
            requires_grad=False,
        )
        self.requantized = 0

    def forward(self, x):
        return F.linear(x, self.dense.to(x.dtype))

    def dequantize(self):
        return self.dense.clone()

    def requantize_(self, dense):
        self.dense = dense.clone()
        self.requantized += 1


def test_4bit_duck_typing_counts_and_merge(peft_tiny_model):
    model = peft_tiny_model()
    dense_total = sum(p.numel() for p in model.parameters())
    for name, m in list(model.named_modules()):
        if name.endswith("q_proj"):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            parent.q_proj = _Fake4bit(m)
    pm = _gpm(model, target_modules=["q_proj"], r=2)
    t, a = pm.get_nb_trainable_parameters()
    assert t == 2 * 2 * (32 + 32) and a == dense_total + t
    _randomize_adapters(pm)
    ids = _ids()
    before = pm(input_ids=ids).logits
    merged = pm.merge_and_unload()
    assert all(isinstance(merged.model.layers[i].self_attn.q_proj, _Fake4bit) for i in range(2))
    assert merged.model.layers[0].self_attn.q_proj.requantized == 1
    torch.testing.assert_close(merged(input_ids=ids).logits, before, rtol=1e-4, atol=1e-5)


def test_disable_adapter_merge_and_unload(peft_tiny_model):
    base = peft_tiny_model()
    ref = copy.deepcopy(base)
    ref_state = {k: v.clone() for k, v in base.state_dict().items()}
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    pm = _gpm(base, modules_to_save=["lm_head"])
    _randomize_adapters(pm)
    ids = _ids()
    with_lora = pm(input_ids=ids).logits
    base_logits = ref(input_ids=ids).logits
    assert not torch.allclose(with_lora, base_logits)
    with pm.disable_adapter():
        torch.testing.assert_close(pm(input_ids=ids).logits, base_logits)
    torch.testing.assert_close(pm(input_ids=ids).logits, with_lora)

    pm2 = _gpm(copy.deepcopy(ref), modules_to_save=["lm_head"])
    pm2.load_state_dict(pm.state_dict())
    merged = pm2.merge_and_unload()
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert type(merged.lm_head) is nn.Linear
    torch.testing.assert_close(merged(input_ids=ids).logits, with_lora, rtol=1e-4, atol=1e-5)

    restored = pm.unload()
    assert restored is base
    assert [type(m) for m in restored.modules()] == [type(m) for m in ref.modules()]
    state = restored.state_dict()
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)
    assert {n: p.requires_grad for n, p in restored.named_parameters()} == flags
    torch.testing.assert_close(restored(input_ids=ids).logits, base_logits)


def test_save_and_load_roundtrip(peft_tiny_model, tmp_path):
    pm = _gpm(peft_tiny_model("qwen2"), r=4, bias="lora_only", modules_to_save=["lm_head"])
    _randomize_adapters(pm)
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["inference_mode"] is True and cfg["r"] == 4 and cfg["modules_to_save"] == ["lm_head"]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in keys
    assert "base_model.model.lm_head.weight" in keys
    assert len(keys) == 2 * 7 * 2 + 2 * 3 + 1
    ids = _ids()
    want = pm(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(peft_tiny_model("qwen2"), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    torch.testing.assert_close(loaded(input_ids=ids).logits, want)
    trainable = PeftModel.from_pretrained(peft_tiny_model("qwen2"), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    # load_adapter replaces the weights of an existing adapter
    other = _gpm(peft_tiny_model("qwen2"), r=4, bias="lora_only", modules_to_save=["lm_head"])
    other.load_adapter(tmp_path)
    torch.testing.assert_close(other(input_ids=ids).logits, want)


def test_existing_adapters(peft_tiny_model):
    pm = _gpm(peft_tiny_model(), r=8)
    with pytest.warns(UserWarning, match="already has LoRA adapters with these settings"):
        assert get_peft_model(pm, r=8, use_gradient_checkpointing=False) is pm
    with pytest.raises(ValueError, match=r"different settings.*'r'"):
        get_peft_model(pm, r=4, use_gradient_checkpointing=False)


def test_hf_trainer_trains_it(peft_tiny_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    pm = get_peft_model(peft_tiny_model(), r=8, lora_alpha=16, use_gradient_checkpointing=True)
    seq = [list(range(i, i + 16)) for i in range(0, 64, 4)]  # learnable: next token = +1
    ds = [{"input_ids": torch.tensor(s), "labels": torch.tensor(s)} for s in seq]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=25,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=pm, args=args, train_dataset=ds)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 25
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.25  # ln(128) = 4.85 at the start
    assert all(not p.requires_grad for n, p in pm.named_parameters() if "lora_" not in n)
