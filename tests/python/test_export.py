"""Merged export and adapter export (``save_pretrained_merged``), ``merge_and_unload`` on 4-bit bases.

References are independent of the code under test: the reloaded model comes from plain
``transformers.AutoModelForCausalLM.from_pretrained``, merged weights are checked against
``W + scaling * B @ A`` computed in float64 from the saved base weights / the plain-torch NF4 decoder.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from rslora_fast import PeftModel, get_peft_model
from rslora_fast.demo import build_demo_model
from rslora_fast.export import parse_shard_size, save_pretrained_merged
from rslora_fast.loading import from_pretrained
from rslora_fast.quant.functional import dequantize_4bit_reference

PROJ = "model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def export_base_dir(tmp_path_factory):
    """A tiny llama (hidden 64, 2 layers, vocab ~512) and its tokenizer, saved in float32."""
    return build_demo_model(tmp_path_factory.mktemp("export_base"), hidden_size=64, num_layers=2, seed=1)


def _trained(path, load_in_4bit, dtype=torch.float32, seed=0, **lora):
    """A PeftModel whose adapters look trained (B random, not zero) and a fixed input batch."""
    model, tok = from_pretrained(
        path, load_in_4bit=load_in_4bit, dtype=dtype, device_map="cpu", progress=False
    )
    pm = get_peft_model(
        model, r=8, lora_alpha=16, use_gradient_checkpointing=False, random_state=seed, **lora
    )
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.eval()
    ids = torch.randint(3, len(tok), (2, 13), generator=g)
    return pm, tok, ids


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _load_plain(path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def _merged_weight(out_dir, key):
    files = sorted(out_dir.glob("*.safetensors"))
    for f in files:
        sd = load_file(str(f))
        if key in sd:
            return sd[key]
    raise KeyError(key)


def test_merged_16bit_base_matches_trained_model(export_base_dir, tmp_path):
    pm, tok, ids = _trained(export_base_dir, load_in_4bit=False)
    want = _logits(pm, ids)
    out = tmp_path / "merged"
    pm.save_pretrained_merged(out, tok, save_method="merged_16bit", max_shard_size="100KB")

    # sharded, with an index naming every tensor; no adapter keys; config without quantization
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert not any("lora" in k or "base_layer" in k for k in index["weight_map"])
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()

    got = _logits(_load_plain(out), ids)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)

    # the merged weight is W + scaling * B @ A (float64 reference from the original checkpoint)
    layer = pm.base_model.model.get_submodule(PROJ)
    w0 = load_file(str(export_base_dir / "model.safetensors"))[PROJ + ".weight"].double()
    ref = w0 + (16 / 8) * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
    torch.testing.assert_close(_merged_weight(out, PROJ + ".weight").double(), ref, atol=1e-6, rtol=0)

    # reloaded tokenizer works
    tok2 = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok2("hello world")["input_ids"] == tok("hello world")["input_ids"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_4bit_base_equals_trained_4bit_model(export_base_dir, tmp_path, dtype):
    pm, tok, ids = _trained(export_base_dir, load_in_4bit=True, dtype=dtype)
    want = _logits(pm, ids)
    out = tmp_path / "merged4"
    save_pretrained_merged(pm, out, tokenizer=tok)
    assert (out / "model.safetensors").is_file()  # one shard under the 5GB default
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg

    plain = _load_plain(out, dtype)
    assert all(p.dtype == dtype for p in plain.parameters())
    got = _logits(plain, ids)
    tol = dict(atol=2e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(got, want, **tol)
    with pm.disable_adapter():
        base = _logits(pm, ids)
    # the export is much closer to the trained model than the adapter's own effect on the logits
    assert (got - want).abs().max() < 0.1 * (base - want).abs().max()

    # merged into the *dequantized* 4-bit weight, not into the original 16-bit weight
    layer = pm.base_model.model.get_submodule(PROJ)
    base = layer.base_layer
    deq = dequantize_4bit_reference(base.weight, base.quant_state, torch.float64)
    delta = (16 / 8) * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
    merged = _merged_weight(out, PROJ + ".weight").double()
    wtol = dict(atol=1e-6, rtol=0) if dtype == torch.float32 else dict(atol=1e-4, rtol=8e-3)
    torch.testing.assert_close(merged, deq + delta, **wtol)
    orig = load_file(str(export_base_dir / "model.safetensors"))[PROJ + ".weight"].double()
    err_deq = (merged - (deq + delta)).abs().max()
    err_orig = (merged - (orig + delta)).abs().max()
    assert err_orig > 4 * err_deq


def test_export_leaves_live_model_untouched(export_base_dir, tmp_path):
    pm, tok, ids = _trained(export_base_dir, load_in_4bit=True)
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    kinds = {n: type(m) for n, m in pm.named_modules()}
    want = _logits(pm, ids)
    pm.save_pretrained_merged(tmp_path / "m", save_method="merged_16bit")
    assert {n: type(m) for n, m in pm.named_modules()} == kinds
    after = pm.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    torch.testing.assert_close(_logits(pm, ids), want, atol=0, rtol=0)


def test_lora_save_method_reloads(export_base_dir, tmp_path):
    pm, tok, ids = _trained(export_base_dir, load_in_4bit=True)
    want = _logits(pm, ids)
    out = tmp_path / "lora"
    pm.save_pretrained_merged(out, tok, save_method="lora")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    assert (out / "tokenizer.json").is_file()
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert f"base_model.model.{PROJ}.lora_A.weight" in keys
    base, _ = from_pretrained(export_base_dir, load_in_4bit=True, dtype=torch.float32, progress=False)
    again = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(_logits(again, ids), want, atol=1e-6, rtol=0)


def test_merge_and_unload_4bit(export_base_dir):
    from rslora_fast.quant.linear4bit import Linear4bit

    pm, _, ids = _trained(export_base_dir, load_in_4bit=True, seed=3)
    want = _logits(pm, ids)
    layer = pm.base_model.model.get_submodule(PROJ)
    deq = dequantize_4bit_reference(layer.base_layer.weight, layer.base_layer.quant_state, torch.float64)
    delta = layer.get_delta_weight().double()

    dense = pm.merge_and_unload(dequantize=True)
    q = dense.get_submodule(PROJ)
    assert type(q) is torch.nn.Linear
    assert not any(isinstance(m, Linear4bit) for m in dense.modules())
    torch.testing.assert_close(q.weight.double(), deq + delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(dense, ids), want, atol=2e-4, rtol=1e-4)

    # default: stays 4-bit (requantized): close to the trained model up to one more NF4 rounding
    pm2, _, ids2 = _trained(export_base_dir, load_in_4bit=True, seed=3)
    want2 = _logits(pm2, ids2)
    m4 = pm2.merge_and_unload()
    assert isinstance(m4.get_submodule(PROJ), Linear4bit)
    err = (_logits(m4, ids2) - want2).abs().max().item()
    assert err < 0.5 * want2.abs().max().item()


def test_tied_head_trained_in_full_is_untied(tmp_path):
    from rslora_fast.demo import build_demo_tokenizer

    tok = build_demo_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    pm = get_peft_model(model, r=4, target_modules=["q_proj", "lm_head"], use_gradient_checkpointing=False)
    with torch.no_grad():
        pm.base_model.model.lm_head.modules_to_save.weight.add_(0.1)
    ids = torch.randint(0, len(tok), (1, 7))
    want = _logits(pm, ids)
    pm.save_pretrained_merged(tmp_path / "m", tok)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is False
    torch.testing.assert_close(_logits(_load_plain(tmp_path / "m"), ids), want, atol=2e-5, rtol=1e-5)


def test_bad_arguments(export_base_dir, tmp_path):
    assert parse_shard_size("5GB") == 5 * 10**9
    assert parse_shard_size("2MiB") == 2 * 2**20
    assert parse_shard_size(123) == 123
    for bad in ("5 parsecs", "-1GB", 0, True):
        with pytest.raises(ValueError):
            parse_shard_size(bad)
    model, _ = from_pretrained(export_base_dir, load_in_4bit=False, dtype=torch.float32, progress=False)
    with pytest.raises(
        ValueError, match=r"save_method must be one of \['merged_16bit', 'merged_4bit', 'lora'\]"
    ):
        save_pretrained_merged(model, tmp_path / "x", save_method="gguf")
    with pytest.raises(ValueError, match="PeftModel"):
        save_pretrained_merged(model, tmp_path / "x", save_method="lora")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_merged_4bit_bf16_on_gpu(export_base_dir, tmp_path):
    model, tok = from_pretrained(
        export_base_dir, load_in_4bit=True, dtype=torch.bfloat16, device_map="cuda:0"
    )
    pm = get_peft_model(model, r=8, use_gradient_checkpointing=False, random_state=5)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.device))
    pm.eval()
    ids = torch.randint(3, len(tok), (3, 29), generator=g).cuda()
    want = _logits(pm, ids)
    pm.save_pretrained_merged(tmp_path / "m", tok)
    plain = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "m"), dtype=torch.bfloat16
    ).cuda()
    got = _logits(plain.eval(), ids)
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)
    with pm.disable_adapter():
        base = _logits(pm, ids)
    assert (got - want).abs().max() < 0.1 * (base - want).abs().max()
