"""4-bit saves in bitsandbytes' layout: ``model.save_pretrained`` of a 4-bit model, ``merged_4bit``, dtypes.

References are independent of the code under test: transformers + bitsandbytes (CPU) load what we
write, and merged weights are checked against the plain-torch NF4 reference quantizer applied to
``dequant(W) + scaling * B @ A``.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

from rslora_fast import get_peft_model
from rslora_fast.loading import from_pretrained
from rslora_fast.quant.functional import dequantize_4bit_reference, quantize_4bit_reference
from rslora_fast.quant.linear4bit import Linear4bit

# Multiples of 64 so bitsandbytes' CPU 4-bit matmul accepts every layer.
CFG = dict(
    vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
)  # fmt: skip
NF4_ENDS = (-1.0, -0.6961928009986877, 0.7229568362236023, 1.0)
BNB_CPU_ATOL = 0.08  # bitsandbytes' CPU gemm_4bit vs float32 math, logits of magnitude ~3
IDS = torch.tensor([[1, 5, 9, 3, 17, 40, 2], [4, 4, 8, 15, 16, 23, 42]])
PARTS = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["a b c d e f"], trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>"])
    )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>",
                                                eos_token="</s>")  # fmt: skip


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("save4_base")
    torch.manual_seed(7)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()
    with torch.no_grad():  # wide weights so 4-bit rounding shows in the logits
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def _load(path, **kw):
    kw = {"load_in_4bit": True, "dtype": torch.float32, "device_map": "cpu", "progress": False, **kw}
    return from_pretrained(str(path), **kw)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def _bnb_load(path):
    pytest.importorskip("bitsandbytes")
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu").eval()


def test_save_pretrained_of_4bit_model_writes_bnb_layout_and_reloads(base_dir, tmp_path):
    model, tok = _load(base_dir)
    want = _logits(model)
    out = tmp_path / "q4"
    model.save_pretrained(out)
    tok.save_pretrained(out)

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] is True
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is True
    names = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(names) == 14
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for n in names:  # every layer has its own full quant state, as bitsandbytes writes it
            for part in PARTS:
                assert f"{n}.weight{part}" in keys, f"{n}.weight{part}"
            qmap = f.get_tensor(f"{n}.weight.quant_map")
            assert [qmap[i].item() for i in (0, 1, 14, 15)] == pytest.approx(NF4_ENDS)
            assert f.get_tensor(f"{n}.weight.nested_quant_map").numel() == 256
            meta = json.loads(bytes(f.get_tensor(f"{n}.weight.quant_state.bitsandbytes__nf4").tolist()))
            assert meta["blocksize"] == 64 and meta["shape"] == list(model.get_submodule(n).quant_state.shape)

    again, _ = _load(out)
    assert torch.equal(_logits(again), want)

    theirs = _bnb_load(out)
    for n in names:  # bitsandbytes holds exactly our bytes (read before its CPU forward repacks them)
        mine = model.get_submodule(n).weight.data.view(torch.uint8).flatten()
        assert torch.equal(theirs.get_submodule(n).weight.data.view(torch.uint8).flatten(), mine), n
    assert (_logits(theirs) - want).abs().max() < BNB_CPU_ATOL


def test_save_pretrained_4bit_is_the_same_writer(base_dir, tmp_path):
    from rslora_fast.loading import save_pretrained_4bit

    model, _ = _load(base_dir)
    model.save_pretrained(tmp_path / "a")
    save_pretrained_4bit(model, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def _trained_peft(path, **kw):
    model, tok = _load(path, **kw)
    pm = get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False, random_state=3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pm, tok


def test_merged_4bit_requantizes_the_merged_weight(base_dir, tmp_path):
    pm, tok = _trained_peft(base_dir)
    out = pm.save_pretrained_merged(tmp_path / "m4", tok, save_method="merged_4bit")
    layer = pm.get_base_model().model.layers[1].self_attn.q_proj
    base = layer.base_layer
    dense = dequantize_4bit_reference(base.weight.data, base.quant_state, torch.float32).double()
    merged = dense + layer.scaling * (layer.lora_B.weight.double() @ layer.lora_A.weight.double())
    packed, state = quantize_4bit_reference(merged.float(), blocksize=64, quant_type="nf4")
    expect = dequantize_4bit_reference(packed, state, torch.float32)

    reloaded, _ = _load(out)
    q = reloaded.model.layers[1].self_attn.q_proj
    assert isinstance(q, Linear4bit)
    torch.testing.assert_close(q.dequantize(torch.float32), expect, atol=1e-6, rtol=0)
    # the output head stays dense
    assert not isinstance(reloaded.lm_head, Linear4bit)
    theirs = _bnb_load(out)
    assert (_logits(theirs) - _logits(reloaded)).abs().max() < BNB_CPU_ATOL


def test_merged_4bit_of_a_16bit_base_quantizes_every_linear_but_the_head(base_dir, tmp_path):
    pm, tok = _trained_peft(base_dir, load_in_4bit=False)
    out = pm.save_pretrained_merged(tmp_path / "m4", tok, save_method="merged_4bit")
    reloaded, _ = _load(out)
    assert sum(isinstance(m, Linear4bit) for m in reloaded.modules()) == 14
    layer = pm.get_base_model().model.layers[0].mlp.down_proj
    merged = layer.base_layer.weight.double() + layer.scaling * (
        layer.lora_B.weight.double() @ layer.lora_A.weight.double()
    )
    packed, state = quantize_4bit_reference(merged.float(), blocksize=64, quant_type="nf4")
    got = reloaded.model.layers[0].mlp.down_proj.dequantize(torch.float32)
    torch.testing.assert_close(
        got, dequantize_4bit_reference(packed, state, torch.float32), atol=1e-6, rtol=0
    )
    assert (_logits(_bnb_load(out)) - _logits(reloaded)).abs().max() < BNB_CPU_ATOL


@pytest.mark.parametrize("method", ["merged_16bit", "merged_4bit"])
def test_merged_saves_keep_the_loaded_dtype(base_dir, tmp_path, method):
    pm, tok = _trained_peft(base_dir, load_in_4bit=False, dtype=torch.bfloat16)
    pm.float()  # what a trainer without bf16 does; the model was loaded in bf16
    out = pm.save_pretrained_merged(tmp_path / "bf", tok, save_method=method)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        floats = {f.get_slice(k).get_dtype() for k in f.keys() if "quant" not in k and "absmax" not in k}
    floats.discard("U8")
    assert floats == {"BF16"}
    out = pm.save_pretrained_merged(tmp_path / "f16", tok, save_method="merged_16bit", dtype=torch.float16)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_save_pretrained_follows_a_deep_copy(base_dir, tmp_path):
    import copy

    model, _ = _load(base_dir)
    twin = copy.deepcopy(model)
    layer = twin.model.layers[0].self_attn.q_proj
    layer.requantize_(torch.zeros(layer.out_features, layer.in_features))
    twin.save_pretrained(tmp_path / "twin")
    model.save_pretrained(tmp_path / "orig")
    key = "model.layers.0.self_attn.q_proj.weight"
    with (
        safe_open(str(tmp_path / "twin" / "model.safetensors"), "pt") as a,
        safe_open(str(tmp_path / "orig" / "model.safetensors"), "pt") as b,
    ):
        assert torch.equal(a.get_tensor(key), layer.weight.data)
        assert torch.equal(b.get_tensor(key), model.model.layers[0].self_attn.q_proj.weight.data)
        assert not torch.equal(a.get_tensor(key), b.get_tensor(key))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_4bit_and_merged_4bit_saves_from_the_gpu(base_dir, tmp_path):
    model, tok = _load(base_dir, device_map="cuda:0", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "q4")
    tok.save_pretrained(tmp_path / "q4")
    back, _ = _load(tmp_path / "q4", dtype=torch.bfloat16)
    for n, m in model.named_modules():
        if isinstance(m, Linear4bit):
            assert torch.equal(back.get_submodule(n).weight.data, m.weight.data.cpu()), n
    pm = get_peft_model(model, r=8, use_gradient_checkpointing=False, random_state=3)
    out = pm.save_pretrained_merged(tmp_path / "m4", tok, save_method="merged_4bit")
    reloaded, _ = _load(out, dtype=torch.bfloat16)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    # B = 0 right after get_peft_model: the merged weights are the base weights, quantized again
    q = reloaded.model.layers[1].mlp.down_proj.dequantize(torch.float32)
    base = pm.get_base_model().model.layers[1].mlp.down_proj.base_layer.dequantize(torch.float32).cpu()
    assert (q - base).abs().max() <= base.abs().max() * 0.1


def test_linears_kept_dense_stay_dense_after_the_round_trip(base_dir, tmp_path):
    model, tok = _load(base_dir, skip_modules=["down_proj"])
    model.save_pretrained(tmp_path / "q")
    tok.save_pretrained(tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["llm_int8_skip_modules"] == [
        "lm_head",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    ours, _ = _load(tmp_path / "q")
    assert not isinstance(ours.model.layers[1].mlp.down_proj, Linear4bit)
    assert isinstance(ours.model.layers[1].mlp.up_proj, Linear4bit)
    assert torch.equal(_logits(ours), _logits(model))
    theirs = _bnb_load(tmp_path / "q")
    assert type(theirs.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert (_logits(theirs) - _logits(model)).abs().max() < BNB_CPU_ATOL
