"""The fast decode engine against the transformers forward with its own KV cache.

The oracle is the wrapped transformers model on its generic path (our fused decoder forwards
removed, the fused LoRA op off), fed the prompt and then one token at a time through HF's
``DynamicCache`` with the position ids ``generate`` would give left-padded rows. The engine must
give the same float32 logits for the prompt's last position and for every following step: tiny
models of the llama, mistral, qwen2, qwen3 and gemma 1/2/3 families (2 layers, GQA 4 query / 2 KV
heads), LoRA on all seven projections with non-zero B, 16-bit (fp32 on CPU, bf16 on the GPU) and
4-bit bases, left-padded rows of different lengths.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from rslora_fast import get_peft_model
from rslora_fast.errors import InvalidArgumentError
from rslora_fast.generate.engine import FastEngine, why_not_fast
from rslora_fast.models.fast_decoder import install_fast_decoder, uninstall_fast_decoder
from rslora_fast.ops.lora_linear import fused_lora_disabled
from rslora_fast.peft.layer import LoraLinear
from rslora_fast.quant.linear4bit import Linear4bit

VOCAB = 96
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# variant -> config overrides (the family is the name up to "_"). mistral: a window shorter than
# prompt + steps (its mask matters); llama3: the llama3 rope scaling (the table must come from the
# model's rotary module); qwen2: biases on q/k/v; qwen3: per-head q/k norms; gemma: scaled
# embedding, (1 + w) norms, GeGLU; gemma2: sandwich norms, alternating sliding/full layers, final
# logit soft-cap, and with eager attention the attention soft-cap; gemma3: q/k norms and one rotary
# table per layer type.
_GEMMA_LAYERS = dict(head_dim=8, layer_types=["sliding_attention", "full_attention"], sliding_window=4)
VARIANTS = {
    "llama": {},
    "llama_rope3": dict(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        }
    ),
    "mistral": dict(sliding_window=5),
    "qwen2": {},
    "qwen3": dict(head_dim=8),
    "gemma": dict(head_dim=8),
    "gemma2": dict(**_GEMMA_LAYERS, final_logit_softcapping=2.0),
    "gemma2_eager": dict(
        **_GEMMA_LAYERS, attn_implementation="eager", attn_logit_softcapping=1.0, final_logit_softcapping=3.0
    ),
    "gemma3": _GEMMA_LAYERS,
}


def _config(variant: str, **overrides):
    import transformers

    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma": transformers.GemmaConfig,
        "gemma2": transformers.Gemma2Config,
        "gemma3": transformers.Gemma3TextConfig,
    }[variant.split("_")[0]]
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=0.2,  # scores large enough that positions and masks change the result
        attn_implementation="sdpa",
    )
    kw.update(VARIANTS.get(variant, {}))
    kw.update(overrides)
    return cls(**kw)


def _quantize(model):
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in TARGETS:
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, leaf, Linear4bit.from_linear(module))
    return model


def _model(variant="llama", dtype=torch.float32, device="cpu", quant=False, seed=0, **overrides):
    import transformers

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_config(_config(variant, **overrides)).to(device, dtype)
    if quant:
        _quantize(base)
    model = get_peft_model(base, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    _randomize_b(model, seed + 1)
    return model.eval()


def _randomize_b(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():  # non-zero B: every adapter changes the logits
            if isinstance(m, LoraLinear):
                w = m.lora_B.weight
                w.copy_((torch.randn(w.shape, generator=gen) * 0.1).to(w.device))


@contextlib.contextmanager
def _generic(model):
    inner = model.get_base_model()
    uninstall_fast_decoder(inner)
    try:
        with fused_lora_disabled():
            yield inner
    finally:
        install_fast_decoder(inner)


def _prompts(rows_lengths, total, device="cpu", seed=0):
    """Left-padded ids/mask ``[len(rows_lengths), total]``: row i has ``rows_lengths[i]`` real tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(rows_lengths), total), generator=gen)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(rows_lengths):
        mask[i, total - n :] = 1
        ids[i, : total - n] = 0  # the pad id: its value must not matter
    return ids.to(device), mask.to(device)


def _steps(rows, n, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, rows), generator=gen).to(device)


@torch.no_grad()
def _hf_logits(model, ids, mask, steps):
    """Float32 logits of the prompt's last position, then after each step token (HF's own cache)."""
    with _generic(model) as inner:
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        out = inner(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        logits, cache = [out.logits[:, -1].float()], out.past_key_values
        for tok in steps:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = mask.sum(-1, keepdim=True) - 1
            out = inner(
                input_ids=tok[:, None],
                attention_mask=mask,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
            )
            logits.append(out.logits[:, -1].float())
            cache = out.past_key_values
    return logits


def _engine_logits(engine, ids, mask, steps):
    logits = [engine.prefill(ids, mask)]
    logits += [engine.step(tok) for tok in steps]
    return logits


def _assert_close(got, want, atol, rtol=0.0):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.float32 and g.shape == w.shape, (i, g.dtype, g.shape, w.shape)
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, i=i: f"position {i}: {m}")


# ------------------------------------------------------------------------------ CPU equivalence
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_and_steps_match_hf_fp32(variant):
    model = _model(variant)
    ids, mask = _prompts([6, 3, 1], total=6)
    steps = _steps(3, 5)
    want = _hf_logits(model, ids, mask, steps)
    engine = FastEngine(model, max_batch=4, max_length=12)
    _assert_close(_engine_logits(engine, ids, mask, steps), want, atol=2e-5)


@pytest.mark.parametrize("variant", ["llama", "qwen3", "gemma3"])
def test_4bit_base_matches_hf(variant):
    model = _model(variant, quant=True)
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    ids, mask = _prompts([5, 2], total=5)
    steps = _steps(2, 4)
    want = _hf_logits(model, ids, mask, steps)
    engine = FastEngine(model, max_batch=2, max_length=9)
    _assert_close(_engine_logits(engine, ids, mask, steps), want, atol=2e-5)


def test_model_loaded_in_4bit_by_from_pretrained(tmp_path):
    """The user's path: a checkpoint loaded 4-bit by our loader, adapters from get_peft_model."""
    import transformers

    from rslora_fast.loading import from_pretrained

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(_config("qwen2")).save_pretrained(tmp_path)
    base, _ = from_pretrained(str(tmp_path), dtype=torch.float32, device_map="cpu", progress=False)
    assert sum(isinstance(m, Linear4bit) for m in base.modules()) == 14
    model = get_peft_model(base, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    _randomize_b(model, seed=3)
    model.eval()
    ids, mask = _prompts([5, 3], total=5)
    steps = _steps(2, 4)
    want = _hf_logits(model, ids, mask, steps)
    _assert_close(_engine_logits(FastEngine(model, 2, 9), ids, mask, steps), want, atol=2e-5)


def test_mistral_sliding_window_is_applied():
    """Keys older than the window are masked: the engine follows the windowed model, and the window
    changes the logits here (a full-attention engine would not match)."""
    ids, mask = _prompts([7], total=7)
    steps = _steps(1, 3)
    model = _model("mistral")
    windowed = _hf_logits(model, ids, mask, steps)
    full = _hf_logits(_model("mistral", sliding_window=None), ids, mask, steps)
    got = _engine_logits(FastEngine(model, max_batch=1, max_length=10), ids, mask, steps)
    _assert_close(got, windowed, atol=2e-5)
    assert not torch.allclose(got[-1], full[-1], atol=1e-3)


def test_tied_head_and_plain_model():
    """A model without adapters and with the head tied to the embedding."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config("llama", tie_word_embeddings=True)).eval()
    ids, mask = _prompts([4, 2], total=4)
    steps = _steps(2, 3)
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        want, cache = [out.logits[:, -1].float()], out.past_key_values
        for tok in steps:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(
                input_ids=tok[:, None],
                attention_mask=mask,
                position_ids=mask.sum(-1, keepdim=True) - 1,
                past_key_values=cache,
            )
            want.append(out.logits[:, -1].float())
            cache = out.past_key_values
    engine = FastEngine(model, max_batch=2, max_length=8)
    _assert_close(_engine_logits(engine, *_prompts([4, 2], total=4), steps), want, atol=2e-5)


def test_refresh_adapters_reads_the_current_weights_and_model_is_unchanged():
    model = _model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = FastEngine(model, max_batch=2, max_length=8)
    ids, mask = _prompts([4, 3], total=4)
    steps = _steps(2, 2)
    old = _hf_logits(model, ids, mask, steps)
    _assert_close(_engine_logits(engine, ids, mask, steps), old, atol=2e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    _randomize_b(model, seed=7)  # training moved the adapters on
    new = _hf_logits(model, ids, mask, steps)
    assert not torch.allclose(new[0], old[0], atol=1e-3)
    # prefill reads the live modules; the step reads the groups' copies until they are refreshed
    stale = _engine_logits(engine, ids, mask, steps)
    _assert_close(stale[:1], new[:1], atol=2e-5)
    assert not torch.allclose(stale[1], new[1], atol=1e-3)
    engine.refresh_adapters()
    _assert_close(_engine_logits(engine, ids, mask, steps), new, atol=2e-5)


def test_refresh_follows_adapters_switched_off_and_on():
    """``disable_adapter`` (and any other change of which modules or switches the engine read)
    makes the next refresh read the model again."""
    model = _model("qwen3")
    engine = FastEngine(model, max_batch=2, max_length=8)
    ids, mask = _prompts([4, 2], total=4)
    steps = _steps(2, 3)
    with_lora = _hf_logits(model, ids, mask, steps)
    with model.disable_adapter():
        without = _hf_logits(model, ids, mask, steps)
        engine.refresh_adapters()
        _assert_close(_engine_logits(engine, ids, mask, steps), without, atol=2e-5)
    assert not torch.allclose(with_lora[-1], without[-1], atol=1e-3)
    engine.refresh_adapters()
    _assert_close(_engine_logits(engine, ids, mask, steps), with_lora, atol=2e-5)


def test_batch_padded_to_bucket_and_prefill_again():
    """3 rows run in the 4-row bucket; a second, shorter batch reuses the cache after release."""
    model = _model("qwen2")
    engine = FastEngine(model, max_batch=5, max_length=10)
    assert engine.buckets == (1, 2, 4, 5)
    for lengths, total in (([5, 2, 4], 5), ([3], 3)):
        ids, mask = _prompts(lengths, total=total, seed=total)
        steps = _steps(len(lengths), 10 - total)  # up to the last slot
        _assert_close(
            _engine_logits(engine, ids, mask, steps), _hf_logits(model, ids, mask, steps), atol=2e-5
        )
        engine.release()


def test_built_in_inference_mode_runs_outside_it():
    """An engine made under ``torch.inference_mode`` (as some RL loops generate) keeps working
    outside it: adapter refreshes and cache writes are in place."""
    model = _model("llama")
    ids, mask = _prompts([4, 2], total=4)
    steps = _steps(2, 2)
    want = _hf_logits(model, ids, mask, steps)
    with torch.inference_mode():
        engine = FastEngine(model, max_batch=2, max_length=8)
        first = _engine_logits(engine, ids, mask, steps)
    engine.refresh_adapters()
    _assert_close(_engine_logits(engine, ids, mask, steps), want, atol=2e-5)
    _assert_close([t.clone() for t in first], want, atol=2e-5)


def test_cache_log_line_states_its_bytes(caplog):
    model = _model("llama")
    engine = FastEngine(model, max_batch=3, max_length=7)
    with caplog.at_level(logging.INFO, logger="rslora_fast.generate.engine"):
        engine.prefill(*_prompts([2], total=2))
    # 2 layers x (K, V) x [3 rows, 2 kv heads, 7 slots, head_dim 8] x 4 bytes (fp32)
    expected = 2 * 2 * 3 * 2 * 7 * 8 * 4
    lines = [r.getMessage() for r in caplog.records if "KV cache" in r.getMessage()]
    assert len(lines) == 1 and f"({expected} bytes)" in lines[0], lines


def test_bad_calls_are_refused_with_the_value():
    model = _model("llama")
    with pytest.raises(InvalidArgumentError, match="max_batch must be a positive int, got 0"):
        FastEngine(model, max_batch=0, max_length=8)
    engine = FastEngine(model, max_batch=2, max_length=4)
    with pytest.raises(InvalidArgumentError, match="call prefill first"):
        engine.step(torch.tensor([1]))
    with pytest.raises(InvalidArgumentError, match="3 rows; this engine takes 1 to 2"):
        engine.prefill(*_prompts([1, 1, 1], total=2))
    with pytest.raises(InvalidArgumentError, match="prompt length 5; this engine takes 1 to 4"):
        engine.prefill(*_prompts([5], total=5))
    engine.prefill(*_prompts([3, 2], total=3))
    with pytest.raises(InvalidArgumentError, match=r"tokens must be \[2\]"):
        engine.step(torch.tensor([1, 2, 3]))
    engine.step(torch.tensor([1, 2]))
    with pytest.raises(InvalidArgumentError, match="the cache is full"):
        engine.step(torch.tensor([1, 2]))


# ------------------------------------------------------------------------------ what falls back
def test_why_not_fast_accepts_the_families():
    for variant in VARIANTS:
        assert why_not_fast(_model(variant)) is None, variant
    assert why_not_fast(_model("llama", quant=True)) is None


def test_why_not_fast_names_what_it_does_not_handle():
    import transformers

    phi3 = transformers.AutoModelForCausalLM.from_config(
        transformers.Phi3Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
        )
    )
    assert "model type 'phi3'" in why_not_fast(phi3)
    dynamic = _model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert "rope type 'dynamic'" in why_not_fast(dynamic)
    relu = _model("llama", hidden_act="relu")
    assert "hidden_act='relu'" in why_not_fast(relu)
    mixed = _model("llama", dtype=torch.bfloat16)
    mixed.get_base_model().model.norm.float()  # as loaders that keep norms in float32 leave it
    assert "norm weights in" in why_not_fast(mixed)
    with pytest.raises(InvalidArgumentError, match="rope type 'dynamic'"):
        FastEngine(dynamic, max_batch=1, max_length=4)


def test_why_not_fast_refuses_hf_peft_adapters():
    peft = pytest.importorskip("peft")
    import transformers

    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(_config("llama"))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert "only rslora_fast's LoraLinear adapters are read" in why_not_fast(model)


# ------------------------------------------------------------------------------ CUDA: the graph
@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("quant", [False, True])
def test_graph_replay_equals_eager_step(quant):
    """The captured step replays the eager step's math exactly (fp32 model on the GPU)."""
    model = _model("qwen3", device="cuda", quant=quant)
    ids, mask = _prompts([6, 2, 4], total=6, device="cuda")
    steps = _steps(3, 6, device="cuda")
    graphed = FastEngine(model, max_batch=4, max_length=12)
    eager = FastEngine(model, max_batch=4, max_length=12, cuda_graphs=False)
    got = _engine_logits(graphed, ids, mask, steps)
    assert set(graphed._graphs) == {4}
    want = _engine_logits(eager, ids, mask, steps)
    _assert_close(got, want, atol=1e-5)
    _assert_close(got, _hf_logits(model, ids, mask, steps), atol=1e-3)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen2", "qwen3", "gemma2_eager", "gemma3"])
def test_bf16_buckets_match_hf_within_rounding(variant):
    """bf16 on the GPU, several buckets captured on one engine, each against HF's bf16 forward."""
    model = _model(variant, dtype=torch.bfloat16, device="cuda")
    engine = FastEngine(model, max_batch=8, max_length=16)
    for lengths in ([5], [5, 3, 1], [2, 5, 4, 3, 5, 1, 2, 5]):
        ids, mask = _prompts(lengths, total=5, device="cuda", seed=len(lengths))
        steps = _steps(len(lengths), 8, device="cuda")
        got = _engine_logits(engine, ids, mask, steps)
        want = _hf_logits(model, ids, mask, steps)
        scale = max(w.abs().max().item() for w in want)
        _assert_close(got, want, atol=0.05 * scale, rtol=0.05)
    assert set(engine._graphs) == {1, 4, 8}


@pytest.mark.cuda
@cuda
def test_graph_sees_refreshed_adapters():
    model = _model("llama", device="cuda")
    engine = FastEngine(model, max_batch=2, max_length=8)
    ids, mask = _prompts([4, 3], total=4, device="cuda")
    steps = _steps(2, 3, device="cuda")
    engine.prefill(ids, mask)
    _randomize_b(model, seed=9)
    engine.refresh_adapters()  # in place: the captured graph reads the new values
    _assert_close(_engine_logits(engine, ids, mask, steps), _hf_logits(model, ids, mask, steps), atol=1e-3)
