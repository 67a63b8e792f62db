"""HF ``Trainer`` and TRL trainers on the model ``get_peft_model`` returned, unchanged (4-bit base, CPU).

Checkpoints must hold the adapter in PEFT format plus the trainer state, never the 4-bit base;
resuming must reach the weights of an uninterrupted run; HF peft must load a checkpoint's adapter.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file

from rslora_fast import PeftModel, get_peft_model
from rslora_fast.finetune import PadCollator
from rslora_fast.loading import from_pretrained

peft = pytest.importorskip("peft")
SENTENCES = [
    "the cat sat on the mat and looked at the door.",
    "a small dog ran across the green field to play.",
    "rain fell on the old roof all through the night.",
    "she wrote a short letter to her brother in town.",
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from rslora_fast.demo import build_demo_tokenizer

    folder = tmp_path_factory.mktemp("trainer_peft_base")
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


def _peft_4bit(path, checkpointing=True):
    model, tok = from_pretrained(
        path, load_in_4bit=True, dtype=torch.float32, device_map="cpu", progress=False, max_seq_length=64
    )
    return get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=checkpointing), tok


def _rows(tok, n=24):
    ids = [tok(s, add_special_tokens=False)["input_ids"] for s in SENTENCES]
    return [{"input_ids": ids[i % len(ids)]} for i in range(n)]


def _args(out, max_steps, save_steps):
    return transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, lr_scheduler_type="linear",
        max_steps=max_steps, logging_steps=1, save_steps=save_steps, seed=11, data_seed=11, use_cpu=True,
        report_to=[], remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
        gradient_checkpointing=True,
    )  # fmt: skip


def _lora(pm):
    return {k: v.detach().clone() for k, v in pm.named_parameters() if "lora_" in k}


def test_trainers_recognise_our_peft_model(base_dir):
    from accelerate.utils import is_peft_model
    from transformers.trainer_utils import _is_peft_model

    pm, _ = _peft_4bit(base_dir)
    assert isinstance(pm, PeftModel) and isinstance(pm, peft.PeftModel)
    assert _is_peft_model(pm) and is_peft_model(pm)
    assert pm.active_adapters == ["default"] and pm.get_base_model() is pm.base_model.model


def test_hf_trainer_checkpoints_hold_the_adapter_and_resume_exactly(base_dir, tmp_path):
    pm, tok = _peft_4bit(base_dir)
    collate = PadCollator(tok.pad_token_id)
    full = transformers.Trainer(
        model=pm, args=_args(tmp_path / "a", 6, 3), train_dataset=_rows(tok), data_collator=collate
    )
    full.train()
    want = _lora(pm)

    ckpt = tmp_path / "a" / "checkpoint-3"
    files = {p.name for p in ckpt.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainer_state.json",
        "optimizer.pt",
        "scheduler.pt",
    } <= files
    assert not [f for f in files if f.startswith("model")]  # never the 4-bit base
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    final = load_file(str(tmp_path / "a" / "checkpoint-6" / "adapter_model.safetensors"))
    assert all(torch.equal(final[k], want[k]) for k in final)

    pm2, tok2 = _peft_4bit(base_dir)
    resumed = transformers.Trainer(
        model=pm2, args=_args(tmp_path / "b", 6, 3), train_dataset=_rows(tok2), data_collator=collate
    )
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 6
    got = _lora(pm2)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)

    # HF peft loads the checkpoint's adapter onto the dense base, with the same weights
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir))
    hf = peft.PeftModel.from_pretrained(dense, str(ckpt))
    q = hf.base_model.model.model.layers[1].self_attn.q_proj
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    assert torch.equal(q.lora_A["default"].weight, saved[key])


def test_sft_trainer_trains_and_checkpoints_the_adapter(base_dir, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    pm, tok = _peft_4bit(base_dir)
    data = datasets.Dataset.from_list([{"text": SENTENCES[i % 4]} for i in range(16)])
    args = trl.SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=2, save_steps=2,
        logging_steps=1, use_cpu=True, report_to=[], max_length=32, seed=5, disable_tqdm=True,
    )  # fmt: skip
    before = _lora(pm)
    trl.SFTTrainer(model=pm, args=args, train_dataset=data, processing_class=tok).train()
    after = _lora(pm)
    assert all(not torch.equal(before[k].float(), after[k].float()) for k in after if "lora_A" in k)
    saved = load_file(str(tmp_path / "checkpoint-2" / "adapter_model.safetensors"))
    assert saved.keys() == after.keys()
    assert not list((tmp_path / "checkpoint-2").glob("model*.safetensors"))


def test_dpo_trainer_reference_is_the_adapter_before_training(base_dir, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    pm, tok = _peft_4bit(base_dir)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a "pretrained" adapter, so the reference differs from the base model
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    start = _lora(pm)
    pref = [{"prompt": "the cat", "chosen": " sat on the mat.", "rejected": " ran across the field."}] * 8
    args = trl.DPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=1e-2, max_steps=2, save_steps=2,
        use_cpu=True, report_to=[], disable_tqdm=True, max_length=32,
    )  # fmt: skip
    trl.DPOTrainer(
        model=pm, args=args, train_dataset=datasets.Dataset.from_list(pref), processing_class=tok
    ).train()
    assert pm.active_adapter == "default" and "ref" in pm.peft_config
    trained = _lora(pm)
    # TRL casts the trainable weights of a 4-bit model to bf16 (as with HF peft): compare in that dtype
    assert any(not torch.equal(trained[k], start[k].to(trained[k].dtype)) for k in start)
    pm.set_adapter("ref")
    assert all(torch.equal(v, start[k].to(v.dtype)) for k, v in _lora(pm).items())
    pm.set_adapter("default")
    assert all(torch.equal(v, trained[k]) for k, v in _lora(pm).items())
    saved = load_file(str(tmp_path / "checkpoint-2" / "adapter_model.safetensors"))
    assert all(torch.equal(saved[k], trained[k]) for k in saved)


def test_grpo_trainer_runs_a_step(base_dir, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    pm, tok = _peft_4bit(base_dir)
    args = trl.GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, max_steps=1,
        use_cpu=True, report_to=[], max_completion_length=4, disable_tqdm=True, save_strategy="no",
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=pm, reward_funcs=lambda completions, **_: [float(len(c)) for c in completions], args=args,
        train_dataset=datasets.Dataset.from_list([{"prompt": "the cat"}] * 4), processing_class=tok,
    )  # fmt: skip
    assert trainer.model is pm
    trainer.train()
    assert trainer.state.global_step == 1


def test_without_peft_the_class_is_ours_alone_and_trainer_users_are_told(base_dir, monkeypatch):
    import transformers.trainer  # noqa: F401  (a script about to train has imported it)

    import rslora_fast.peft.model as pmod

    monkeypatch.setattr(pmod, "_VISIBLE", {})
    monkeypatch.setattr(pmod, "_hf_peft_class", lambda: None)
    with pytest.warns(UserWarning, match=r"rslora-fast\[trainers\]"):
        pm, _ = _peft_4bit(base_dir)
    assert type(pm) is PeftModel and not isinstance(pm, peft.PeftModel)


def test_importing_peft_holds_bitsandbytes_warnings(monkeypatch):
    # peft imports bitsandbytes when installed, whose import warns about its optional CPU kernels
    # (`pip install kernels`): noise the user did not ask for. A stand-in peft records the
    # effective level of a bitsandbytes logger while it is imported.
    import importlib.abc
    import importlib.machinery
    import logging
    import sys

    import rslora_fast.peft.model as pmod

    seen = {}

    class StandInPeft(importlib.abc.Loader):
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            seen["level"] = logging.getLogger("bitsandbytes.backends.cpu.ops").getEffectiveLevel()
            module.PeftModel = type("PeftModel", (), {})

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            return importlib.machinery.ModuleSpec("peft", StandInPeft()) if name == "peft" else None

    monkeypatch.delitem(sys.modules, "peft", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    bnb_log = logging.getLogger("bitsandbytes")
    before = bnb_log.level
    cls = pmod._hf_peft_class()
    assert cls is sys.modules["peft"].PeftModel
    assert seen["level"] >= logging.ERROR  # held while peft (and so bitsandbytes) imports
    assert bnb_log.level == before  # and given back
