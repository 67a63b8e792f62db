"""The fast decoder path on Gemma 2, Gemma 3 (text) and Phi-3 against the generic transformers path:
loss and every LoRA gradient (float32 tight, bf16 within the rounding tolerance of the other fast-path
tests), packed and padded batches, checkpointing; Gemma 2's final-logit soft-capping inside the fused
loss; Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` adapters moving to and from HF peft.

The generic path is the same PeftModel with the fast forwards removed, the fused LoRA op switched
off and the fused loss off (transformers' own ``ForCausalLM.forward`` computes logits, soft-caps
them and takes the loss), so both runs share every weight. Each comparison first checks that the
fast forwards really are installed on every attention, norm and MLP module.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from rslora_fast import PeftModel, get_peft_model
from rslora_fast.models.fast_decoder import install_fast_decoder, uninstall_fast_decoder
from rslora_fast.ops.fused_ce import fused_linear_cross_entropy
from rslora_fast.ops.lora_linear import fused_lora_disabled
from rslora_fast.peft.layer import LoraLinear

VOCAB = 96
# gemma2: transformers' default SDPA (which does not apply the attention soft-cap; neither do we
# then) and eager with a small cap (so capping changes the scores); phi3 with a partial rotary
# factor rotates the first half of each head; gemma3 has per-head q/k norms and per-layer-type RoPE.
FAMILIES = ["gemma2", "gemma2_eager", "gemma3", "phi3", "phi3_partial"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _config(family: str):
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        # weights 10x transformers' default: attention scores large enough that positions, windows
        # and soft-caps change the result (tested below)
        initializer_range=0.2,
    )
    if family.startswith("gemma"):
        cls = transformers.Gemma2Config if family.startswith("gemma2") else transformers.Gemma3TextConfig
        kw = dict(head_dim=16, layer_types=["sliding_attention", "full_attention"], sliding_window=4)
        if family == "gemma2_eager":
            kw.update(attn_implementation="eager", attn_logit_softcapping=0.3, final_logit_softcapping=0.5)
        elif family == "gemma2":
            kw.update(attn_implementation="sdpa", final_logit_softcapping=2.0)
        else:
            kw.update(attn_implementation="sdpa", final_logit_softcapping=None)
        return cls(**common, **kw)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if family == "phi3_partial":
        rope["partial_rotary_factor"] = 0.5
    return transformers.Phi3Config(
        **common,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters=rope,
        attn_implementation="sdpa",
    )


def _base(family: str, dtype=torch.float32, device="cpu", seed=0):
    import transformers

    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(_config(family)).to(device, dtype)


def _peft(family: str, dtype=torch.float32, device="cpu", seed=0, checkpointing=False):
    model = get_peft_model(
        _base(family, dtype, device, seed), r=4, lora_alpha=8, use_gradient_checkpointing=checkpointing
    )
    gen = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():  # non-zero B so every adapter changes the output and gets a gradient
        if isinstance(m, LoraLinear):
            m.lora_B.weight.data.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.05)
    return model.train()


def _fast_modules(inner) -> dict[str, int]:
    counts = {"attention": 0, "RMSNorm": 0, "MLP": 0}
    for m in inner.modules():
        name = type(m).__name__
        for kind, suffix in (("attention", "Attention"), ("RMSNorm", "RMSNorm"), ("MLP", "MLP")):
            if name.endswith(suffix) and "forward" in m.__dict__:
                counts[kind] += 1
    return counts


def _expected(family: str, layers: int = 2) -> dict[str, int]:
    if family.startswith("gemma"):  # input, post-attention, pre/post feed-forward norms + final
        norms = 4 * layers + 1 + (2 * layers if family == "gemma3" else 0)  # gemma3: q_norm, k_norm
    else:
        norms = 2 * layers + 1
    return {"attention": layers, "RMSNorm": norms, "MLP": layers}


@contextlib.contextmanager
def _generic(model):
    """Run ``model`` on transformers' own forwards (fast decoder, fused LoRA op and fused loss off)."""
    inner = model.base_model.model
    uninstall_fast_decoder(inner)
    model.fused_loss = False
    try:
        with fused_lora_disabled():
            yield
    finally:
        model.fused_loss = True
        install_fast_decoder(inner)


def _loss_and_grads(model, **batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _compare(model, family, rtol, atol, **batch):
    assert _fast_modules(model.base_model.model) == _expected(family)
    fast, g_fast = _loss_and_grads(model, **batch)
    assert fast.logits is None  # the fused loss ran (with soft-capping where the config has it)
    with _generic(model):
        ref, g_ref = _loss_and_grads(model, **batch)
    assert ref.logits is not None
    torch.testing.assert_close(fast.loss, ref.loss, rtol=rtol, atol=atol)
    assert g_fast.keys() == g_ref.keys() and len(g_fast) >= 8
    for name in g_ref:
        assert g_ref[name].abs().sum() > 0, name
        torch.testing.assert_close(g_fast[name].float(), g_ref[name].float(), rtol=rtol, atol=atol, msg=name)


def _ids(device="cpu", shape=(2, 11), seed=5):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed)).to(device)


# ---------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("family", FAMILIES)
def test_every_attention_norm_and_mlp_takes_the_fast_path(family, caplog):
    with caplog.at_level(logging.INFO, logger="rslora_fast.models.fast_decoder"):
        model = _peft(family)
    inner = model.base_model.model
    want = _expected(family)
    assert _fast_modules(inner) == want
    lines = [r.getMessage() for r in caplog.records if "fast path" in r.getMessage()]
    assert len(lines) == 1 and "generic path: none" in lines[0]
    assert f"{want['RMSNorm']} RMSNorm" in lines[0]
    # SDPA drops gemma2's attention soft-cap (here as in transformers): the user is told
    ignored = [r for r in caplog.records if "attn_logit_softcapping=50.0 is not applied" in r.getMessage()]
    assert len(ignored) == (1 if family == "gemma2" else 0)
    model.unload()
    assert not any("forward" in m.__dict__ for m in inner.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_every_lora_gradient_match_the_generic_path(family):
    model = _peft(family)
    ids = _ids(shape=(2, 13))  # longer than the sliding window (4): the two layer types differ
    _compare(model, family, 1e-5, 1e-6, input_ids=ids, labels=ids)


@pytest.mark.parametrize("checkpointing", [False, "unsloth"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gemma_layers_fuse_the_residual_add_into_the_pre_mlp_norm(family, checkpointing, monkeypatch):
    # gemma 2/3: residual + post_attention_layernorm(attn) and pre_feedforward_layernorm in one op;
    # phi-3 keeps transformers' layer (dropouts around its adds)
    import rslora_fast.models.fast_decoder as fd

    calls = []
    real = fd.add_rms_norm
    monkeypatch.setattr(fd, "add_rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _peft(family, checkpointing=checkpointing)
    ids = _ids(shape=(2, 13))
    _compare(model, family, 1e-5, 1e-6, input_ids=ids, labels=ids)
    per_pass = 2 if family.startswith("gemma") else 0  # two layers
    assert len(calls) == per_pass * (2 if checkpointing else 1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _compare_low_precision(model, family, **batch):
    """bf16/fp16: the two paths round at different places (e.g. our CPU references rotate and
    soft-cap in float32, transformers in bf16), so element-wise tolerances do not fit small entries;
    instead each gradient is within 5% (norm-wise) of the generic one (bf16's own error here: up to
    7% against float32), and no further from the float32 result of the same weights than twice the
    generic path's distance plus 1% (measured on CPU: at most 1.51 times in bf16; fp16's errors are
    a few tenths of a percent, where the 1% dominates). The losses agree within bf16's
    resolution at their size (4.5 * 2**-8 = 0.018)."""
    assert _fast_modules(model.base_model.model) == _expected(family)
    fast, g_fast = _loss_and_grads(model, **batch)
    assert fast.logits is None
    with _generic(model):
        ref, g_ref = _loss_and_grads(model, **batch)
    device = next(model.parameters()).device
    _, g_exact = _loss_and_grads(_peft(family, device=device), **batch)
    torch.testing.assert_close(fast.loss, ref.loss, rtol=0, atol=1e-2)
    assert g_fast.keys() == g_ref.keys() == g_exact.keys()
    for name in g_ref:
        assert _rel(g_fast[name], g_ref[name]) < 5e-2, name
        assert _rel(g_fast[name], g_exact[name]) <= 2 * _rel(g_ref[name], g_exact[name]) + 1e-2, name


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_loss_and_gradients_match_the_generic_path(family):
    model = _peft(family, dtype=torch.bfloat16)
    ids = _ids(shape=(2, 9))
    _compare_low_precision(model, family, input_ids=ids, labels=ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_sequences_with_restarting_positions(family):
    model = _peft(family)
    ids = _ids(shape=(1, 13))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7]])
    _compare(model, family, 1e-5, 1e-6, input_ids=ids, labels=ids, position_ids=pos)
    # the positions really reach the rotation: other positions give another loss
    a, _ = _loss_and_grads(model, input_ids=ids, labels=ids, position_ids=pos)
    b, _ = _loss_and_grads(model, input_ids=ids, labels=ids)
    assert not torch.allclose(a.loss, b.loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_mask(family):
    model = _peft(family)
    ids = _ids(shape=(2, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second row
    _compare(
        model, family, 1e-5, 1e-6, input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)
    )


@pytest.mark.parametrize("mode", [True, "unsloth"])
@pytest.mark.parametrize("family", ["gemma2_eager", "gemma3", "phi3_partial"])
def test_with_gradient_checkpointing(family, mode):
    model = _peft(family, checkpointing=mode)
    ids = _ids(shape=(2, 11))
    _compare(model, family, 1e-5, 1e-6, input_ids=ids, labels=ids)


def test_gemma2_window_and_soft_cap_reach_the_fast_attention(monkeypatch):
    """Gemma 2's per-layer window and attention soft-cap reach the attention function from our
    forward as transformers passes them, and (checked on plain transformers) each of them, and the
    final-logit cap, changes the loss of these tiny models: the comparisons above exercise them."""
    import transformers
    import transformers.modeling_utils as mu

    seen = []
    model = _peft("gemma2_eager")
    assert _fast_modules(model.base_model.model) == _expected("gemma2_eager")
    real = mu.ALL_ATTENTION_FUNCTIONS.get_interface

    def spy(impl, default):
        fn = real(impl, default)
        return lambda *a, **k: seen.append((k.get("softcap"), k.get("sliding_window"))) or fn(*a, **k)

    ids = _ids(shape=(2, 13))
    monkeypatch.setattr(mu.ALL_ATTENTION_FUNCTIONS, "get_interface", spy)
    model(input_ids=ids, labels=ids)
    monkeypatch.undo()
    assert seen == [(0.3, 4), (0.3, None)]  # layer 0 sliding, layer 1 full

    def plain_loss(**overrides):
        cfg = _config("gemma2_eager")
        for k, v in overrides.items():
            setattr(cfg, k, v)
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(cfg)(input_ids=ids, labels=ids).loss

    base = plain_loss()
    for change in (
        {"sliding_window": 64},
        {"attn_logit_softcapping": None},
        {"final_logit_softcapping": None},
    ):
        assert not torch.allclose(base, plain_loss(**change)), change


# ---------------------------------------------------------------------------- fused loss + soft-cap
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cross_entropy_soft_caps_the_logits(dtype):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(37, 24, generator=g) * 2).to(dtype).requires_grad_()
    w = torch.randn(VOCAB, 24, generator=g).to(dtype)
    t = torch.randint(0, VOCAB, (37,), generator=g)
    t[3] = -100
    got = fused_linear_cross_entropy(h, w, t, softcap=3.0, chunk_tokens=8)
    (dh,) = torch.autograd.grad(got, [h])
    h2 = h.detach().clone().requires_grad_()
    logits = (h2 @ w.t()).float()
    want = torch.nn.functional.cross_entropy(3.0 * torch.tanh(logits / 3.0), t, ignore_index=-100)
    (dh2,) = torch.autograd.grad(want, [h2])
    tol = (1e-5, 1e-6) if dtype == torch.float32 else (2e-2, 2e-3)
    torch.testing.assert_close(got, want, rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(dh.float(), dh2.float(), rtol=tol[0], atol=tol[1])
    uncapped = fused_linear_cross_entropy(h.detach(), w, t)
    assert not torch.allclose(got.detach(), uncapped, rtol=1e-3)
    with pytest.raises(ValueError, match="softcap must be a positive"):
        fused_linear_cross_entropy(h, w, t, softcap=0.0)


# ---------------------------------------------------------------------------- Phi-3 adapters
def test_phi3_default_targets_adapt_the_fused_projections():
    model = get_peft_model(_base("phi3"), r=4, use_gradient_checkpointing=False)
    attn = model.base_model.model.model.layers[0].self_attn
    mlp = model.base_model.model.model.layers[0].mlp
    assert all(
        isinstance(m, LoraLinear) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    )
    assert sorted(model.peft_config["default"].target_modules) == [
        "down_proj",
        "gate_up_proj",
        "o_proj",
        "qkv_proj",
    ]
    # one pair over the whole fused output, as HF peft builds it
    assert attn.qkv_proj.lora_B.weight.shape[0] == attn.qkv_proj.base_layer.out_features


def _randomize_adapters(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("family", ["phi3", "phi3_partial"])
def test_phi3_adapter_saved_by_us_loads_in_hf_peft(family, tmp_path):
    peft = pytest.importorskip("peft")
    ours = _peft(family)
    _randomize_adapters(ours)
    ours.save_pretrained(tmp_path)
    ours.eval()
    ids = _ids(shape=(2, 10))
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(_base(family), str(tmp_path)).eval()
        got = theirs(input_ids=ids).logits
        plain = _base(family)(input_ids=ids).logits
    names = {n for n, _ in theirs.named_modules() if n.endswith(("qkv_proj", "gate_up_proj"))}
    assert names and all(isinstance(theirs.get_submodule(n), peft.tuners.lora.LoraLayer) for n in names)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter really changes the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["phi3", "phi3_partial"])
def test_phi3_adapter_saved_by_hf_peft_loads_in_ours(family, tmp_path):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    theirs = peft.get_peft_model(_base(family), cfg)
    _randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path)
    ids = _ids(shape=(2, 10))
    with torch.no_grad():
        want = theirs.eval()(input_ids=ids).logits
        ours = PeftModel.from_pretrained(_base(family), str(tmp_path))
        assert _fast_modules(ours.base_model.model) == _expected("phi3")
        got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- GPU
@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_loss_and_grads_match_the_generic_path(family, dtype):
    model = _peft(family, dtype=dtype, device="cuda")
    ids = _ids("cuda", shape=(2, 37))
    if dtype == torch.float32:
        _compare(model, family, 1e-4, 1e-5, input_ids=ids, labels=ids)
    else:
        _compare_low_precision(model, family, input_ids=ids, labels=ids)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_packed_padded_and_checkpointed_match_the_generic_path(family):
    model = _peft(family, dtype=torch.bfloat16, device="cuda", checkpointing="unsloth")
    ids = _ids("cuda", shape=(1, 29))
    pos = torch.cat([torch.arange(11), torch.arange(18)]).unsqueeze(0).cuda()
    _compare_low_precision(model, family, input_ids=ids, labels=ids, position_ids=pos)
    ids2 = _ids("cuda", shape=(2, 19))
    mask = torch.ones_like(ids2)
    mask[0, :5] = 0
    labels = ids2.masked_fill(mask == 0, -100)
    _compare_low_precision(model, family, input_ids=ids2, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("family", ["phi3", "phi3_partial"])
def test_phi3_rotates_its_query_and_key_heads_in_one_in_place_call(family, monkeypatch):
    import rslora_fast.models.fast_decoder as fd

    calls = []
    real = fd.apply_rope_
    monkeypatch.setattr(
        fd, "apply_rope_", lambda q, k, c, s: calls.append((q.shape, k.shape)) or real(q, k, c, s)
    )
    model = _peft(family)
    ids = _ids(shape=(2, 7))
    _compare(model, family, 1e-5, 1e-6, input_ids=ids, labels=ids)
    rd = 8 if family == "phi3_partial" else 16  # head_dim 16, partial factor 0.5
    assert calls and all(q == (2, 4 + 2, 7, rd) and k == (2, 0, 7, rd) for q, k in calls)


@pytest.mark.parametrize("family", ["phi3_partial", "gemma3"])
def test_backward_hook_rotates_out_of_place_and_matches_transformers(family):
    model = _peft(family)
    attn = model.base_model.model.model.layers[0].self_attn
    seen = []
    proj = attn.qkv_proj if family.startswith("phi3") else attn.q_proj
    proj.register_full_backward_hook(lambda m, gi, go: seen.append(1))
    ids = _ids(shape=(2, 7))
    _compare(model, family, 1e-5, 1e-6, input_ids=ids, labels=ids)  # in place here would raise
    assert seen


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_rope_with_no_key_heads_rotates_the_query_alone(dtype):
    """Phi-3's path rotates its query and key heads as one tensor with an empty k (data_ptr 0)."""
    from rslora_fast.ops.rope import apply_rope_, rope_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 6 * 16, generator=g).to("cuda", dtype)
    q = x.view(2, 37, 6, 16).transpose(1, 2)
    ang = torch.randn(2, 37, 8, generator=g)
    cos, sin = (torch.cat((f(ang), f(ang)), -1).to("cuda", dtype) for f in (torch.cos, torch.sin))
    want = rope_reference(q.clone(), cos, sin)
    apply_rope_(q, q.new_empty((2, 0, 37, 16)), cos, sin)
    torch.testing.assert_close(q, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def _train_losses(model, steps, ids):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for i in range(steps):
        batch = ids[i % ids.shape[0]].unsqueeze(0)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("family", ["gemma2_eager", "gemma3", "phi3_partial"])
def test_cuda_50_steps_track_the_generic_path_and_hf_peft(family, tmp_path):
    """bf16: 50 AdamW steps of the fast path, the generic path and HF peft from the same adapters."""
    peft = pytest.importorskip("peft")
    ids = _ids("cuda", shape=(8, 64), seed=11)
    start = _peft(family, dtype=torch.bfloat16, device="cuda")
    start.save_pretrained(tmp_path)  # PEFT format: HF peft starts from the very same adapters
    fast = _train_losses(start, 50, ids)
    generic_model = _peft(family, dtype=torch.bfloat16, device="cuda")
    with _generic(generic_model):
        generic = _train_losses(generic_model, 50, ids)
    hf = peft.PeftModel.from_pretrained(_base(family, torch.bfloat16, "cuda"), tmp_path, is_trainable=True)
    hf_losses = _train_losses(hf, 50, ids)
    assert abs(fast[0] - hf_losses[0]) < 0.01 * abs(hf_losses[0])  # same model, same adapters
    for a, b, c in zip(fast, generic, hf_losses):
        assert abs(a - b) < 0.05 * max(1.0, abs(b)) and abs(a - c) < 0.08 * max(1.0, abs(c))

    def drop(losses):
        return sum(losses[:5]) / 5 - sum(losses[-5:]) / 5

    assert drop(hf_losses) > 0  # it trains, and the fast path about as much as HF peft
    assert drop(fast) > 0.5 * drop(hf_losses)


@pytest.mark.parametrize("family", ["gemma2_eager", "gemma3", "phi3_partial"])
def test_generate_equals_the_generic_path(family):
    """Eval with the KV cache (sliding layers included: 12 new tokens pass the window of 4)."""
    model = _peft(family).eval()
    assert _fast_modules(model.base_model.model) == _expected(family)
    ids = _ids(shape=(1, 6))
    with torch.no_grad():
        fast = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
        with _generic(model):
            ref = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    assert fast.shape == (1, 18) and torch.equal(fast, ref)


@pytest.mark.parametrize("family", ["gemma2_eager", "gemma3", "phi3_partial"])
def test_4bit_base_layers_match_the_generic_path(family):
    """NF4 base weights (our Linear4bit) under the adapters, Phi-3's fused ones included."""
    from rslora_fast.quant.linear4bit import Linear4bit

    base = _base(family)
    for name, module in list(base.model.named_modules()):
        if isinstance(module, torch.nn.Linear):
            parent, child = name.rsplit(".", 1)
            setattr(base.model.get_submodule(parent), child, Linear4bit.from_linear(module))
    model = get_peft_model(base, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, LoraLinear):
            assert isinstance(m.base_layer, Linear4bit)
            m.lora_B.weight.data.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.05)
    ids = _ids(shape=(2, 11))
    _compare(model.train(), family, 1e-5, 1e-6, input_ids=ids, labels=ids)


def test_fused_loss_takes_the_soft_cap_and_refuses_a_nonpositive_one():
    from rslora_fast.models.causal_lm import fused_loss_supported

    model = _peft("gemma2")
    inner = model.base_model.model
    ids = _ids(shape=(1, 5))
    assert fused_loss_supported(inner, ids, {}) is None  # final_logit_softcapping=2.0
    inner.config.final_logit_softcapping = 0.0
    assert "final_logit_softcapping=0.0 is not a positive number" in fused_loss_supported(inner, ids, {})
    assert model(input_ids=ids, labels=ids).logits is not None  # transformers' own forward ran
