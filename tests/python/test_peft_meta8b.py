"""The Llama-3-8B shape on the meta device: seed-example counts and PEFT's printed line."""

from __future__ import annotations

import pytest
import torch

from rslora_fast import FastLanguageModel


def _llama3_8b_meta():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg)


def test_llama3_8b_counts_and_print_line_match_peft(capsys):
    peft = pytest.importorskip("peft")
    base = _llama3_8b_meta()
    assert sum(p.numel() for p in base.parameters()) == 8_030_261_248
    ours = FastLanguageModel.get_peft_model(base)  # the seed example: every default
    trainable, total = ours.get_nb_trainable_parameters()
    assert trainable == 41_943_040
    assert total == 8_030_261_248 + 41_943_040
    ours.print_trainable_parameters()
    line = capsys.readouterr().out
    assert line == "trainable params: 41,943,040 || all params: 8,072,204,288 || trainable%: 0.5196\n"

    theirs = peft.get_peft_model(
        _llama3_8b_meta(),
        peft.LoraConfig(
            r=16,
            lora_alpha=16,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    theirs.print_trainable_parameters()
    assert capsys.readouterr().out == line
