"""The save policy: layers that skip their recompute, each tensor autograd saves kept on the device
or parked in host memory by the Rust scheduler. Gradients must equal plain checkpointing's (the
independent reference: ``torch.utils.checkpoint`` per layer, or the fast path with
``use_gradient_checkpointing=True``), at odd shapes, in each dtype, on padded and packed batches."""

from __future__ import annotations

import copy
import gc
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("rslora_fast._core")

from conftest import OFFLOAD_LAYERS as LAYERS  # noqa: E402
from conftest import offload_tiny_llama as tiny_llama  # noqa: E402

from rslora_fast.offload import install_offloaded_checkpointing  # noqa: E402


def step(model, seed, **batch):
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.05 * p.grad)
                p.grad = None
    return loss.detach(), grads


def assert_same(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a, b), f"{what}: max diff {(a.float() - b.float()).abs().max().item()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saving_instead_of_recomputing_gives_the_plain_gradients(dtype):
    base = tiny_llama(dtype)
    ref = copy.deepcopy(base)
    ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ours = copy.deepcopy(base)
    handle = install_offloaded_checkpointing(ours, min_tokens=0, save_policy="always")
    handle.min_parked_bytes = 0  # every saved activation goes through the host pool
    gen = torch.Generator().manual_seed(1)
    for s in range(3):
        ids = torch.randint(0, 101, (3, 37 + 4 * s), generator=gen)  # odd shapes, lengths vary
        loss_r, grads_r = step(ref, 10 + s, input_ids=ids, labels=ids)
        loss_o, grads_o = step(ours, 10 + s, input_ids=ids, labels=ids)
        assert_same(loss_o, loss_r, f"loss step {s}")
        for n in grads_r:
            assert grads_r[n].abs().sum() > 0, n
            assert_same(grads_o[n], grads_r[n], f"{n} step {s}")
        st, kept = handle.stats(), handle.budget_stats()
        assert st["live_handles"] == 0 and st["in_use_bytes"] == 0
        if s == 0:  # the first step measures every layer, checkpointed
            assert kept["saved_layers"] == 0 and kept["recomputed_layers"] == LAYERS
        else:  # then every layer but the last skips its recompute, its big tensors parked
            assert kept["saved_layers"] == LAYERS - 1 and kept["recomputed_layers"] == 1
            assert kept["tensors_parked"] > 0 and kept["parked_bytes"] > 0


def test_the_budget_is_spent_tensor_by_tensor_and_logged_once(caplog):
    base = tiny_llama(dropout=0.0)
    ids = torch.randint(0, 101, (2, 300))
    counts = {}
    for budget in (0.0, 0.5, 8.0):  # MiB of device memory for saved tensors
        model = copy.deepcopy(base)
        handle = install_offloaded_checkpointing(
            model, min_tokens=0, save_policy="always", max_memory_gb=budget / 1024
        )
        with caplog.at_level(logging.INFO, logger="rslora_fast.offload"):
            for s in range(3):
                step(model, s, input_ids=ids, labels=ids)
        counts[budget] = handle.budget_stats()
    none, some, all_ = counts[0.0], counts[0.5], counts[8.0]
    # Zero budget: only the tensors too small to be worth a copy stay (64 KiB).
    assert none["kept_layers"] == 0 and none["tensors_parked"] > 0
    # Half a MiB: some tensors kept, fewer parked, the budget never exceeded by the big ones.
    assert 0 < some["tensors_parked"] < none["tensors_parked"]
    assert some["parked_bytes"] < none["parked_bytes"]
    # 8 MiB holds every layer whole: nothing parked, nothing recomputed.
    assert all_["kept_layers"] == LAYERS and all_["parked_bytes"] == 0
    lines = [r.getMessage() for r in caplog.records if "expected PCIe traffic" in r.getMessage()]
    assert len(lines) == 3, lines  # one per model
    assert f"keeps {LAYERS} of {LAYERS} decoder layers" in lines[2]


def test_an_abandoned_saving_graph_releases_every_buffer():
    model = tiny_llama()
    handle = install_offloaded_checkpointing(model, min_tokens=0, save_policy="always")
    ids = torch.randint(0, 101, (2, 200))
    step(model, 0, input_ids=ids, labels=ids)  # measures
    loss = model(input_ids=ids, labels=ids).loss
    assert handle.stats()["live_handles"] > LAYERS - 1  # several tensors per layer parked
    del loss
    gc.collect()
    st = handle.stats()
    assert st["live_handles"] == 0 and st["in_use_bytes"] == 0
    loss, _ = step(model, 1, input_ids=ids, labels=ids)
    assert torch.isfinite(loss)


def test_auto_saves_nothing_without_a_measured_link_and_bad_values_are_named():
    model = tiny_llama()
    handle = install_offloaded_checkpointing(model, min_tokens=0, save_policy="auto", max_memory_gb="auto")
    ids = torch.randint(0, 101, (2, 64))
    for s in range(2):
        step(model, s, input_ids=ids, labels=ids)
    kept = handle.budget_stats()
    # On the CPU there is no link to measure and no device budget: checkpointing as before.
    assert kept["saved_layers"] == 0 and kept["kept_layers"] == 0 and kept["budget_bytes"] == 0
    with pytest.raises(ValueError, match="'sometimes'"):
        install_offloaded_checkpointing(tiny_llama(), save_policy="sometimes")
    with pytest.raises(ValueError, match="'lots'"):
        install_offloaded_checkpointing(tiny_llama(), max_memory_gb="lots")


# ---------------------------------------------------------------------------- the fast llama path
def _fast_peft(family: str, dtype):
    from rslora_fast import get_peft_model
    from rslora_fast.peft.layer import LoraLinear

    cfg_cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}[family]
    cfg = cfg_cls(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=LAYERS,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    model = get_peft_model(base, r=4, lora_alpha=8, use_gradient_checkpointing=True)
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-zero B: every adapter gets a gradient
        if isinstance(m, LoraLinear):
            m.lora_B.weight.data.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.05)
    return model.train()


def _batches():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 96, (2, 29), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    padded = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    packed_ids = torch.randint(0, 96, (1, 41), generator=gen)
    pos = torch.cat([torch.arange(17), torch.arange(24)]).unsqueeze(0)  # two sequences in one row
    packed = {"input_ids": packed_ids, "position_ids": pos, "labels": packed_ids}
    return {"padded": padded, "packed": packed}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_saving_equals_plain_checkpointing(family, dtype):
    from rslora_fast.checkpointing import apply_gradient_checkpointing

    ref = _fast_peft(family, dtype)
    ours = copy.deepcopy(ref)
    inner = ours.get_base_model()
    apply_gradient_checkpointing(inner, "unsloth", save_policy="always")
    inner.__dict__["_rslora_offload"].min_tokens = 0
    inner.__dict__["_rslora_offload"].min_parked_bytes = 0  # every saved activation is parked
    for name, batch in _batches().items():
        for s in range(2):  # the first step measures; the second saves
            loss_r, grads_r = step(ref, s, **batch)
            loss_o, grads_o = step(ours, s, **batch)
            assert_same(loss_o, loss_r, f"{name} loss step {s}")
            assert len(grads_r) == LAYERS * 7 * 2
            for n in grads_r:
                assert_same(grads_o[n], grads_r[n], f"{name} {n} step {s}")
    kept = inner.__dict__["_rslora_offload"].budget_stats()
    assert kept["saved_layers"] == LAYERS - 1 and kept["tensors_parked"] > 10 * (LAYERS - 1)


def test_a_tight_host_cap_falls_back_to_recompute_instead_of_failing():
    base = tiny_llama(dropout=0.0)
    ids = torch.randint(0, 101, (2, 300))  # a layer input is 153,600 bytes; its saved tensors MiBs
    ref = copy.deepcopy(base)
    ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ours = copy.deepcopy(base)
    handle = install_offloaded_checkpointing(ours, min_tokens=0, save_policy="always", host_cap_bytes=1 << 20)
    for s in range(3):
        loss_r, grads_r = step(ref, s, input_ids=ids, labels=ids)
        loss_o, grads_o = step(ours, s, input_ids=ids, labels=ids)
        assert_same(loss_o, loss_r, f"loss step {s}")
        for n in grads_r:
            assert_same(grads_o[n], grads_r[n], n)
    kept = handle.budget_stats()
    assert kept["saved_layers"] == 0 and kept["recomputed_layers"] == LAYERS
    assert handle.stats()["offloads"] == 3 * (LAYERS - 1)  # the inputs still went to the host


def test_get_peft_model_passes_the_save_policy_and_for_training_keeps_it():
    from rslora_fast import FastLanguageModel, get_peft_model
    from rslora_fast.checkpointing import offload_handle

    base = tiny_llama()
    model = get_peft_model(base, r=4, use_gradient_checkpointing="unsloth", save_policy="always")
    assert offload_handle(base).save_policy == "always"
    FastLanguageModel.for_inference(model)
    FastLanguageModel.for_training(model)
    assert offload_handle(base).save_policy == "always"
    with pytest.raises(ValueError, match="save_policy must be one of .*'sometimes'"):
        get_peft_model(tiny_llama(), r=4, use_gradient_checkpointing="unsloth", save_policy="sometimes")
