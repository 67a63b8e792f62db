"""The generate loop (``rslora_fast.generate``) against HF ``generate`` on tiny models.

On CPU the fast path runs only when forced (``RSLORA_FAST_GENERATE=force``); every comparison here
is against transformers' own ``generate`` on the same model (the oracle), and a spy on the engine
shows which path ran. The ``cuda`` tests take the fast path by default on the GPU (the fast engine
once it is built, the plain engine until then).
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

from rslora_fast import FastLanguageModel, get_peft_model
from rslora_fast.generate import engine as fast_engine
from rslora_fast.generate import fast_generate, select
from rslora_fast.generate.reference_engine import ReferenceEngine

EOS, PAD, BOS, VOCAB = 5, 0, 1, 128
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tiny(family="llama", vocab=VOCAB, seed=0, **extra):
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
    cfg = cls(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, eos_token_id=EOS,
        pad_token_id=PAD, bos_token_id=BOS, initializer_range=0.5, **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).float().eval()


def _prompts(pads=(3, 0, 1), length=7, seed=1, device="cpu"):
    """Left-padded prompts: row i has ``pads[i]`` pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, VOCAB, (len(pads), length), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
    ids[mask == 0] = PAD
    return ids.to(device), mask.to(device)


def _hf(model, *args, **kwargs):
    """transformers' own ``generate`` (whatever our switch did to ``model.generate``)."""
    return type(model).generate(model, *args, **kwargs)


@pytest.fixture
def forced(monkeypatch):
    """The fast path on CPU, a fresh log-once memory, and a count of engine prefills (either engine)."""
    monkeypatch.setenv("RSLORA_FAST_GENERATE", "force")
    monkeypatch.setattr(select, "_logged", set())
    calls = []

    def spy_on(engine_class):
        original = engine_class.prefill

        def spy(self, input_ids, attention_mask):
            calls.append(tuple(input_ids.shape))
            return original(self, input_ids, attention_mask)

        monkeypatch.setattr(engine_class, "prefill", spy)

    spy_on(ReferenceEngine)  # the plain engine
    spy_on(fast_engine.FastEngine)  # the fast one, for the families it covers
    return calls


# ------------------------------------------------------------------ greedy equality


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_equals_hf_generate_with_left_padding_of_different_lengths(forced, family):
    model = _tiny(family)
    ids, mask = _prompts()
    want = _hf(model, input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = fast_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert forced == [(3, 7)]
    assert got.dtype == torch.long and torch.equal(got, want)


def test_greedy_with_a_lora_adapter_equals_hf_and_goes_through_the_peft_model(forced):
    pm = get_peft_model(
        _tiny(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]
    )
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # non-zero B: the adapter changes the output
    inner = pm.base_model.model
    ids, mask = _prompts()
    FastLanguageModel.for_inference(pm)
    got = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10)
    want = _hf(inner, input_ids=ids, attention_mask=mask, max_new_tokens=10)
    assert forced == [(3, 7)] and torch.equal(got, want)
    without = _hf(_tiny(), input_ids=ids, attention_mask=mask, max_new_tokens=10)
    assert not torch.equal(without, want)  # the adapter took part


def test_eos_stops_a_row_and_pads_it(forced):
    model = _tiny()
    ids, mask = _prompts()
    free = _hf(model, input_ids=ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    stop = int(free[0, ids.shape[1] + 2])  # row 0's third new token becomes the end of sequence
    want = _hf(
        model, input_ids=ids, attention_mask=mask, max_new_tokens=10, eos_token_id=stop, pad_token_id=PAD
    )
    got = fast_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=10, eos_token_id=stop,
                        pad_token_id=PAD)  # fmt: skip
    assert torch.equal(got, want)
    row = got[0, ids.shape[1] :].tolist()
    first = row.index(stop)
    assert first <= 2 and all(t == PAD for t in row[first + 1 :])


def test_eos_as_a_list_and_from_the_generation_config(forced):
    model = _tiny()
    ids, mask = _prompts()
    free = _hf(model, input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    stops = [int(free[1, ids.shape[1] + 1]), int(free[2, ids.shape[1] + 3])]
    for kw in ({"eos_token_id": stops}, {}):
        if not kw:
            model.generation_config.eos_token_id = stops
        want = _hf(model, input_ids=ids, attention_mask=mask, max_new_tokens=8, **kw)
        got = fast_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=8, **kw)
        assert torch.equal(got, want)
        assert got.shape[1] < ids.shape[1] + 8 or (got[:, ids.shape[1] :] == PAD).any()


def test_max_length_min_new_tokens_and_their_precedence(forced):
    model = _tiny()
    ids, mask = _prompts()
    for kw in (
        {"max_length": 11},
        {"max_length": 30, "max_new_tokens": 3},
        {"min_new_tokens": 6, "max_new_tokens": 8},
    ):
        want = _hf(model, input_ids=ids, attention_mask=mask, **kw)
        got = fast_generate(model, input_ids=ids, attention_mask=mask, **kw)
        assert torch.equal(got, want), kw
    assert fast_generate(model, input_ids=ids, attention_mask=mask, max_length=11).shape == (3, 11)
    blocked = fast_generate(model, input_ids=ids[:1], attention_mask=mask[:1], min_new_tokens=6, max_new_tokens=6,
                            eos_token_id=list(range(VOCAB // 2)))  # fmt: skip
    assert blocked.shape == (1, 13) and not set(blocked[0, 7:].tolist()) & set(range(VOCAB // 2))


def test_prompt_without_attention_mask_and_positional_arguments(forced):
    model = _tiny()
    ids, _ = _prompts(pads=(0, 0))
    assert torch.equal(fast_generate(model, ids, max_new_tokens=5), _hf(model, ids, max_new_tokens=5))
    gc = transformers.GenerationConfig(max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(fast_generate(model, ids, gc), _hf(model, ids, gc))
    assert forced == [(2, 7), (2, 7)]


# ------------------------------------------------------------------ stop strings, streamer


@pytest.fixture(scope="module")
def text_model():
    from rslora_fast.demo import build_demo_tokenizer

    tok = build_demo_tokenizer()
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.5,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).float().eval(), tok


def _stop_string(tok, new_tokens):
    """Two generated tokens from the middle of a row whose text is plain letters: a stop string."""
    for k in range(3, len(new_tokens) - 1):
        text = tok.decode(new_tokens[k : k + 2])
        if text.isascii() and text.strip().isalnum() and len(text.strip()) >= 2:
            return text.strip()
    raise AssertionError(f"no plain text in {tok.decode(new_tokens)!r}")


def test_stop_strings_stop_like_hf(forced, text_model):
    model, tok = text_model
    enc = tok(["the cat sat", "a dog"], return_tensors="pt", padding=True, padding_side="left")
    free = _hf(model, **enc, max_new_tokens=16)
    stop = _stop_string(tok, free[0, enc["input_ids"].shape[1] :])
    kw = dict(max_new_tokens=16, stop_strings=[stop], tokenizer=tok)
    want = _hf(model, **enc, **kw)
    got = fast_generate(model, **enc, **kw)
    assert torch.equal(got, want) and forced == [tuple(enc["input_ids"].shape)]
    assert stop in tok.decode(got[0, enc["input_ids"].shape[1] :])
    assert got.shape[1] < free.shape[1] or (got[0] != free[0]).any()


class _Collect(transformers.TextStreamer):
    def __init__(self, tok):
        super().__init__(tok, skip_prompt=False)
        self.text = []
        self.ended = 0

    def on_finalized_text(self, text, stream_end=False):
        self.text.append(text)
        self.ended += int(stream_end)


def test_streamer_receives_the_same_text(forced, text_model):
    model, tok = text_model
    enc = tok(["the cat sat"], return_tensors="pt")
    ours, theirs = _Collect(tok), _Collect(tok)
    got = fast_generate(model, **enc, max_new_tokens=9, streamer=ours)
    want = _hf(model, **enc, max_new_tokens=9, streamer=theirs)
    assert torch.equal(got, want)
    assert "".join(ours.text) == "".join(theirs.text) and ours.ended == 1 and len(forced) == 1
    assert "".join(ours.text) == tok.decode(got[0])


# ------------------------------------------------------------------ sampling


def test_sampling_with_a_fixed_seed_is_reproducible_and_matches_hf(forced):
    model = _tiny()
    ids, mask = _prompts()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True)
    warps = ({"temperature": 0.7, "top_k": 20, "top_p": 0.9}, {"repetition_penalty": 1.3, "min_p": 0.05},
             {"temperature": 1.5, "top_k": 0})  # fmt: skip
    for warp in warps:
        torch.manual_seed(3)
        first = fast_generate(model, **kw, **warp)
        torch.manual_seed(3)
        again = fast_generate(model, **kw, **warp)
        torch.manual_seed(3)
        want = _hf(model, **kw, **warp)
        assert torch.equal(first, again) and torch.equal(first, want), warp
    torch.manual_seed(4)
    other = fast_generate(model, **kw, temperature=1.5, top_k=0)
    assert not torch.equal(other, first)


def test_top_k_one_and_a_tiny_top_p_are_greedy(forced):
    model = _tiny()
    ids, mask = _prompts()
    greedy = fast_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    for warp in ({"top_k": 1}, {"top_p": 1e-6, "top_k": 0}):
        torch.manual_seed(9)
        sampled = fast_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True,
                                temperature=3.0, **warp)  # fmt: skip
        assert torch.equal(sampled, greedy), warp


def test_num_return_sequences_repeats_rows_like_hf(forced):
    model = _tiny()
    ids, mask = _prompts(pads=(2, 0))
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, num_return_sequences=3)
    torch.manual_seed(7)
    got = fast_generate(model, **kw)
    torch.manual_seed(7)
    want = _hf(model, **kw)
    assert got.shape == (6, 13) and torch.equal(got, want)
    assert torch.equal(got[:3, :7], ids[:1].expand(3, -1))


def test_generation_config_and_return_dict_like_hf(forced):
    model = _tiny()
    ids, mask = _prompts()
    gc = transformers.GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
                                       return_dict_in_generate=True, output_scores=True, output_logits=True)  # fmt: skip
    got = fast_generate(model, input_ids=ids, attention_mask=mask, generation_config=gc)
    want = _hf(model, input_ids=ids, attention_mask=mask, generation_config=gc)
    assert forced == [(3, 7)]
    assert type(got) is type(want) and torch.equal(got.sequences, want.sequences)
    assert len(got.scores) == len(want.scores) == len(got.logits)
    for ours, theirs in zip(got.scores + got.logits, want.scores + want.logits, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ what falls back


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"num_beams": 2}, "num_beams=2"),
        ({"output_hidden_states": True, "return_dict_in_generate": True}, "output_hidden_states"),
        ({"foo_input": 1}, "foo_input"),
    ],
)
def test_unsupported_keywords_go_to_hf_generate_with_a_log_line(forced, caplog, kwargs, named):
    model = _tiny()
    ids, mask = _prompts()
    caplog.set_level(logging.INFO, logger="rslora_fast.generate")
    if "foo_input" in kwargs:
        with pytest.raises(ValueError, match="foo_input"):  # HF's own check of unknown keywords
            fast_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=4, **kwargs)
    else:
        got = fast_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=4, **kwargs)
        want = _hf(model, input_ids=ids, attention_mask=mask, max_new_tokens=4, **kwargs)
        got, want = getattr(got, "sequences", got), getattr(want, "sequences", want)
        assert torch.equal(got, want)
    assert forced == []
    lines = [r.getMessage() for r in caplog.records if "transformers' generate is used" in r.getMessage()]
    assert len(lines) == 1 and named in lines[0]


def test_an_assistant_model_goes_to_hf_generate_with_a_log_line(forced, caplog):
    model = _tiny()
    ids, mask = _prompts(pads=(0,))
    caplog.set_level(logging.INFO, logger="rslora_fast.generate")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5)
    got = fast_generate(model, **kw, assistant_model=_tiny(seed=1))
    assert torch.equal(got, _hf(model, **kw)) and forced == [] and "assistant_model given" in caplog.text


def test_a_changed_transformers_helper_goes_to_hf_generate_with_a_log_line(forced, caplog, monkeypatch):
    model = _tiny()
    ids, mask = _prompts()

    def changed(*args, **kwargs):
        raise TypeError("unexpected keyword argument 'encoder_input_ids'")

    monkeypatch.setattr(model, "_get_logits_processor", changed)
    caplog.set_level(logging.INFO, logger="rslora_fast.generate")
    with pytest.raises(TypeError, match="encoder_input_ids"):  # HF's generate meets the same change
        fast_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=3)
    assert forced == [] and "could not be planned (TypeError" in caplog.text


def test_right_padding_goes_to_hf_generate_with_a_log_line(forced, caplog):
    model = _tiny()
    ids, mask = _prompts(pads=(0, 0))
    mask[0, -2:] = 0
    caplog.set_level(logging.INFO, logger="rslora_fast.generate")
    got = fast_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=3)
    assert torch.equal(got, _hf(model, input_ids=ids, attention_mask=mask, max_new_tokens=3))
    assert forced == [] and "left padding" in caplog.text


def test_the_opt_out_and_a_bad_value(forced, monkeypatch):
    model = _tiny()
    ids, mask = _prompts()
    monkeypatch.setenv("RSLORA_FAST_GENERATE", "off")
    fast_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=3)
    monkeypatch.setenv("RSLORA_FAST_GENERATE", "auto")  # CPU: the plain path, silently
    fast_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=3)
    assert forced == []
    monkeypatch.setenv("RSLORA_FAST_GENERATE", "fast")
    with pytest.raises(ValueError, match=r"RSLORA_FAST_GENERATE='fast'.*auto, off, force"):
        fast_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=3)


def test_a_call_longer_than_max_seq_length_goes_to_hf(forced, caplog):
    model = _tiny()
    model.max_seq_length = 10
    ids, mask = _prompts()
    caplog.set_level(logging.INFO, logger="rslora_fast.generate")
    got = fast_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=4)
    assert forced == [] and got.shape == (3, 11) and "max_seq_length 10" in caplog.text


# ------------------------------------------------------------------ engine selection


class _SpyFast(ReferenceEngine):
    """Stands in for the fast engine: counts builds, refreshes and releases."""

    built: list = []
    refreshed: list = []
    released: list = []

    def __init__(self, model, max_batch, max_length):
        super().__init__(model, max_batch, max_length)
        _SpyFast.built.append((max_batch, max_length))

    def refresh_adapters(self):
        weights = [p.detach().clone() for n, p in self.model.named_parameters() if "lora_B" in n]
        _SpyFast.refreshed.append(weights)

    def release(self):
        _SpyFast.released.append(self)
        super().release()


@pytest.fixture
def spy_fast(monkeypatch, forced):
    for name in ("built", "refreshed", "released"):
        monkeypatch.setattr(_SpyFast, name, [])
    monkeypatch.setattr(fast_engine, "why_not_fast", lambda model: None)
    monkeypatch.setattr(fast_engine, "FastEngine", _SpyFast)
    return _SpyFast


def test_the_fast_engine_is_kept_bucketed_and_rebuilt_when_too_small(spy_fast):
    model = _tiny()
    model.max_seq_length = 100
    ids, mask = _prompts()
    fast_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=4)
    fast_generate(model, input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=6)
    assert spy_fast.built == [(4, 100)] and len(spy_fast.refreshed) == 2
    fast_generate(model, input_ids=ids.repeat(2, 1), attention_mask=mask.repeat(2, 1), max_new_tokens=4)
    assert spy_fast.built == [(4, 100), (8, 100)] and len(spy_fast.released) == 1
    assert (
        select.batch_bucket(1) == 1 and select.batch_bucket(5) == 8 and select.length_bucket(300, None) == 512
    )


def test_a_fast_engine_that_fails_to_build_leaves_the_plain_one(forced, monkeypatch, caplog):
    def broken(model, rows, tokens):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(fast_engine, "why_not_fast", lambda model: None)
    monkeypatch.setattr(fast_engine, "FastEngine", broken)
    caplog.set_level(logging.INFO, logger="rslora_fast.generate")
    model = _tiny()
    ids, mask = _prompts()
    got = fast_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=4)
    assert torch.equal(got, _hf(model, input_ids=ids, attention_mask=mask, max_new_tokens=4))
    assert forced == [(3, 7)] and "could not be built (out of memory)" in caplog.text


# ------------------------------------------------------------------ the switch


def test_for_inference_and_for_training_switch_generate(spy_fast):
    model = _tiny()
    ids, mask = _prompts()
    FastLanguageModel.for_inference(model)
    with torch.enable_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4)
    assert len(spy_fast.built) == 1 and torch.equal(
        got, _hf(model, input_ids=ids, attention_mask=mask, max_new_tokens=4)
    )
    FastLanguageModel.for_training(model)
    assert len(spy_fast.released) == 1 and "generate" not in model.__dict__
    with torch.enable_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4)
    assert len(spy_fast.built) == 1 and len(spy_fast.refreshed) == 1


def test_peft_model_generate_takes_the_fast_path_without_gradients_only(spy_fast):
    pm = get_peft_model(_tiny(), r=4, lora_alpha=8)
    pm.train()
    ids, mask = _prompts()
    with torch.enable_grad():
        pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3)
    assert spy_fast.refreshed == []
    with torch.no_grad():
        pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3)
    assert len(spy_fast.refreshed) == 1


def test_grpo_trainer_generates_through_the_fast_path_with_fresh_adapters(
    spy_fast, text_model, tmp_path, monkeypatch
):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    import rslora_fast.generate.loop as loop

    base, tok = text_model
    calls = []
    original = loop.fast_generate

    def counted(model, *args, **kwargs):
        calls.append(kwargs.get("generation_config"))
        return original(model, *args, **kwargs)

    monkeypatch.setattr("rslora_fast.generate.fast_generate", counted)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(base.config).float()
    pm = get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=True)
    args = trl.GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, max_steps=2, use_cpu=True,
        report_to=[], max_completion_length=4, disable_tqdm=True, save_strategy="no", learning_rate=0.05,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=pm, reward_funcs=lambda completions, **_: [float(len(c)) for c in completions], args=args,
        train_dataset=datasets.Dataset.from_list([{"prompt": "the cat"}, {"prompt": "a dog ran"}] * 4),
        processing_class=tok,
    )  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 2
    assert len(calls) == 2 and len(spy_fast.refreshed) == 2 and len(spy_fast.built) == 1
    first, second = spy_fast.refreshed
    assert any(not torch.equal(a, b) for a, b in zip(first, second, strict=True))  # trained in between


# ------------------------------------------------------------------ on the GPU (the fast path by default)


def _cuda_model(dtype=torch.bfloat16):
    return _tiny().to("cuda", dtype)


@pytest.fixture
def opened(monkeypatch):
    """The default mode (the fast path on CUDA) and a record of the engines the loop opened."""
    monkeypatch.delenv("RSLORA_FAST_GENERATE", raising=False)
    calls = []
    original = select.open_engine

    def spy(model, batch, length, cap=None):
        calls.append(batch)
        return original(model, batch, length, cap)

    monkeypatch.setattr(select, "open_engine", spy)
    return calls


@cuda
@pytest.mark.cuda
def test_cuda_greedy_equals_hf_generate_in_bf16_with_left_padding(opened):
    model = get_peft_model(_cuda_model(), r=4, lora_alpha=8)
    FastLanguageModel.for_inference(model)
    inner = model.base_model.model
    ids, mask = _prompts(device="cuda")
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16)
    want = _hf(inner, input_ids=ids, attention_mask=mask, max_new_tokens=16)
    assert torch.equal(got, want) and opened == [3]


@cuda
@pytest.mark.cuda
def test_cuda_stop_strings_and_eos_like_hf(opened, text_model):
    base, tok = text_model
    model = transformers.AutoModelForCausalLM.from_config(base.config).to("cuda", torch.bfloat16)
    model.load_state_dict(base.state_dict())
    FastLanguageModel.for_inference(model)
    enc = tok(["the cat sat", "a dog"], return_tensors="pt", padding=True, padding_side="left").to("cuda")
    free = _hf(model, **enc, max_new_tokens=16)
    stop = _stop_string(tok, free[0, enc["input_ids"].shape[1] :].cpu())
    for kw in ({"stop_strings": [stop], "tokenizer": tok}, {"eos_token_id": int(free[1, -5])}):
        got = model.generate(**enc, max_new_tokens=16, **kw)
        assert torch.equal(got, _hf(model, **enc, max_new_tokens=16, **kw)), kw
    assert opened == [2, 2]


# ------------------------------------------------------------------ merge_lora=True


def _peft_with_nonzero_b(model, seed=5):
    pm = get_peft_model(
        model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # non-zero B: the adapter changes the output
    return pm


def test_merged_generation_equals_unmerged_and_for_training_restores_the_base(forced, caplog):
    pm = _peft_with_nonzero_b(_tiny())
    inner = pm.base_model.model
    ids, mask = _prompts()
    bases = {n: p.detach().clone() for n, p in inner.named_parameters() if "lora_" not in n}
    FastLanguageModel.for_inference(pm)
    unmerged = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10)
    FastLanguageModel.for_training(pm)
    with caplog.at_level(logging.INFO, logger="rslora_fast.peft.inference_merge"):
        FastLanguageModel.for_inference(pm, merge_lora=True)
    assert "merged 8 LoRA adapters" in caplog.text  # 4 modules in each of 2 layers
    changed = [n for n, p in inner.named_parameters() if n in bases and not torch.equal(p, bases[n])]
    assert len(changed) == 2 * 4  # q, v, gate, down of both layers now hold the update
    merged = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(merged, unmerged)
    FastLanguageModel.for_inference(pm)  # unmerged again: the original bases are back
    assert all(torch.equal(p, bases[n]) for n, p in inner.named_parameters() if n in bases)
    FastLanguageModel.for_inference(pm, merge_lora=True)
    FastLanguageModel.for_training(pm)
    assert all(torch.equal(p, bases[n]) for n, p in inner.named_parameters() if n in bases)
    loss = pm(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in pm.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)  # the adapter trains again


def test_training_while_merged_for_inference_raises_and_says_what_to_call(forced):
    pm = _peft_with_nonzero_b(_tiny())
    ids, mask = _prompts()
    FastLanguageModel.for_inference(pm, merge_lora=True)
    pm.train()
    with pytest.raises(RuntimeError, match=r"for_training"):
        pm(input_ids=ids, attention_mask=mask, labels=ids)
    with torch.no_grad():
        pm(input_ids=ids, attention_mask=mask)  # a forward without gradients is fine


def test_merge_lora_refuses_a_4bit_base_before_changing_anything(forced, monkeypatch):
    pm = _peft_with_nonzero_b(_tiny())
    four_bit = pm.base_model.model.model.layers[1].self_attn.v_proj
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    monkeypatch.setattr(type(four_bit), "is_4bit", property(lambda self: self is four_bit))  # one looks 4-bit
    with pytest.raises(ValueError, match=r"4-bit base .*layers\.1\.self_attn\.v_proj"):
        FastLanguageModel.for_inference(pm, merge_lora=True)
    assert all(torch.equal(p, before[n]) for n, p in pm.named_parameters())
    assert not any(getattr(m, "merged", False) for m in pm.modules())


def test_merge_lora_must_be_a_bool():
    with pytest.raises(TypeError, match=r"merge_lora must be True or False, got 'yes'"):
        FastLanguageModel.for_inference(_tiny(), merge_lora="yes")


def test_unload_after_merging_for_inference_gives_back_the_original_base(forced):
    pm = _peft_with_nonzero_b(_tiny())
    inner = pm.base_model.model
    bases = {
        n.replace(".base_layer", ""): p.detach().clone()
        for n, p in inner.named_parameters()
        if "lora_" not in n
    }
    FastLanguageModel.for_inference(pm, merge_lora=True)
    plain = pm.unload()
    assert sorted(bases) == sorted(n for n, _ in plain.named_parameters())
    assert all(torch.equal(p, bases[n]) for n, p in plain.named_parameters())
