"""HF ``Trainer`` / TRL ``SFTTrainer`` with our PeftModel on a 4-bit base, and inference/training mode.

CPU, tiny llama built from config and saved, loaded back 4-bit by ``rslora_fast.loading``. Nothing in
transformers or TRL is patched; the adapter-only checkpoints come from the finetune CLI's Trainer
subclass (public ``Trainer`` hooks).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rslora_fast import FastLanguageModel, get_peft_model
from rslora_fast.finetune import PadCollator, _make_trainer_class
from rslora_fast.loading import from_pretrained

SENTENCES = [
    "the cat sat on the mat and looked at the door.",
    "a small dog ran across the green field to play.",
    "rain fell on the old roof all through the night.",
    "she wrote a short letter to her brother in town.",
]


@pytest.fixture(scope="module")
def trainer_base_dir(tmp_path_factory):
    """A tiny llama (hidden 64, 2 layers) with the demo tokenizer, saved in float32.

    ``initializer_range=0.2`` (not 0.02) so a rank-8 adapter moves the loss within a few steps.
    """
    import transformers

    from rslora_fast.demo import build_demo_tokenizer

    folder = tmp_path_factory.mktemp("trainer_base")
    tok = build_demo_tokenizer()
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        initializer_range=0.2, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _peft_4bit(path, checkpointing=False, dropout=0.0):
    model, tok = from_pretrained(
        path, load_in_4bit=True, dtype=torch.float32, device_map="cpu", progress=False, max_seq_length=128
    )
    pm = get_peft_model(
        model, r=8, lora_alpha=16, lora_dropout=dropout, use_gradient_checkpointing=checkpointing
    )
    return pm, tok


def _rows(tok, n=32):
    ids = [tok(s, add_special_tokens=False)["input_ids"] for s in SENTENCES]
    return [{"input_ids": ids[i % len(ids)]} for i in range(n)]


def _args(out, max_steps, save_steps=1000, lr=1e-2):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_steps=max_steps,
        logging_steps=1,
        save_steps=save_steps,
        seed=11,
        data_seed=11,
        use_cpu=True,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def _lora_state(pm):
    return {k: v.detach().clone() for k, v in pm.named_parameters() if "lora_" in k}


def test_hf_trainer_4bit_loss_falls_and_saves_peft_adapter(trainer_base_dir, tmp_path):
    pm, tok = _peft_4bit(trainer_base_dir, checkpointing=True)
    assert pm.get_base_model().is_gradient_checkpointing
    trainer = _make_trainer_class()(
        model=pm, args=_args(tmp_path, 12, save_steps=12), train_dataset=_rows(tok),
        data_collator=PadCollator(tok.pad_token_id),
    )  # fmt: skip
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3

    ckpt = tmp_path / "checkpoint-12"
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    keys = load_file(str(ckpt / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert not any("lora" not in k for k in keys)  # adapter only, no frozen base weights
    assert not list(ckpt.glob("model*.safetensors"))
    # the saved adapter is the trained one
    live = _lora_state(pm)
    assert keys.keys() == live.keys()
    for k, v in keys.items():
        assert torch.equal(live[k], v), k


def test_hf_trainer_resume_continues_at_the_right_step(trainer_base_dir, tmp_path):
    cls = _make_trainer_class()
    pm, tok = _peft_4bit(trainer_base_dir)
    full = cls(model=pm, args=_args(tmp_path / "a", 6, save_steps=3), train_dataset=_rows(tok),
               data_collator=PadCollator(tok.pad_token_id))  # fmt: skip
    full.train()
    want = _lora_state(pm)
    want_losses = [h["loss"] for h in full.state.log_history if "loss" in h]

    pm2, tok2 = _peft_4bit(trainer_base_dir)
    resumed = cls(model=pm2, args=_args(tmp_path / "b", 6, save_steps=3), train_dataset=_rows(tok2),
                  data_collator=PadCollator(tok2.pad_token_id))  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    steps = [h["step"] for h in resumed.state.log_history if "loss" in h]
    assert steps[0] == 1 and steps[-1] == 6 and 4 in steps  # history restored, then steps 4..6
    got_losses = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert got_losses == pytest.approx(want_losses, rel=1e-4, abs=1e-5)
    got = _lora_state(pm2)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)


def test_trl_sft_trainer(trainer_base_dir, tmp_path):
    """TRL's SFTTrainer trains the adapters of the transformers model inside our PeftModel.

    TRL (1.x) recognizes only HF PEFT's class as a PEFT model and otherwise patches the model's
    ``forward`` with a fused LM head that calls ``model.base_model`` as the transformer backbone, so
    the transformers model (``get_base_model()``, adapters injected) is what it is given.
    """
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    pm, tok = _peft_4bit(trainer_base_dir)
    data = datasets.Dataset.from_list([{"text": SENTENCES[i % 4]} for i in range(32)])
    args = trl.SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="constant", max_steps=10, logging_steps=1, save_strategy="no",
        use_cpu=True, report_to=[], max_length=32, seed=5, disable_tqdm=True,
    )  # fmt: skip
    before = _lora_state(pm)
    trainer = trl.SFTTrainer(model=pm.get_base_model(), args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    after = _lora_state(pm)
    assert all(not torch.equal(before[k], after[k]) for k in after)  # every adapter matrix trained
    pm.save_pretrained(tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    k = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    assert torch.equal(saved[k], after[k])


def test_for_inference_and_for_training(trainer_base_dir):
    pm, tok = _peft_4bit(trainer_base_dir, checkpointing=True, dropout=0.1)
    inner = pm.get_base_model()
    assert inner.is_gradient_checkpointing
    out = FastLanguageModel.for_inference(pm)
    assert out is pm
    assert not inner.is_gradient_checkpointing
    assert inner.config.use_cache is True
    assert not any(m.training for m in pm.modules())
    FastLanguageModel.for_training(pm)
    assert inner.is_gradient_checkpointing
    assert inner.config.use_cache is False
    drops = [m for m in pm.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.training for m in drops)
    # a training step still gives the adapters gradients after the round trip
    ids = torch.tensor([tok(SENTENCES[0])["input_ids"]])
    pm(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in pm.named_parameters() if "lora_B" in n]  # B = 0, so A gets none yet
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_generate_4bit_lora_with_kv_cache_matches_no_cache(trainer_base_dir):
    pm, tok = _peft_4bit(trainer_base_dir, checkpointing=True)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    FastLanguageModel.for_inference(pm)
    enc = tok(["the cat sat", "rain fell on the old"], return_tensors="pt", padding=True, padding_side="left")
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        cached = pm.generate(**enc, use_cache=True, **kw)
        plain = pm.generate(**enc, use_cache=False, **kw)
        # the cache path really ran: step-by-step logits without a cache agree with the generated tokens
        full = pm(input_ids=cached, attention_mask=torch.ones_like(cached)).logits
    assert cached.shape[1] == enc["input_ids"].shape[1] + 12
    assert torch.equal(cached, plain)
    # row 1 has no padding: its greedy continuation is the argmax of a single full forward
    n0 = enc["input_ids"].shape[1]
    assert torch.equal(full[1, n0 - 1 : -1].argmax(-1), cached[1, n0:])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_4bit_lora_kv_cache_gpu(trainer_base_dir, dtype):
    model, tok = from_pretrained(trainer_base_dir, load_in_4bit=True, dtype=dtype, device_map="cuda:0")
    pm = get_peft_model(model, r=8, random_state=1)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.device))
    FastLanguageModel.for_inference(pm)
    enc = tok(["the cat sat", "rain fell on the old"], return_tensors="pt", padding=True, padding_side="left")
    enc = enc.to("cuda")
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        a = pm.generate(**enc, use_cache=True, **kw)
        b = pm.generate(**enc, use_cache=False, **kw)
    n0 = enc["input_ids"].shape[1]
    # float32: identical; bf16 may flip a near-tie late in the sequence, the first tokens must agree
    keep = a.shape[1] if dtype == torch.float32 else n0 + 4
    assert torch.equal(a[:, :keep], b[:, :keep])
