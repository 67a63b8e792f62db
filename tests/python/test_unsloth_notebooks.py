"""Unsloth's official notebooks, cell by cell, with only the import changed.

Each test makes the calls of one notebook in its order (Llama 3.1 Alpaca, Llama 3.2 Conversational,
Gemma 3, Zephyr DPO), with a tiny model built here and a few rows of local data instead of the Hub,
and step counts cut to one or two. What a cell produces is checked where the notebook relies on it
(the loss, generated text, saved files that load again). Written in our own words from what the
notebooks call; docs/migrating-from-unsloth.md lists what still differs.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytest.importorskip("peft")  # trainers recognise the PeftModel through peft's class
gguf = pytest.importorskip("gguf")

ALPACA = [
    {"instruction": "Give the colour of the sky.", "input": "", "output": "The sky is blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 plus 3 is 5."},
    {"instruction": "Name a fruit.", "input": "", "output": "An apple is a fruit."},
    {"instruction": "Continue the sequence.", "input": "1, 2, 3", "output": "4, 5, 6."},
]
SHAREGPT = [
    {
        "conversations": [
            {"from": "human", "value": r["instruction"] + " " + r["input"]},
            {"from": "gpt", "value": r["output"]},
        ]
    }  # fmt: skip
    for r in ALPACA
]


def _tiny_dir(tmp_path_factory, model_type: str):
    """A tiny checkpoint of ``model_type`` with the demo tokenizer, as a local stand-in for the hub id."""
    from rslora_fast.demo import build_demo_tokenizer

    folder = tmp_path_factory.mktemp(model_type)
    tok = build_demo_tokenizer()
    common = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    if model_type == "gemma3_text":
        cfg = transformers.Gemma3TextConfig(head_dim=16, sliding_window=8, **common)
    else:
        cfg = transformers.LlamaConfig(**common)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _tiny_dir(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    return _tiny_dir(tmp_path_factory, "gemma3_text")


def _notebook_args(out, **kw):
    from rslora_fast import is_bfloat16_supported

    return dict(
        per_device_train_batch_size=2, gradient_accumulation_steps=1, warmup_steps=1, max_steps=2,
        learning_rate=2e-4, fp16=not is_bfloat16_supported(), bf16=is_bfloat16_supported(),
        logging_steps=1, optim="adamw_8bit", weight_decay=0.01, lr_scheduler_type="linear",
        seed=3407, output_dir=str(out), report_to="none", use_cpu=not torch.cuda.is_available(), **kw,
    )  # fmt: skip


def _generate_with_streamer(model, tokenizer, inputs, capsys):
    from transformers import TextStreamer

    streamer = TextStreamer(tokenizer)
    out = model.generate(**inputs, streamer=streamer, max_new_tokens=6)
    printed = capsys.readouterr().out
    assert out.shape[1] > inputs["input_ids"].shape[1] and printed.strip()


def test_llama_31_alpaca_notebook(llama_dir, tmp_path, capsys):
    from rslora_fast import FastLanguageModel

    max_seq_length, dtype, load_in_4bit = 128, None, True
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=llama_dir, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit
    )
    model = FastLanguageModel.get_peft_model(
        model, r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth", random_state=3407,
        use_rslora=False, loftq_config=None,
    )  # fmt: skip
    prompt = "Below is an instruction.\n\n### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n{}"
    eos = tokenizer.eos_token

    def formatting_prompts_func(examples):
        rows = zip(examples["instruction"], examples["input"], examples["output"])
        return {"text": [prompt.format(i, x, o) + eos for i, x, o in rows]}

    dataset = datasets.Dataset.from_list(ALPACA).map(formatting_prompts_func, batched=True)
    from transformers import TrainingArguments
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model, tokenizer=tokenizer, train_dataset=dataset, dataset_text_field="text",
        max_seq_length=max_seq_length, dataset_num_proc=1, packing=False,
        args=TrainingArguments(**_notebook_args(tmp_path / "outputs")),
    )  # fmt: skip
    stats = trainer.train()
    assert stats.global_step == 2 and torch.isfinite(torch.tensor(stats.training_loss))

    FastLanguageModel.for_inference(model)
    inputs = tokenizer([prompt.format("Continue the sequence.", "1, 2, 3", "")], return_tensors="pt").to(
        model.device
    )
    outputs = model.generate(**inputs, max_new_tokens=8, use_cache=True)
    assert len(tokenizer.batch_decode(outputs)) == 1
    _generate_with_streamer(model, tokenizer, inputs, capsys)

    model.save_pretrained(tmp_path / "lora_model")
    tokenizer.save_pretrained(tmp_path / "lora_model")
    reloaded, tok2 = FastLanguageModel.from_pretrained(
        model_name=str(tmp_path / "lora_model"), max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=True
    )
    FastLanguageModel.for_inference(reloaded)
    with torch.no_grad():  # bf16=True trained the adapter in bf16; the reload computes it in float32
        torch.testing.assert_close(
            reloaded(**inputs).logits.float(), model(**inputs).logits.float(), atol=1e-2, rtol=1e-2
        )

    for method in ("merged_16bit", "merged_4bit", "lora"):
        model.save_pretrained_merged(str(tmp_path / method), tokenizer, save_method=method)
    for method in ("merged_16bit", "merged_4bit"):
        again, _ = FastLanguageModel.from_pretrained(str(tmp_path / method), load_in_4bit=False)
        assert again(**inputs.to(again.device)).logits.shape == (
            1,
            inputs["input_ids"].shape[1],
            len(tokenizer),
        )
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    q8 = model.save_pretrained_gguf(str(tmp_path / "gguf"), tokenizer)
    f16 = model.save_pretrained_gguf(str(tmp_path / "gguf"), tokenizer, quantization_method="f16")
    assert q8.name == "model-q8_0.gguf" and f16.name == "model-f16.gguf"
    with pytest.raises(ValueError, match="q4_k_m"):  # k-quants need llama.cpp's quantizer
        model.save_pretrained_gguf(str(tmp_path / "gguf"), tokenizer, quantization_method="q4_k_m")


def test_llama_32_conversational_notebook(llama_dir, tmp_path):
    from rslora_fast import FastLanguageModel
    from rslora_fast.chat_templates import get_chat_template, standardize_sharegpt, train_on_responses_only

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=llama_dir, max_seq_length=128, dtype=None, load_in_4bit=True
    )
    model = FastLanguageModel.get_peft_model(
        model, r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth", random_state=3407,
        use_rslora=False, loftq_config=None,
    )  # fmt: skip
    tokenizer = get_chat_template(tokenizer, chat_template="llama-3.1")

    def formatting_prompts_func(examples):
        convos = examples["conversations"]
        return {
            "text": [
                tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=False) for c in convos
            ]
        }

    dataset = standardize_sharegpt(datasets.Dataset.from_list(SHAREGPT))
    dataset = dataset.map(formatting_prompts_func, batched=True)
    assert dataset[0]["conversations"][0]["role"] == "user"
    from transformers import DataCollatorForSeq2Seq, TrainingArguments
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model, tokenizer=tokenizer, train_dataset=dataset, dataset_text_field="text",
        max_seq_length=128, data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer),
        dataset_num_proc=1, packing=False, args=TrainingArguments(**_notebook_args(tmp_path)),
    )  # fmt: skip
    trainer = train_on_responses_only(
        trainer,
        instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
        response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
    )
    batch = next(iter(trainer.get_train_dataloader()))  # what training will see
    answers = {r["output"] for r in ALPACA}
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        trained = tokenizer.decode(ids[labels != -100])
        assert any(trained.strip().startswith(a) for a in answers), trained  # only answers (and their end)
    trainer.train()

    tokenizer = get_chat_template(tokenizer, chat_template="llama-3.1")
    FastLanguageModel.for_inference(model)
    messages = [{"role": "user", "content": "Continue the sequence: 1, 2, 3,"}]
    inputs = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    outputs = model.generate(
        input_ids=inputs["input_ids"], max_new_tokens=6, use_cache=True, temperature=1.5, min_p=0.1
    )
    assert outputs.shape[1] > inputs["input_ids"].shape[1]


def test_gemma3_notebook(gemma3_dir, tmp_path, capsys):
    from rslora_fast import FastModel
    from rslora_fast.chat_templates import (
        get_chat_template,
        standardize_data_formats,
        train_on_responses_only,
    )

    model, tokenizer = FastModel.from_pretrained(
        model_name=gemma3_dir,
        max_seq_length=128,
        load_in_4bit=True,
        load_in_8bit=False,
        full_finetuning=False,
    )
    model = FastModel.get_peft_model(
        model, finetune_vision_layers=False, finetune_language_layers=True, finetune_attention_modules=True,
        finetune_mlp_modules=True, r=8, lora_alpha=8, lora_dropout=0, bias="none", random_state=3407,
    )  # fmt: skip
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    tokenizer = get_chat_template(tokenizer, chat_template="gemma-3")
    dataset = standardize_data_formats(datasets.Dataset.from_list(SHAREGPT))

    def formatting_prompts_func(examples):
        texts = [
            tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=False).removeprefix(
                "<bos>"
            )
            for c in examples["conversations"]
        ]
        return {"text": texts}

    dataset = dataset.map(formatting_prompts_func, batched=True)
    from trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(
        model=model, tokenizer=tokenizer, train_dataset=dataset, eval_dataset=None,
        args=SFTConfig(dataset_text_field="text", max_length=128, **_notebook_args(tmp_path)),
    )  # fmt: skip
    trainer = train_on_responses_only(
        trainer, instruction_part="<start_of_turn>user\n", response_part="<start_of_turn>model\n"
    )
    trainer.train()

    messages = [{"role": "user", "content": [{"type": "text", "text": "Name a fruit."}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer([text], return_tensors="pt", add_special_tokens=False).to(model.device)
    _generate_with_streamer(model, tokenizer, inputs, capsys)

    model.save_pretrained(tmp_path / "gemma-3")
    tokenizer.save_pretrained(tmp_path / "gemma-3")
    model.save_pretrained_merged(str(tmp_path / "gemma-3-finetune"), tokenizer)
    path = model.save_pretrained_gguf(str(tmp_path / "gemma-3-finetune"), quantization_type="Q8_0")
    assert path.name == "model-q8_0.gguf"
    cfg = json.loads((tmp_path / "gemma-3-finetune" / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text"


def test_zephyr_dpo_notebook(llama_dir, tmp_path):
    from rslora_fast import FastLanguageModel, PatchDPOTrainer, is_bfloat16_supported

    PatchDPOTrainer()
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=llama_dir, max_seq_length=128, dtype=None, load_in_4bit=True
    )
    rows = [
        {"prompt": r["instruction"], "chosen": " " + r["output"], "rejected": " I do not know."}
        for r in ALPACA
    ]
    model = FastLanguageModel.get_peft_model(
        model, r=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=64, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth", random_state=3407,
    )  # fmt: skip
    from trl import DPOConfig, DPOTrainer

    dpo_trainer = DPOTrainer(
        model=model, ref_model=None,
        args=DPOConfig(
            per_device_train_batch_size=2, gradient_accumulation_steps=1, warmup_ratio=0.1, max_steps=2,
            learning_rate=5e-6, fp16=not is_bfloat16_supported(), bf16=is_bfloat16_supported(),
            logging_steps=1, optim="adamw_8bit", weight_decay=0.0, lr_scheduler_type="linear", seed=42,
            output_dir=str(tmp_path), report_to="none", use_cpu=not torch.cuda.is_available(),
        ),
        beta=0.1, train_dataset=datasets.Dataset.from_list(rows), tokenizer=tokenizer,
        max_length=128, max_prompt_length=64,
    )  # fmt: skip
    assert dpo_trainer.args.beta == 0.1
    stats = dpo_trainer.train()
    assert stats.global_step == 2
    losses = [h["loss"] for h in dpo_trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)
