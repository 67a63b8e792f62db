"""Unsloth-era trainer keywords mapped onto the installed TRL, and the names Unsloth scripts import.

Tiny llama with the demo tokenizer on CPU. The expectations come from TRL's own config classes
(what a current-API call would have built), not from the mapping table under test.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

import rslora_fast  # noqa: F401  (installs the post-import hook)

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

TEXTS = ["the cat sat on the mat.", "a dog ran in the field.", "rain fell all night.", "she wrote a letter."]


@pytest.fixture(scope="module")
def tiny():
    from rslora_fast.demo import build_demo_tokenizer

    tok = build_demo_tokenizer()
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg), tok


def _training_args(tmp_path, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", use_cpu=True, report_to="none", seed=3, disable_tqdm=True, **kw,
    )  # fmt: skip


def test_sft_trainer_as_notebooks_call_it(tiny, tmp_path, caplog):
    """The Llama 3.1 Alpaca notebook's call: tokenizer=, data options as keywords, TrainingArguments."""
    model, tok = tiny
    data = datasets.Dataset.from_list([{"text": t} for t in TEXTS * 2])
    with caplog.at_level(logging.INFO, logger="rslora_fast.trl_compat"):
        trainer = trl.SFTTrainer(
            model=model, tokenizer=tok, train_dataset=data, dataset_text_field="text",
            max_seq_length=24, dataset_num_proc=1, packing=False,
            args=_training_args(tmp_path, gradient_accumulation_steps=1, warmup_steps=0),
        )  # fmt: skip
    assert isinstance(trainer.args, trl.SFTConfig)
    assert trainer.args.max_length == 24
    assert trainer.args.dataset_text_field == "text"
    assert trainer.args.packing is False
    assert trainer.args.learning_rate == 1e-3 and trainer.args.max_steps == 1  # TrainingArguments kept
    assert trainer.processing_class is tok
    assert "max_seq_length -> SFTConfig.max_length" in caplog.text
    assert "tokenizer -> processing_class" in caplog.text
    trainer.train()
    assert trainer.state.global_step == 1


def test_sft_current_api_reaches_trl_unchanged(tiny, tmp_path, caplog):
    model, tok = tiny
    data = datasets.Dataset.from_list([{"text": t} for t in TEXTS])
    args = trl.SFTConfig(output_dir=str(tmp_path), max_length=16, use_cpu=True, report_to=[], max_steps=1)
    with caplog.at_level(logging.INFO, logger="rslora_fast.trl_compat"):
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    assert trainer.args is args  # not copied or converted
    assert "mapped" not in caplog.text


def test_sft_mapping_is_logged_once(tiny, tmp_path, caplog):
    model, tok = tiny
    data = datasets.Dataset.from_list([{"text": t} for t in TEXTS])
    with caplog.at_level(logging.INFO, logger="rslora_fast.trl_compat"):
        for _ in range(2):
            trl.SFTTrainer(
                model=model, tokenizer=tok, train_dataset=data, dataset_text_field="text",
                max_seq_length=20, args=_training_args(tmp_path),
            )  # fmt: skip
    # Another test may already have logged this combination; at most once either way.
    assert caplog.text.count("mapped SFTTrainer arguments") <= 1


def test_tokenizer_and_processing_class_together_is_an_error(tiny, tmp_path):
    model, tok = tiny
    data = datasets.Dataset.from_list([{"text": t} for t in TEXTS])
    with pytest.raises(TypeError, match="not both"):
        trl.SFTTrainer(model=model, tokenizer=tok, processing_class=tok, train_dataset=data,
                       args=_training_args(tmp_path))  # fmt: skip


def test_unknown_keyword_still_raises_trls_type_error(tiny, tmp_path):
    model, tok = tiny
    data = datasets.Dataset.from_list([{"text": t} for t in TEXTS])
    with pytest.raises(TypeError, match="no_such_option"):
        trl.SFTTrainer(model=model, processing_class=tok, train_dataset=data, no_such_option=1,
                       args=_training_args(tmp_path))  # fmt: skip


def test_dpo_trainer_as_the_zephyr_notebook_calls_it(tiny, tmp_path, caplog):
    # Without a PEFT model, DPOTrainer builds its reference model from the model's path: save it.
    model, tok = tiny
    model.save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    rows = [{"prompt": "q: " + t, "chosen": " yes.", "rejected": " no."} for t in TEXTS]
    data = datasets.Dataset.from_list(rows)
    with caplog.at_level(logging.INFO, logger="rslora_fast.trl_compat"):
        trainer = trl.DPOTrainer(
            model=model, ref_model=None, args=_training_args(tmp_path), beta=0.25,
            train_dataset=data, tokenizer=tok, max_length=32, max_prompt_length=16,
        )  # fmt: skip
    assert isinstance(trainer.args, trl.DPOConfig)
    assert trainer.args.beta == 0.25 and trainer.args.max_length == 32
    assert "max_prompt_length ignored" in caplog.text
    trainer.train()
    assert trainer.state.global_step == 1


def test_hook_patches_trl_loaded_after_and_before_rslora_fast():
    check = (
        "import sys; {first}; {second}; from trl import SFTTrainer, DPOTrainer; "
        "assert getattr(SFTTrainer.__init__, '__rslora_compat__', False); "
        "assert getattr(DPOTrainer.__init__, '__rslora_compat__', False)"
    )
    for first, second in [
        ("import rslora_fast", "import trl"),
        ("from trl import SFTTrainer", "import rslora_fast"),
    ]:
        code = check.format(first=first, second=second)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_opt_out_leaves_trl_alone():
    code = (
        "import os; os.environ['RSLORA_FAST_NO_TRL_COMPAT'] = '1'; import rslora_fast; "
        "from trl import SFTTrainer; assert not hasattr(SFTTrainer.__init__, '__rslora_compat__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_unsloth_names_exist_and_behave(monkeypatch):
    from rslora_fast import PatchDPOTrainer, PatchFastRL, is_bfloat16_supported

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert is_bfloat16_supported() is True  # CPU computes bf16 natively
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = {}

    def fake_bf16(including_emulation=True):
        seen["emulation"] = including_emulation
        return False

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake_bf16)
    assert is_bfloat16_supported() is False and seen["emulation"] is False
    assert PatchDPOTrainer() is None
    assert PatchFastRL("GRPO", None) is None
    from trl import DPOTrainer

    assert getattr(DPOTrainer.__init__, "__rslora_compat__", False)


def test_warmup_ratio_means_a_fractional_warmup_steps(tmp_path):
    """transformers 5 dropped ``warmup_ratio``; ``warmup_steps`` in [0, 1) is the same ratio."""
    for cls in (transformers.TrainingArguments, trl.SFTConfig, trl.DPOConfig):
        args = cls(output_dir=str(tmp_path), warmup_ratio=0.1, use_cpu=True, report_to="none")
        assert args.warmup_steps == 0.1, cls.__name__
    kept = transformers.TrainingArguments(output_dir=str(tmp_path), warmup_steps=5, warmup_ratio=0.1)
    assert kept.warmup_steps == 5
