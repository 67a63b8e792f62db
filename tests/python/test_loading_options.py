"""from_pretrained's keyword surface: Unsloth's keywords, full fine-tuning, RoPE scaling,
attn_implementation, and adapter folders.

References: plain transformers loaded with the same RoPE parameters (logits at positions beyond
the trained context), RoPE inverse frequencies computed here from the formula, HF peft (adapter
folders) and the model before saving (our own adapters).
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_loading_families import write_family  # noqa: E402

from rslora_fast import FastLanguageModel, PeftModel  # noqa: E402
from rslora_fast.loading import CheckpointNotFoundError, from_pretrained  # noqa: E402
from rslora_fast.quant.linear4bit import Linear4bit  # noqa: E402

CPU = dict(device_map="cpu", dtype=torch.float32, progress=False)
LONG = torch.arange(300).remainder(60).view(1, 300) + 3  # positions far beyond max_position_embeddings=128


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("gemma3"), "gemma3_text")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _inv_freq(theta: float, dim: int, factor: float = 1.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)) / factor


def _transformers_with_rope(path, rope: dict):
    cfg = transformers.AutoConfig.from_pretrained(str(path))
    cfg.rope_parameters = rope
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), config=cfg, dtype=torch.float32
    ).eval()


# ------------------------------------------------------------------------------- Unsloth keywords
def test_keywords_unsloth_notebooks_pass(llama, caplog):
    caplog.set_level(logging.INFO, logger="rslora_fast")
    model, tok = FastLanguageModel.from_pretrained(
        str(llama), max_seq_length=128, load_in_4bit=True, load_in_8bit=False, full_finetuning=False,
        fast_inference=True, max_lora_rank=16, gpu_memory_utilization=0.6, token=None,
        use_exact_model_name=False, random_state=3407, fix_tokenizer=True, **CPU,
    )  # fmt: skip
    assert any(isinstance(m, Linear4bit) for m in model.modules()) and tok.pad_token is not None
    ours = [r for r in caplog.records if r.name.startswith("rslora_fast")]
    warnings = [r.getMessage() for r in ours if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "fast_inference" in warnings[0] and "standard" in warnings[0]
    vllm = [r.getMessage() for r in ours if "vLLM" in r.getMessage()]
    assert len(vllm) == 1 and "max_lora_rank" in vllm[0] and "gpu_memory_utilization" in vllm[0]


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (
            dict(load_in_8bit=True),
            ValueError,
            ["load_in_8bit=True", "load_in_4bit=True", "load_in_4bit=False"],
        ),
        (
            dict(full_finetuning=True, load_in_4bit=True),
            ValueError,
            ["full_finetuning", "load_in_4bit=False"],
        ),
        (dict(max_seq_length=0), ValueError, ["max_seq_length", "0"]),
        (dict(max_seq_length=-8), ValueError, ["max_seq_length", "-8"]),
        (dict(max_seq_length=2.5), ValueError, ["max_seq_length", "2.5"]),
        (dict(rope_scaling="linear"), ValueError, ["rope_scaling", "'linear'", "factor"]),
        (dict(rope_scaling={"rope_type": "stretchy", "factor": 2}), ValueError, ["stretchy", "yarn"]),
        (dict(rope_scaling={"type": "linear", "factor": 0.5}), ValueError, ["factor", "0.5"]),
        (dict(rope_scaling={"rope_type": "yarn"}), ValueError, ["factor", "None"]),
        (dict(attn_implementation="fastest"), ValueError, ["fastest", "sdpa", "eager", "flash_attention_2"]),
        (dict(load_in_16bit=True, load_in_4bit=True), ValueError, ["load_in_16bit", "load_in_4bit"]),
        (
            dict(bogus_option=1),
            TypeError,
            ["bogus_option", "full_finetuning", "attn_implementation", "revision"],
        ),
    ],
)
def test_bad_options_are_clear_errors(llama, kwargs, exc, words):
    with pytest.raises(exc) as info:
        FastLanguageModel.from_pretrained(str(llama), **{**CPU, **kwargs})
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_unknown_keyword_in_the_plain_loader_lists_accepted(llama):
    with pytest.raises(TypeError, match=r"\['fast_inference'\].*attn_implementation"):
        from_pretrained(str(llama), fast_inference=True, **CPU)


def test_attn_implementation_reaches_the_config(llama):
    for impl in ("eager", "sdpa"):
        model, _ = from_pretrained(str(llama), attn_implementation=impl, **CPU)
        assert model.config._attn_implementation == impl


# ------------------------------------------------------------------------------- full fine-tuning
def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", [False, True, "unsloth"])
def test_full_finetuning_trains_every_weight(llama, mode):
    model, _ = FastLanguageModel.from_pretrained(
        str(llama), full_finetuning=True, use_gradient_checkpointing=mode, max_seq_length=64, **CPU
    )
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    params = dict(model.named_parameters())
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params.values())
    assert bool(model.is_gradient_checkpointing) == (mode is not False)
    # 600 tokens: above the offloading mode's 512-token threshold, so "unsloth" really offloads.
    ids = torch.randint(3, 60, (2, 300), generator=torch.Generator().manual_seed(0))
    model.train()
    got = _grads(model, ids)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32).train()
    want = _grads(ref, ids)
    assert set(got) == set(want)
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-6, rtol=1e-5), n
    # One optimizer step moves every weight; for_inference / for_training keep the mode.
    before = {n: p.detach().clone() for n, p in params.items()}
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert all(not torch.equal(before[n], p) for n, p in params.items())
    FastLanguageModel.for_inference(model)
    assert not model.is_gradient_checkpointing
    FastLanguageModel.for_training(model)
    assert bool(model.is_gradient_checkpointing) == (mode is not False)


def test_full_finetuning_default_is_16bit_with_unsloth_checkpointing(llama):
    model, _ = FastLanguageModel.from_pretrained(str(llama), full_finetuning=True, **CPU)
    assert model.is_gradient_checkpointing and model._gradient_checkpointing["mode"] == "unsloth"
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    plain, _ = from_pretrained(str(llama), full_finetuning=True, **CPU)  # the loader alone: no checkpointing
    assert all(p.requires_grad for p in plain.parameters()) and not plain.is_gradient_checkpointing


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("mode", [True, "unsloth"])
def test_cuda_full_finetuning_checkpointing_keeps_gradients(llama, mode):
    ids = torch.randint(3, 60, (2, 300), generator=torch.Generator().manual_seed(0)).cuda()

    def grads(m):
        model, _ = FastLanguageModel.from_pretrained(
            str(llama), full_finetuning=True, use_gradient_checkpointing=m, device_map="cuda",
            dtype=torch.bfloat16, progress=False,
        )  # fmt: skip
        assert bool(model.is_gradient_checkpointing) == (m is not False)
        return _grads(model.train(), ids)

    got, want = grads(mode), grads(False)
    for n in want:
        assert torch.allclose(got[n].float(), want[n].float(), rtol=2e-2, atol=1e-3), n


# ------------------------------------------------------------------------------- RoPE scaling
def test_max_seq_length_beyond_context_scales_rope_linearly(llama, caplog):
    caplog.set_level(logging.INFO, logger="rslora_fast")
    model, _ = from_pretrained(str(llama), max_seq_length=512, load_in_4bit=False, **CPU)
    assert model.config.rope_parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    assert model.config.max_position_embeddings == 512 and model.max_seq_length == 512
    inv = model.model.rotary_emb.inv_freq.double()
    assert torch.allclose(inv, _inv_freq(10000.0, 16, 4.0), rtol=1e-6)
    lines = [r for r in caplog.records if r.name.startswith("rslora_fast") and "RoPE" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and "512" in lines[0].getMessage()
    ref = _transformers_with_rope(llama, {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    assert torch.equal(_logits(model, LONG), _logits(ref, LONG))
    unscaled = transformers.AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32).eval()
    assert not torch.allclose(_logits(model, LONG), _logits(unscaled, LONG), atol=1e-3)


def test_rope_untouched_within_context_or_when_left_out(llama):
    for msl in (None, 128, 64):
        model, _ = from_pretrained(str(llama), max_seq_length=msl, load_in_4bit=False, **CPU)
        assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}, msl
        assert model.config.max_position_embeddings == 128


L3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


@pytest.mark.parametrize(
    "own, extended",
    [
        ({"rope_type": "linear", "factor": 2.0}, {"rope_type": "linear", "factor": 4.0}),
        (
            {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64},
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        ),
        (
            {"rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": 64, **L3},
            {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 64, **L3},
        ),
    ],
)
def test_models_own_scaling_is_extended(tmp_path, own, extended):
    path = write_family(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {**own, "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(cfg))
    model, _ = from_pretrained(str(path), max_seq_length=256, load_in_4bit=False, **CPU)
    assert model.config.rope_parameters == {**extended, "rope_theta": 10000.0}
    assert model.config.max_position_embeddings == 256
    ref_cfg = transformers.AutoConfig.from_pretrained(str(path))
    ref_cfg.rope_parameters, ref_cfg.max_position_embeddings = {**extended, "rope_theta": 10000.0}, 256
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), config=ref_cfg, dtype=torch.float32
    ).eval()
    assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    assert torch.equal(_logits(model, LONG), _logits(ref, LONG))
    if own["rope_type"] == "linear":
        assert torch.allclose(
            model.model.rotary_emb.inv_freq.double(), _inv_freq(10000.0, 16, 4.0), rtol=1e-6
        )


def test_dynamic_and_unknown_types_are_left_alone(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rslora_fast")
    path = write_family(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(cfg))
    model, _ = from_pretrained(str(path), max_seq_length=256, load_in_4bit=False, **CPU)
    assert model.config.rope_parameters["factor"] == 2.0 and model.config.max_position_embeddings == 128
    assert any("dynamic" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


def test_gemma3_scales_full_attention_layers_only(gemma3):
    model, _ = from_pretrained(str(gemma3), max_seq_length=256, load_in_4bit=False, **CPU)
    rope = model.config.rope_parameters
    assert rope["full_attention"]["rope_type"] == "linear" and rope["full_attention"]["factor"] == 2.0
    assert rope["sliding_attention"]["rope_type"] == "default"
    emb = model.model.rotary_emb
    theta_full = rope["full_attention"]["rope_theta"]
    assert torch.allclose(emb.full_attention_inv_freq.double(), _inv_freq(theta_full, 16, 2.0), rtol=1e-6)
    assert torch.allclose(emb.sliding_attention_inv_freq.double(), _inv_freq(10000.0, 16), rtol=1e-6)
    ref_cfg = transformers.AutoConfig.from_pretrained(str(gemma3))
    ref_cfg.rope_parameters["full_attention"] = dict(rope["full_attention"])
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(gemma3), config=ref_cfg, dtype=torch.float32)
    assert torch.equal(_logits(model, LONG), _logits(ref.eval(), LONG))


def test_explicit_rope_scaling_wins(llama, caplog):
    caplog.set_level(logging.INFO, logger="rslora_fast")
    model, _ = from_pretrained(
        str(llama),
        max_seq_length=512,
        rope_scaling={"type": "dynamic", "factor": 2.0},
        load_in_4bit=False,
        **CPU,
    )
    assert model.config.rope_parameters == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert model.model.rotary_emb.rope_type == "dynamic"
    ref = _transformers_with_rope(llama, {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert torch.equal(_logits(model, LONG), _logits(ref, LONG))
    assert not any(r.levelno >= logging.WARNING for r in caplog.records if r.name.startswith("rslora_fast"))


# ------------------------------------------------------------------------------- adapter folders
def _perturbed_lora(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))


def test_adapter_folder_loads_base_and_adapter(llama, tmp_path):
    base, _ = FastLanguageModel.from_pretrained(str(llama), load_in_4bit=False, **CPU)
    peft_model = FastLanguageModel.get_peft_model(base, r=4, target_modules=["q_proj", "v_proj"])
    _perturbed_lora(peft_model)
    want = _logits(peft_model, LONG[:, :40])
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter" / "config.json").exists()

    model, tok = FastLanguageModel.from_pretrained(
        str(tmp_path / "adapter"), load_in_4bit=False, use_gradient_checkpointing=True, **CPU
    )
    assert isinstance(model, PeftModel) and tok.pad_token is not None
    assert model.get_base_model().is_gradient_checkpointing
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert torch.equal(_logits(model, LONG[:, :40]), want)


def test_adapter_folder_from_hf_peft(llama, tmp_path):
    peft = pytest.importorskip("peft")
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"], init_lora_weights=False
    )
    hf = peft.get_peft_model(hf_base, cfg).eval()
    hf.save_pretrained(str(tmp_path / "hf_adapter"))
    assert json.loads((tmp_path / "hf_adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "hf_adapter"), load_in_4bit=False, **CPU)
    assert isinstance(model, PeftModel)
    assert torch.allclose(_logits(model, LONG[:, :40]), _logits(hf, LONG[:, :40]), atol=1e-5)


def test_adapter_folder_with_missing_base_names_both(llama, tmp_path):
    base, _ = FastLanguageModel.from_pretrained(str(llama), load_in_4bit=False, **CPU)
    FastLanguageModel.get_peft_model(base, r=4).save_pretrained(str(tmp_path / "adapter"))
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointNotFoundError) as info:
        FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), **CPU)
    assert str(tmp_path / "gone") in str(info.value) and str(tmp_path / "adapter") in str(info.value)
    cfg["base_model_name_or_path"] = None
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointNotFoundError, match="base_model_name_or_path"):
        FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), **CPU)
    shutil.rmtree(tmp_path / "adapter")


def test_adapter_folder_with_base_relative_to_it(llama, tmp_path, monkeypatch):
    shutil.copytree(llama, tmp_path / "base")
    base, _ = FastLanguageModel.from_pretrained(str(tmp_path / "base"), load_in_4bit=False, **CPU)
    FastLanguageModel.get_peft_model(base, r=4).save_pretrained(str(tmp_path / "adapter"))
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "../base"  # written by a run whose working directory was elsewhere
    cfg_path.write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path.parent)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), load_in_4bit=False, **CPU)
    assert isinstance(model, PeftModel)
