"""Shared pytest helpers. Fixture names carry a per-area prefix (``peft_`` ...) so areas do not collide."""

from __future__ import annotations

import os
import sys

import pytest

# Test the installed package (a wheel, or `maturin develop`); fall back to the source tree only when
# nothing is installed (pure-Python parts then work without the extension).
try:
    import rslora_fast as _installed  # noqa: F401
except ImportError:
    _PY = os.path.join(os.path.dirname(__file__), "..", "..", "python")
    if os.path.isdir(_PY):
        sys.path.insert(0, os.path.abspath(_PY))


# ---------------------------------------------------------------------- peft_: tiny HF models
PEFT_TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")


def _peft_tiny_config(family: str, **overrides):
    import transformers

    common = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma": transformers.GemmaConfig,
        "phi3": transformers.Phi3Config,
    }[family]
    if family in ("qwen3", "gemma"):
        common["head_dim"] = 8
    if family == "phi3":
        common.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    return cls(**common)


def peft_build_tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A tiny causal LM (hidden 32, 2 layers, vocab 128) built from config, float32, eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = _peft_tiny_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.float().eval()


@pytest.fixture
def peft_tiny_model():
    """Factory fixture: ``peft_tiny_model(family="llama", seed=0, **config_overrides)``."""
    return peft_build_tiny_model


# ---------------------------------------------------------------------- offload_: a LoRA-like llama
OFFLOAD_LAYERS = 3
OFFLOAD_TRAINABLE = ("self_attn.q_proj.weight", "self_attn.v_proj.weight", "mlp.down_proj.weight")


def offload_tiny_llama(dtype=None, dropout=0.1, seed=0):
    """A tiny llama (3 layers, hidden 64) in training mode where only a few projection weights train
    and everything else (embeddings too) is frozen, so no layer input requires grad: the case that
    breaks reentrant checkpointing."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=OFFLOAD_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=512,
        attention_dropout=dropout,
    )
    model = transformers.LlamaForCausalLM(cfg).to(dtype or torch.float32)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(OFFLOAD_TRAINABLE))
    return model.train()


# ---------------------------------------------------------------------- the Hub, replaced


@pytest.fixture
def fake_hub(monkeypatch):
    """Record what HfApi would create and upload (the files present in the folder at upload time)."""
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None, **_):
        calls["create"] = {
            "repo_id": repo_id,
            "private": private,
            "exist_ok": exist_ok,
            "repo_type": repo_type,
        }
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, commit_message=None, **_):
        files = {
            str(p.relative_to(folder_path))
            for p in __import__("pathlib").Path(folder_path).rglob("*")
            if p.is_file()
        }
        calls["upload"] = {
            "repo_id": repo_id,
            "files": files,
            "repo_type": repo_type,
            "message": commit_message,
        }
        return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls
