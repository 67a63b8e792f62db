"""from_pretrained / save_pretrained_4bit on tiny llama checkpoints written into tmp dirs.

References: the dense transformers model (16-bit load must be exact), transformers + bitsandbytes
(4-bit loads must give the same bytes and logits), and hand-damaged files for the error paths.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from rslora_fast.errors import QuantFormatError  # noqa: E402
from rslora_fast.loading import (  # noqa: E402
    CheckpointError,
    CheckpointNotFoundError,
    from_pretrained,
    save_pretrained_4bit,
)
from rslora_fast.quant.linear4bit import Linear4bit  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")

SENTENCES = ["the quick brown fox jumps over the lazy dog", "a tiny model reads a tiny book", "hello world"]
# Sizes are multiples of 64 so that bitsandbytes' CPU 4-bit matmul (our reference) accepts them.
CFG = dict(
    vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
)  # fmt: skip


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>",
                                                eos_token="</s>")  # fmt: skip


def _write_model(path, tie=False, shard=None, **over):
    torch.manual_seed(1234)
    cfg = transformers.LlamaConfig(**{**CFG, **over}, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # default init leaves tiny projections; widen them so 4-bit errors show
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kw)
    _tokenizer().save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model = _write_model(path)
    ids = torch.tensor([[1, 5, 9, 3, 17, 40, 2], [4, 4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        ref = model(ids).logits
    return path, ids, ref


def _logits(model, ids):
    with torch.no_grad():
        return model(ids.to(model.device)).logits.float().cpu()


def _bnb_cfg():
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.float32)  # fmt: skip


def _dequantized_twin(dense_dir, bnb_model):
    """Dense model whose linears hold bitsandbytes' own dequantization of ``bnb_model``'s weights.

    bitsandbytes' CPU 4-bit matmul computes in reduced precision (about 1e-2 off), so exact
    comparisons go through this twin; bnb's forward itself is compared with a looser tolerance.
    """
    twin = transformers.AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32).eval()
    n4 = 0
    for name, mod in bnb_model.named_modules():
        if type(mod).__name__ == "Linear4bit":
            w = _decode_bnb(mod.weight.data, mod.weight.quant_state).float()
            twin.get_submodule(name).weight.data = w
            n4 += 1
    assert n4 == 14
    return twin


def _decode_bnb(packed: torch.Tensor, st) -> torch.Tensor:
    """float64 decode of a bitsandbytes 4-bit weight (its CPU dequantize_4bit is wrong for some
    shapes in 0.50.2, see test_linear4bit)."""
    import bitsandbytes.functional as bnbf

    n = st.shape.numel()
    b = packed.view(torch.uint8).view(-1).long()
    codes = torch.stack([b >> 4, b & 15], 1).view(-1)[:n]
    if st.nested:
        absmax = bnbf.dequantize_blockwise(st.absmax, st.state2).double() + float(st.offset)
    else:
        absmax = st.absmax.double()
    return (st.code.double()[codes] * absmax[torch.arange(n) // st.blocksize]).view(st.shape)


BNB_CPU_ATOL = 0.08  # bitsandbytes' CPU gemm_4bit vs exact float32 math, on logits of magnitude ~3


def test_16bit_load_is_exact(tiny):
    path, ids, ref = tiny
    model, tok = from_pretrained(str(path), load_in_4bit=False, dtype=torch.float32, device_map="cpu",
                                 max_seq_length=96, progress=False)  # fmt: skip
    assert torch.equal(_logits(model, ids), ref)
    assert model.max_seq_length == 96 and model.config.max_seq_length == 96
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    assert tok.pad_token == "</s>" and tok("hello world")["input_ids"]
    # RoPE buffers were recomputed (not left on meta, not zeros).
    inv = model.model.rotary_emb.inv_freq
    assert inv.device.type == "cpu" and torch.allclose(inv[:2], torch.tensor([1.0, 10000 ** (-2 / 16)]))


def test_4bit_load_matches_bitsandbytes(tiny):
    pytest.importorskip("bitsandbytes")
    path, ids, ref = tiny
    ours, _ = from_pretrained(str(path), dtype=torch.float32, device_map="cpu", progress=False)
    bnb = transformers.AutoModelForCausalLM.from_pretrained(str(path), quantization_config=_bnb_cfg(),
                                                            device_map="cpu", dtype=torch.float32)  # fmt: skip
    # Same bytes and scales for every quantized layer (compared before bnb's CPU forward repacks them).
    bnb_layers = {n: m for n, m in bnb.named_modules() if type(m).__name__ == "Linear4bit"}
    our_layers = {n: m for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    assert set(bnb_layers) == set(our_layers) and len(our_layers) == 14
    for n, m in our_layers.items():
        assert torch.equal(m.weight.view(-1), bnb_layers[n].weight.data.view(-1)), n
    assert isinstance(ours.lm_head, nn.Linear) and ours.lm_head.weight.dtype == torch.float32
    assert ours.model.embed_tokens.weight.dtype == torch.float32

    twin = _dequantized_twin(path, bnb)
    got = _logits(ours, ids)
    assert torch.allclose(got, _logits(twin, ids), atol=1e-5), (got - _logits(twin, ids)).abs().max()
    assert (got - _logits(bnb, ids)).abs().max() < BNB_CPU_ATOL
    # And within NF4 error of the dense model.
    err = (got - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.5  # a random tiny model amplifies NF4 noise; the twin check above is the exact one


def test_prequantized_bnb_checkpoint_and_our_save_interoperate(tiny, tmp_path):
    pytest.importorskip("bitsandbytes")
    path, ids, ref = tiny
    bnb_dir = tmp_path / "bnb4"
    bnb = transformers.AutoModelForCausalLM.from_pretrained(str(path), quantization_config=_bnb_cfg(),
                                                            device_map="cpu", dtype=torch.float32)  # fmt: skip
    bnb.save_pretrained(bnb_dir)  # before any forward: the CPU forward repacks weights in place
    shutil.copy(path / "tokenizer.json", bnb_dir)
    shutil.copy(path / "tokenizer_config.json", bnb_dir)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(bnb_dir), device_map="cpu")
    want = _logits(_dequantized_twin(path, reloaded), ids)

    with pytest.MonkeyPatch.context() as mp:  # prove the load needs no bitsandbytes
        for mod in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
            mp.setitem(sys.modules, mod, None)
        ours, _ = from_pretrained(str(bnb_dir), dtype=torch.float32, device_map="cpu", progress=False)
    assert sum(isinstance(m, Linear4bit) for m in ours.modules()) == 14
    got = _logits(ours, ids)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert (got - _logits(reloaded, ids)).abs().max() < BNB_CPU_ATOL

    dense, _ = from_pretrained(str(bnb_dir), load_in_4bit=False, dtype=torch.float32, device_map="cpu",
                               progress=False)  # fmt: skip
    assert not any(isinstance(m, Linear4bit) for m in dense.modules())
    assert torch.allclose(_logits(dense, ids), got, atol=1e-4)

    # Our 4-bit save loads in transformers + bitsandbytes and in ours, with the same logits.
    ours_dir = tmp_path / "ours4"
    save_pretrained_4bit(ours, ours_dir)
    qc = json.loads((ours_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_quant_type"] == "nf4"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(ours_dir), device_map="cpu")
    assert torch.allclose(_logits(_dequantized_twin(path, theirs), ids), got, atol=1e-5)
    assert (_logits(theirs, ids) - got).abs().max() < BNB_CPU_ATOL
    shutil.copy(path / "tokenizer.json", ours_dir)
    shutil.copy(path / "tokenizer_config.json", ours_dir)
    again, _ = from_pretrained(str(ours_dir), dtype=torch.float32, device_map="cpu", progress=False)
    assert torch.equal(_logits(again, ids), got)


def test_tied_and_sharded(tmp_path):
    model = _write_model(tmp_path, tie=True, shard="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        ref = model(ids).logits
    ours, _ = from_pretrained(str(tmp_path), load_in_4bit=False, dtype=torch.float32, device_map="cpu",
                              progress=False)  # fmt: skip
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert torch.equal(_logits(ours, ids), ref)
    q, _ = from_pretrained(str(tmp_path), dtype=torch.float32, device_map="cpu", progress=False)
    assert q.lm_head.weight is q.model.embed_tokens.weight and isinstance(q.lm_head, nn.Linear)

    # A missing shard is named before anything loads.
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / victim).unlink()
    with pytest.raises(CheckpointNotFoundError, match=victim):
        from_pretrained(str(tmp_path), device_map="cpu", progress=False)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_and_corrupt_files(tiny, tmp_path):
    path = tiny[0]
    d = _copy(path, tmp_path / "trunc")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        from_pretrained(str(d), device_map="cpu", progress=False)
    f.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}xyz" + data[32:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        from_pretrained(str(d), device_map="cpu", progress=False)


def test_shape_disagreeing_with_config(tiny, tmp_path):
    d = _copy(tiny[0], tmp_path / "shape")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 192
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight.*expects"):
        from_pretrained(str(d), device_map="cpu", progress=False)


def test_missing_tensor(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(tiny[0], tmp_path / "missing")
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        from_pretrained(str(d), device_map="cpu", progress=False)


def test_bad_quant_settings_and_missing_paths(tiny, monkeypatch):
    path = str(tiny[0])
    with pytest.raises(QuantFormatError, match="int3"):
        from_pretrained(path, quant_type="int3", device_map="cpu")
    with pytest.raises(QuantFormatError, match="blocksize"):
        from_pretrained(path, blocksize=100, device_map="cpu")
    with pytest.raises(CheckpointNotFoundError, match="does-not-exist"):
        from_pretrained("/nonexistent/does-not-exist", device_map="cpu")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointNotFoundError, match=r"someorg/no-such-model.*cache"):
        from_pretrained("someorg/no-such-model", device_map="cpu")


@pytest.mark.cuda
@cuda
def test_cuda_4bit_load_memory_and_logits(tiny):
    path, ids, ref = tiny
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model, _ = from_pretrained(str(path), device_map="cuda", progress=False)
    assert model.dtype in (torch.bfloat16, torch.float16)
    after = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    biggest = max(p.numel() for p in tiny_dense_params(path)) * 4  # largest fp32 tensor in the file
    # Peak = final 4-bit model + about one dense tensor in flight (+ quantizer temporaries, allocator slack).
    assert peak <= after + 4 * biggest + (8 << 20)
    lin = model.model.layers[0].mlp.down_proj
    assert isinstance(lin, Linear4bit) and lin.weight.is_cuda and lin.quant_state.absmax.is_cuda
    got = _logits(model, ids)
    err = (got - ref).abs().max() / ref.abs().max()
    assert err < 0.5  # bf16 + NF4 on a random tiny model (CPU float32 gives about 0.26)


def tiny_dense_params(path):
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as fh:
        return [fh.get_tensor(k) for k in fh.keys()]
