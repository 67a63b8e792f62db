"""A 4-bit model where bitsandbytes is not installed (it is not our dependency).

transformers flags nothing but ``is_loaded_in_4bit`` to know a model is quantized, and imports
bitsandbytes to count such a model's parameters, which HF Trainer does every step (FLOPs).
"""

from __future__ import annotations

import sys

import pytest
import torch

from rslora_fast.loading import from_pretrained

transformers = pytest.importorskip("transformers")


@pytest.fixture
def tiny_dir(tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    from rslora_fast.demo import build_demo_tokenizer

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    build_demo_tokenizer().save_pretrained(tmp_path)
    return tmp_path


def test_num_parameters_of_a_4bit_model_needs_no_bitsandbytes(tiny_dir, monkeypatch):
    dense, _ = from_pretrained(
        tiny_dir, load_in_4bit=False, dtype=torch.float32, device_map="cpu", progress=False
    )
    q4, _ = from_pretrained(
        tiny_dir, load_in_4bit=True, dtype=torch.float32, device_map="cpu", progress=False
    )
    assert q4.is_loaded_in_4bit  # TRL reads the flag; keep it
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises
    for kw in ({}, {"exclude_embeddings": True}):
        assert q4.num_parameters(**kw) == dense.num_parameters(**kw), kw
    assert q4.num_parameters(exclude_embeddings=True) == sum(
        p.numel() for n, p in dense.named_parameters() if "embed_tokens" not in n
    )
