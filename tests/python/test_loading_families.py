"""from_pretrained on a tiny checkpoint of every decoder-only text family we claim.

Each checkpoint (random weights, hidden 64, 2 layers) is written by transformers itself. References:
plain transformers (16-bit loads: identical logits in float32 and in bfloat16) and transformers +
bitsandbytes on the CPU (4-bit loads: the same packed bytes for every quantized linear, logits equal
to a dense twin holding bitsandbytes' own dequantized weights, and close to bitsandbytes' forward).
The families differ in their non-persistent buffers (Gemma's ``embed_scale``, Gemma 3's per-layer
-type RoPE tables, Phi-3's partial rotary), norms and fused projections.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_loading import BNB_CPU_ATOL, _bnb_cfg, _decode_bnb, _tokenizer  # noqa: E402

from rslora_fast.loading import CheckpointError, from_pretrained  # noqa: E402
from rslora_fast.quant.linear4bit import Linear4bit  # noqa: E402

# Sizes are multiples of 64 so that bitsandbytes' CPU 4-bit matmul accepts them.
BASE = dict(
    vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128,
)  # fmt: skip
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 4}),
    "gemma3_text": (
        "Gemma3TextConfig",
        {"head_dim": 16, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    "phi3": (
        "Phi3Config",
        {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "partial_rotary_factor": 0.5},
    ),
    "granite": ("GraniteConfig", {"eos_token_id": 2, "embedding_multiplier": 2.0, "logits_scaling": 4.0}),
    "olmo2": ("Olmo2Config", {"pad_token_id": 0, "eos_token_id": 2}),
}
# Longer than gemma2/gemma3's sliding window, so the sliding layers really mask.
IDS = torch.tensor([[1, 5, 9, 3, 17, 40, 2, 7, 11, 30], [4, 4, 8, 15, 16, 23, 42, 8, 1, 0]])


def write_family(path, family: str):
    """Save a tiny random checkpoint of ``family`` (and a tokenizer) with transformers; return its dir."""
    cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**BASE, **extra})
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # default init leaves tiny projections; widen them so 4-bit errors show
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    return request.param, write_family(tmp_path_factory.mktemp(request.param), request.param)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_16bit_load_equals_transformers(family_dir, dtype):
    family, path = family_dir
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    ours, _ = from_pretrained(str(path), load_in_4bit=False, dtype=dtype, device_map="cpu", progress=False)
    assert type(ours) is type(ref)
    # Every buffer transformers computes (inv_freq, embed_scale, per-layer-type tables) is the same.
    ref_bufs = dict(ref.named_buffers())
    our_bufs = dict(ours.named_buffers())
    assert set(our_bufs) == set(ref_bufs), family
    for name, buf in ref_bufs.items():
        assert buf.dtype == our_bufs[name].dtype and torch.equal(buf, our_bufs[name]), (family, name)
    assert torch.equal(_logits(ours), _logits(ref)), family


def test_4bit_load_equals_bitsandbytes(family_dir):
    pytest.importorskip("bitsandbytes")
    family, path = family_dir
    ours, _ = from_pretrained(str(path), dtype=torch.float32, device_map="cpu", progress=False)
    bnb = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), quantization_config=_bnb_cfg(), device_map="cpu", dtype=torch.float32
    )
    bnb_layers = {n: m for n, m in bnb.named_modules() if type(m).__name__ == "Linear4bit"}
    our_layers = {n: m for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    assert our_layers and set(bnb_layers) == set(our_layers), family
    twin = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for n, m in our_layers.items():  # compared before bnb's CPU forward repacks its weights
        assert torch.equal(m.weight.view(-1), bnb_layers[n].weight.data.view(-1)), (family, n)
        twin.get_submodule(n).weight.data = _decode_bnb(m.weight, bnb_layers[n].weight.quant_state).float()
    got = _logits(ours)
    assert torch.allclose(got, _logits(twin), atol=1e-5), (family, (got - _logits(twin)).abs().max())
    assert (got - _logits(bnb)).abs().max() < BNB_CPU_ATOL, family


def test_lora_training_loss_equals_the_models_own(family_dir):
    """get_peft_model's training forward (fast decoder path and fused loss where they apply) gives
    the loss transformers computes from the model's own logits (Granite divides them by
    ``logits_scaling``, Gemma 2 soft-caps them)."""
    from rslora_fast import FastLanguageModel

    family, path = family_dir
    model, _ = from_pretrained(
        str(path), load_in_4bit=False, dtype=torch.float32, device_map="cpu", progress=False
    )
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if family == "phi3" else None
    kw = {"target_modules": targets} if targets else {}
    peft_model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, **kw).train()
    inner = peft_model.get_base_model()
    with torch.no_grad():
        loss = peft_model(input_ids=IDS, labels=IDS).loss
        logits = inner(input_ids=IDS).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten())
    assert torch.allclose(loss, want, rtol=1e-5, atol=1e-6), (family, loss.item(), want.item())


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.cuda
def test_cuda_4bit_load_matches_bitsandbytes(family_dir):
    """On the GPU (our quantize kernel, bf16 compute): same packed bytes as bitsandbytes, logits close."""
    pytest.importorskip("bitsandbytes")
    family, path = family_dir
    ours, _ = from_pretrained(str(path), dtype=torch.bfloat16, device_map="cuda", progress=False)
    cfg = _bnb_cfg()
    cfg.bnb_4bit_compute_dtype = torch.bfloat16
    bnb = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), quantization_config=cfg, device_map="cuda", dtype=torch.bfloat16
    )
    bnb_layers = {n: m for n, m in bnb.named_modules() if type(m).__name__ == "Linear4bit"}
    our_layers = {n: m for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    assert our_layers and set(bnb_layers) == set(our_layers), family
    for n, m in our_layers.items():
        assert torch.equal(m.weight.view(-1), bnb_layers[n].weight.data.view(-1)), (family, n)
    ids = IDS.cuda()
    with torch.no_grad():
        got, want = ours(ids).logits.float(), bnb(ids).logits.float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max(), (family, (got - want).abs().max())


def test_buffers_the_initializer_leaves_are_rebuilt_or_named(tmp_path, monkeypatch):
    """A buffer the model's ``_init_weights`` does not compute (older or remote code) is taken from
    its module rebuilt from the config when that works (Llama's rotary table), else named."""
    llama = write_family(tmp_path / "llama", "llama")
    gemma = write_family(tmp_path / "gemma", "gemma")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32).eval()
    want = _logits(ref)
    monkeypatch.setattr(transformers.LlamaPreTrainedModel, "_init_weights", lambda self, module: None)
    monkeypatch.setattr(transformers.GemmaPreTrainedModel, "_init_weights", lambda self, module: None)
    ours, _ = from_pretrained(
        str(llama), load_in_4bit=False, dtype=torch.float32, device_map="cpu", progress=False
    )
    assert torch.equal(ours.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    assert torch.equal(_logits(ours), want)
    with pytest.raises(CheckpointError, match=r"embed_scale.*initialize_weights does not compute"):
        from_pretrained(str(gemma), load_in_4bit=False, dtype=torch.float32, device_map="cpu", progress=False)
