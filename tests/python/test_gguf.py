"""GGUF export (``save_pretrained_gguf``) and import (``from_pretrained("x.gguf")``) on tiny models.

References are independent of the code under test: the file is read back with the ``gguf``
package's own reader, and loaded with transformers' own GGUF loader
(``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``), whose logits must match the model
that was exported. Imports are compared with the model the file was written from, and 4-bit
imports with our 4-bit load of the same weights from safetensors.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import transformers

gguf = pytest.importorskip("gguf")

from conftest import peft_build_tiny_model  # noqa: E402

from rslora_fast import FastLanguageModel, get_peft_model  # noqa: E402
from rslora_fast.demo import build_demo_tokenizer  # noqa: E402
from rslora_fast.gguf_io import save_pretrained_gguf  # noqa: E402
from rslora_fast.loading import CheckpointError, CheckpointNotFoundError, from_pretrained  # noqa: E402

VOCAB = 400
# Largest |logit difference| accepted against the exported model (logits are of magnitude ~2.5).
TOL = {"f32": 1e-5, "f16": 5e-3, "bf16": 4e-2, "q8_0": 0.1}


@pytest.fixture(scope="module")
def gguf_tok():
    return build_demo_tokenizer(VOCAB)


def _tiny(family, seed=0, **over):
    """A tiny model whose weights are wide enough for quantization errors to show."""
    if family.startswith("gemma"):
        over.setdefault("tie_word_embeddings", True)  # llama.cpp's gemma has no separate output head
    if family in ("gemma2", "gemma3"):  # not among conftest's families
        torch.manual_seed(seed)
        cls = transformers.Gemma2Config if family == "gemma2" else transformers.Gemma3TextConfig
        cfg = cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, **over)  # fmt: skip
        model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    else:
        model = peft_build_tiny_model(family, seed=seed, vocab_size=VOCAB, **over)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    return model


def _ids(seed=0):
    return torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _hf_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


# ------------------------------------------------------------------------------------ export
def test_export_reads_back_with_gguf_reader(gguf_tok, tmp_path):
    model = _tiny("llama")
    path = save_pretrained_gguf(model, tmp_path, gguf_tok, quantization_method="q8_0", progress=False)
    assert path == tmp_path / "model-q8_0.gguf"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind

    r = gguf.GGUFReader(str(path))
    T = gguf.GGMLQuantizationType
    got = {t.name: (tuple(int(s) for s in t.shape), t.tensor_type) for t in r.tensors}
    hidden, inter, kv = 32, 64, 16
    want = {"token_embd.weight": ((hidden, VOCAB), T.Q8_0), "output.weight": ((hidden, VOCAB), T.Q8_0),
            "output_norm.weight": ((hidden,), T.F32)}  # fmt: skip
    for b in range(2):
        want.update({
            f"blk.{b}.attn_norm.weight": ((hidden,), T.F32), f"blk.{b}.ffn_norm.weight": ((hidden,), T.F32),
            f"blk.{b}.attn_q.weight": ((hidden, hidden), T.Q8_0), f"blk.{b}.attn_k.weight": ((hidden, kv), T.Q8_0),
            f"blk.{b}.attn_v.weight": ((hidden, kv), T.Q8_0), f"blk.{b}.attn_output.weight": ((hidden, hidden), T.Q8_0),
            f"blk.{b}.ffn_gate.weight": ((hidden, inter), T.Q8_0), f"blk.{b}.ffn_up.weight": ((hidden, inter), T.Q8_0),
            f"blk.{b}.ffn_down.weight": ((inter, hidden), T.Q8_0),
        })  # fmt: skip
    assert got == want  # ggml order: innermost dimension first

    def field(key):
        f = r.fields[key]
        return f.contents()

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 2 and field("llama.embedding_length") == hidden
    assert field("llama.attention.head_count") == 4 and field("llama.attention.head_count_kv") == 2
    assert field("general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    vocab = gguf_tok.get_vocab()
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "gpt-2"  # a ByteLevel split with GPT-2's regex
    assert field("tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    assert len(field("tokenizer.ggml.merges")) > 0
    assert field("tokenizer.ggml.eos_token_id") == gguf_tok.eos_token_id
    assert field("tokenizer.ggml.bos_token_id") == gguf_tok.bos_token_id
    assert field("tokenizer.chat_template") == gguf_tok.chat_template
    # the original weight comes back from the file (f32 embedding rows, dequantized within q8_0 error)
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    back = torch.from_numpy(gguf.dequantize(emb.data, emb.tensor_type))
    assert torch.allclose(back, model.model.embed_tokens.weight, atol=2e-3)


@pytest.mark.parametrize("method", ["f32", "f16", "bf16", "q8_0"])
def test_export_llama_matches_transformers_gguf_loader(gguf_tok, tmp_path, method):
    model = _tiny("llama")
    path = save_pretrained_gguf(model, tmp_path, gguf_tok, quantization_method=method, progress=False)
    ids = _ids()
    diff = (_logits(_hf_gguf(path), ids) - _logits(model, ids)).abs().max().item()
    assert diff <= TOL[method], (method, diff)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "phi3"])
def test_export_other_families_match_transformers_gguf_loader(gguf_tok, tmp_path, family):
    model = _tiny(family)
    ids = _ids(1)
    for method in ("f32", "q8_0"):
        path = save_pretrained_gguf(model, tmp_path, gguf_tok, quantization_method=method, progress=False)
        loaded = _hf_gguf(path)
        diff = (_logits(loaded, ids) - _logits(model, ids)).abs().max().item()
        assert diff <= TOL[method], (family, method, diff)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_export_gemma2_3_match_transformers_gguf_loader(gguf_tok, tmp_path, family):
    # transformers' GGUF config table has no query_pre_attn_scalar: keep its default (256)
    model = _tiny(family, head_dim=8, sliding_window=4)
    path = save_pretrained_gguf(model, tmp_path, gguf_tok, quantization_method="f32", progress=False)
    ids = _ids(2)
    assert (_logits(_hf_gguf(path), ids) - _logits(model, ids)).abs().max().item() <= TOL["f32"]


def test_export_merges_lora_into_4bit_base(gguf_tok, tmp_path):
    src = tmp_path / "src"
    _tiny("llama").save_pretrained(src)
    gguf_tok.save_pretrained(src)
    model, tok = from_pretrained(
        src, load_in_4bit=True, dtype=torch.float32, device_map="cpu", progress=False
    )
    ids = _ids(3)
    base = _logits(model, ids)
    pm = get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False, random_state=0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pm.eval()
    want = _logits(pm, ids)
    assert (want - base).abs().max().item() > 1e-2  # the adapter changes the model
    path = pm.save_pretrained_gguf(tmp_path / "out", tok, quantization_method="f32", progress=False)
    got = _logits(_hf_gguf(path), ids)
    assert (got - want).abs().max().item() < 1e-4


def test_loaded_model_has_save_pretrained_gguf(gguf_tok, tmp_path):
    src = tmp_path / "src"
    ref = _tiny("llama")
    ref.save_pretrained(src)
    gguf_tok.save_pretrained(src)
    model, tok = from_pretrained(
        src, load_in_4bit=False, dtype=torch.float32, device_map="cpu", progress=False
    )
    path = model.save_pretrained_gguf(tmp_path / "out", tok, quantization_method="f16")
    assert path.name == "model-f16.gguf"
    ids = _ids(4)
    assert (_logits(_hf_gguf(path), ids) - _logits(ref, ids)).abs().max().item() <= TOL["f16"]


def test_unknown_quantization_method_lists_accepted(gguf_tok, tmp_path):
    with pytest.raises(ValueError, match=r"q4_k_m.*accepted.*'f16'.*'q8_0'"):
        save_pretrained_gguf(_tiny("llama"), tmp_path, gguf_tok, quantization_method="q4_k_m")
    assert not list(tmp_path.iterdir())


def test_failed_export_keeps_previous_file(gguf_tok, tmp_path, monkeypatch):
    model = _tiny("llama")
    path = save_pretrained_gguf(model, tmp_path, gguf_tok, quantization_method="f16", progress=False)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained_gguf(
            _tiny("llama", seed=1), tmp_path, gguf_tok, quantization_method="f16", progress=False
        )
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


# ------------------------------------------------------------------------------------ import
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_import_16bit_round_trip_is_exact(gguf_tok, tmp_path, family):
    model = _tiny(family)
    path = save_pretrained_gguf(model, tmp_path, gguf_tok, quantization_method="f32", progress=False)
    loaded, tok = FastLanguageModel.from_pretrained(
        str(path), load_in_4bit=False, dtype=torch.float32, device_map="cpu", progress=False
    )
    ids = _ids(5)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    # tokenizer and chat template from the metadata
    text = "the quick brown fox jumps"
    assert tok(text).input_ids == gguf_tok(text).input_ids
    assert tok.eos_token == gguf_tok.eos_token and tok.bos_token == gguf_tok.bos_token
    assert tok.chat_template == gguf_tok.chat_template


def test_import_4bit_equals_our_4bit_load_of_safetensors(gguf_tok, tmp_path):
    model = _tiny("llama")
    src = tmp_path / "src"
    model.save_pretrained(src)
    gguf_tok.save_pretrained(src)
    save_pretrained_gguf(model, tmp_path / "g", gguf_tok, quantization_method="f32", progress=False)
    kw = dict(load_in_4bit=True, dtype=torch.float32, device_map="cpu", progress=False)
    from_st, _ = from_pretrained(src, **kw)
    from_gguf, _ = from_pretrained(tmp_path / "g", gguf_file="model-f32.gguf", **kw)
    assert from_gguf.is_loaded_in_4bit
    ids = _ids(6)
    assert torch.equal(_logits(from_gguf, ids), _logits(from_st, ids))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_import_4bit_on_gpu_equals_safetensors_load_and_exports_back(gguf_tok, tmp_path):
    model = _tiny("llama")
    src = tmp_path / "src"
    model.save_pretrained(src)
    gguf_tok.save_pretrained(src)
    path = save_pretrained_gguf(model, tmp_path / "g", gguf_tok, quantization_method="f32", progress=False)
    kw = dict(load_in_4bit=True, dtype=torch.bfloat16, device_map="cuda:0", progress=False)
    from_st, _ = from_pretrained(src, **kw)
    from_gguf, tok = from_pretrained(path, **kw)
    ids = _ids(9).cuda()
    assert torch.equal(_logits(from_gguf, ids), _logits(from_st, ids))
    pm = get_peft_model(from_gguf, r=8, use_gradient_checkpointing=False, random_state=0)
    pm.eval()
    out = pm.save_pretrained_gguf(tmp_path / "back", tok, quantization_method="bf16", progress=False)
    back = _logits(_hf_gguf(out), ids.cpu())
    assert (back - _logits(pm, ids).cpu()).abs().max().item() <= 0.1  # bf16 compute on both sides


def test_import_quantized_export_matches_transformers(gguf_tok, tmp_path):
    """A q8_0 file: our import dequantizes exactly as transformers' GGUF loader does."""
    path = save_pretrained_gguf(
        _tiny("qwen2"), tmp_path, gguf_tok, quantization_method="q8_0", progress=False
    )
    ours, _ = from_pretrained(path, load_in_4bit=False, dtype=torch.float32, device_map="cpu", progress=False)
    ids = _ids(7)
    assert torch.allclose(_logits(ours, ids), _logits(_hf_gguf(path), ids), atol=1e-5)


def test_import_gemma_round_trip(gguf_tok, tmp_path):
    model = _tiny("gemma")
    path = save_pretrained_gguf(model, tmp_path, gguf_tok, quantization_method="f32", progress=False)
    loaded, _ = from_pretrained(
        path, load_in_4bit=False, dtype=torch.float32, device_map="cpu", progress=False
    )
    ids = _ids(8)
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=1e-5)


def test_gemma_export_stores_norms_as_one_plus_w(gguf_tok, tmp_path):
    model = _tiny("gemma")
    path = save_pretrained_gguf(model, tmp_path, gguf_tok, quantization_method="f32", progress=False)
    r = gguf.GGUFReader(str(path))
    norm = next(t for t in r.tensors if t.name == "blk.0.attn_norm.weight")
    want = model.model.layers[0].input_layernorm.weight.detach() + 1
    assert torch.equal(torch.from_numpy(norm.data.copy()), want)
    assert "output.weight" not in {t.name for t in r.tensors}  # tied head
    assert r.fields["gemma.attention.key_length"].contents() == 8


def test_import_errors(gguf_tok, tmp_path):
    save_pretrained_gguf(_tiny("llama"), tmp_path, gguf_tok, quantization_method="f16", progress=False)
    with pytest.raises(CheckpointNotFoundError, match=r"nope\.gguf.*model-f16\.gguf"):
        from_pretrained(tmp_path, gguf_file="nope.gguf", progress=False)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(CheckpointError, match="bad.gguf"):
        from_pretrained(bad, progress=False)


def _sentencepiece_style_tokenizer():
    """A byte-fallback BPE tokenizer with the "▁" word marker (llama 2 / gemma style)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    texts = ["the quick brown fox jumps over the lazy dog", "a tiny model reads a tiny book"] * 20
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False)
    )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")  # fmt: skip


def test_sentencepiece_style_tokenizer_round_trips(tmp_path):
    spm = _sentencepiece_style_tokenizer()
    path = save_pretrained_gguf(_tiny("llama"), tmp_path, spm, quantization_method="f32", progress=False)
    r = gguf.GGUFReader(str(path))
    assert r.fields["tokenizer.ggml.model"].contents() == "llama"
    vocab = spm.get_vocab()
    assert r.fields["tokenizer.ggml.tokens"].contents()[: len(vocab)] == sorted(vocab, key=vocab.get)
    byte_type = r.fields["tokenizer.ggml.token_type"].contents()[vocab["<0x41>"]]
    assert byte_type == gguf.TokenType.BYTE
    # llama.cpp merges the highest-scoring pair first: earlier merges must score higher
    merges = json.loads(spm.backend_tokenizer.to_str())["model"]["merges"]
    made = ["".join(m) if isinstance(m, list) else m.replace(" ", "") for m in merges[:6]]
    scores = [r.fields["tokenizer.ggml.scores"].contents()[vocab[t]] for t in made]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores), scores
    _, tok = from_pretrained(path, load_in_4bit=False, progress=False)
    text = "the quick brown fox jumps over a lazy book"
    assert tok(text).input_ids == spm(text).input_ids
    assert tok.decode(tok(text).input_ids) == text


def test_missing_gguf_package_names_the_extra(gguf_tok, tmp_path, monkeypatch):
    from rslora_fast.gguf_io import GGUFDependencyError

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(GGUFDependencyError, match=r"pip install 'rslora-fast\[gguf\]'"):
        save_pretrained_gguf(_tiny("llama"), tmp_path / "out", gguf_tok, quantization_method="f16")
    with pytest.raises(GGUFDependencyError, match=r"rslora-fast\[gguf\]"):
        from_pretrained(tmp_path / "m.gguf", progress=False)


def test_pre_tokenizer_name_detected_and_kept_through_an_import(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|bos|>", "<|eos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["the year 2024 and 1999 came", "a tiny model reads 42 books"] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>"
    )
    first = save_pretrained_gguf(
        _tiny("llama"), tmp_path / "a", fast, quantization_method="f16", progress=False
    )
    assert gguf.GGUFReader(str(first)).fields["tokenizer.ggml.pre"].contents() == "smollm"
    model, imported = from_pretrained(first, load_in_4bit=False, progress=False)
    again = model.save_pretrained_gguf(tmp_path / "b", imported, quantization_method="f16", progress=False)
    assert gguf.GGUFReader(str(again)).fields["tokenizer.ggml.pre"].contents() == "smollm"


def test_push_to_hub_gguf_uploads_the_file_the_save_writes(gguf_tok, fake_hub):
    from rslora_fast.gguf_io import push_to_hub_gguf

    url = push_to_hub_gguf(_tiny("llama"), "me/tiny-gguf", gguf_tok, "f16", private=True)
    assert url.endswith("/commit/abc")
    assert fake_hub["create"]["repo_id"] == "me/tiny-gguf" and fake_hub["create"]["private"] is True
    assert fake_hub["upload"]["files"] == {"model-f16.gguf"}


def test_push_to_hub_gguf_refuses_an_unknown_method_before_uploading(gguf_tok, fake_hub):
    from rslora_fast.gguf_io import push_to_hub_gguf

    with pytest.raises(ValueError, match="q4_k_m"):
        push_to_hub_gguf(_tiny("llama"), "me/x", gguf_tok, "q4_k_m")
    assert fake_hub == {}


def test_gguf_save_as_the_gemma3_notebook_calls_it(gguf_tok, tmp_path):
    """``save_pretrained_merged(dir, tokenizer)`` first, then ``save_pretrained_gguf(dir,
    quantization_type="Q8_0")`` without a tokenizer: the one saved in the folder is used."""
    model = _tiny("llama")
    with pytest.raises(ValueError, match="pass tokenizer="):
        save_pretrained_gguf(model, tmp_path, quantization_type="Q8_0", progress=False)
    gguf_tok.save_pretrained(tmp_path)
    path = save_pretrained_gguf(model, tmp_path, quantization_type="Q8_0", progress=False)
    assert path.name == "model-q8_0.gguf"
    r = gguf.GGUFReader(str(path))
    types = {t.tensor_type.name for t in r.tensors if len(t.shape) == 2}
    assert types == {"Q8_0"}


def test_an_adapter_trained_on_a_gguf_import_names_the_file_and_reloads_with_its_base(gguf_tok, tmp_path):
    path = save_pretrained_gguf(
        _tiny("llama"), tmp_path / "g", gguf_tok, quantization_method="f32", progress=False
    )
    kw = {"load_in_4bit": False, "dtype": torch.float32, "device_map": "cpu", "progress": False}
    base, _ = FastLanguageModel.from_pretrained(str(path), **kw)
    pm = get_peft_model(base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    assert recorded == str(path.resolve())
    reloaded, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), **kw)
    ids = _ids(3)
    assert torch.equal(_logits(reloaded, ids), _logits(pm, ids))
    # a GGUF export of the imported model is named by the file it came from, without ".gguf"
    out = save_pretrained_gguf(base, tmp_path / "again", gguf_tok, quantization_method="f32", progress=False)
    fields = gguf.GGUFReader(str(out)).fields["general.name"]
    assert bytes(fields.parts[fields.data[0]]).decode() == path.stem
