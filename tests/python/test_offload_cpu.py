"""Offloaded checkpointing on CPU (host transport): the real Python path, against plain
``torch.utils.checkpoint`` per decoder layer as the independent reference."""

from __future__ import annotations

import copy
import gc
import logging
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
core = pytest.importorskip("rslora_fast._core")

from conftest import OFFLOAD_LAYERS as LAYERS  # noqa: E402
from conftest import OFFLOAD_TRAINABLE as TRAINABLE  # noqa: E402
from conftest import offload_tiny_llama as tiny_llama  # noqa: E402

from rslora_fast.offload import (  # noqa: E402
    find_decoder_layers,
    install_offloaded_checkpointing,
    uninstall_offloaded_checkpointing,
)


def reference_copy(model):
    ref = copy.deepcopy(model)
    ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref.train()
    return ref


def step(model, ids, seed):
    torch.manual_seed(seed)  # same dropout stream for both models
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.05 * p.grad)  # change the weights so each step differs
                p.grad = None
    return loss.detach(), grads


def assert_bitwise(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a, b), f"{what}: max diff {(a.float() - b.float()).abs().max().item()}"


@pytest.mark.parametrize(
    ("dtype", "lookahead", "input_grad"),
    [
        (torch.float32, 1, False),
        (torch.float32, 0, True),
        (torch.float32, 2, False),
        (torch.bfloat16, 1, True),
        (torch.bfloat16, 2, False),
    ],
)
def test_losses_and_grads_equal_plain_checkpointing_bitwise(dtype, lookahead, input_grad):
    base = tiny_llama(dtype)
    ref = reference_copy(base)
    ours = copy.deepcopy(base)
    if input_grad:  # as PEFT's enable_input_require_grads: layer inputs then require grad
        ref.enable_input_require_grads()
        ours.enable_input_require_grads()
    handle = install_offloaded_checkpointing(ours, lookahead=lookahead, min_tokens=0)
    gen = torch.Generator().manual_seed(1)
    for s in range(3):
        ids = torch.randint(0, 101, (2, 37 + 5 * s), generator=gen)
        loss_r, grads_r = step(ref, ids, 100 + s)
        loss_o, grads_o = step(ours, ids, 100 + s)
        assert_bitwise(loss_o, loss_r, f"loss step {s}")
        assert set(grads_o) == set(grads_r) and len(grads_r) == LAYERS * len(TRAINABLE)
        for n in grads_r:
            assert grads_r[n].abs().sum() > 0, n
            assert_bitwise(grads_o[n], grads_r[n], f"grad {n} step {s}")
        st = handle.stats()
        assert st["in_use_bytes"] == 0 and st["live_handles"] == 0
    st = handle.stats()
    # Every layer but the last was offloaded and brought back, each step.
    assert st["offloads"] == 3 * (LAYERS - 1)
    assert st["prefetches"] == 3 * (LAYERS - 1)
    uninstall_offloaded_checkpointing(handle)


def test_dropout_is_really_random_so_rng_replay_matters():
    # Guard against a vacuous equality test: with a different seed the loss changes.
    model = tiny_llama()
    ids = torch.randint(0, 101, (2, 40))
    torch.manual_seed(1)
    a = model(input_ids=ids, labels=ids).loss
    torch.manual_seed(2)
    b = model(input_ids=ids, labels=ids).loss
    assert not torch.equal(a, b)


def test_rng_stream_after_a_step_matches_plain_checkpointing():
    base = tiny_llama()
    ref, ours = reference_copy(base), copy.deepcopy(base)
    install_offloaded_checkpointing(ours, min_tokens=0)
    ids = torch.randint(0, 101, (1, 50))
    step(ref, ids, 7)
    after_ref = torch.rand(4)
    step(ours, ids, 7)
    after_ours = torch.rand(4)
    assert torch.equal(after_ref, after_ours)


def test_short_sequences_fall_back_to_plain_checkpointing_logged_once(caplog):
    base = tiny_llama()
    ref, ours = reference_copy(base), copy.deepcopy(base)
    handle = install_offloaded_checkpointing(ours, min_tokens=10_000)
    ids = torch.randint(0, 101, (2, 33))
    with caplog.at_level(logging.INFO, logger="rslora_fast.offload"):
        for s in range(2):
            loss_r, grads_r = step(ref, ids, s)
            loss_o, grads_o = step(ours, ids, s)
            assert_bitwise(loss_o, loss_r, "loss")
            for n in grads_r:
                assert_bitwise(grads_o[n], grads_r[n], n)
    assert handle.stats().get("offloads", 0) == 0
    assert sum("min_tokens" in r.getMessage() for r in caplog.records) == 1


def test_an_exception_mid_forward_releases_every_buffer():
    model = tiny_llama()
    handle = install_offloaded_checkpointing(model, min_tokens=0)
    ids = torch.randint(0, 101, (2, 40))
    step(model, ids, 0)  # warm: the pool holds blocks now
    layers = find_decoder_layers(model)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    layers[1].mlp.forward = boom
    try:
        model(input_ids=ids, labels=ids)
    except RuntimeError as e:
        assert "boom" in str(e)
    else:
        raise AssertionError("the layer should have raised")
    gc.collect()
    st = handle.stats()
    # the failed step offloaded layers 0 and 1 (a copy starts before its layer runs)
    assert st["offloads"] == 2 * (LAYERS - 1)
    assert st["in_use_bytes"] == 0 and st["live_handles"] == 0
    del layers[1].mlp.forward
    loss, _ = step(model, ids, 1)  # and training goes on
    assert torch.isfinite(loss)
    assert handle.stats()["in_use_bytes"] == 0


def test_an_exception_mid_backward_and_an_abandoned_graph_release_every_buffer():
    model = tiny_llama()
    handle = install_offloaded_checkpointing(model, min_tokens=0)
    ids = torch.randint(0, 101, (2, 40))
    loss = model(input_ids=ids, labels=ids).loss
    assert handle.stats()["live_handles"] == LAYERS - 1
    del loss  # forward without backward
    gc.collect()
    assert handle.stats()["in_use_bytes"] == 0

    layers = find_decoder_layers(model)

    def raise_in_backward(module, grad_input, grad_output):
        raise RuntimeError("backward boom")

    hook = layers[LAYERS - 1].register_full_backward_hook(raise_in_backward)
    loss = model(input_ids=ids, labels=ids).loss
    with pytest.raises(RuntimeError, match="backward boom"):
        loss.backward()
    del loss
    hook.remove()
    gc.collect()
    st = handle.stats()
    assert st["in_use_bytes"] == 0 and st["live_handles"] == 0


def test_fifty_steps_do_not_grow_the_pool():
    model = tiny_llama(dropout=0.0)
    handle = install_offloaded_checkpointing(model, min_tokens=0)
    ids = torch.randint(0, 101, (2, 64))
    step(model, ids, 0)
    first = handle.stats()
    assert first["reserved_bytes"] > 0
    for s in range(49):
        step(model, ids, s)
    last = handle.stats()
    assert last["reserved_bytes"] == first["reserved_bytes"]
    assert last["allocations"] == first["allocations"] == LAYERS - 1
    assert last["offloads"] == 50 * (LAYERS - 1)
    layer_input = 2 * 64 * 64 * 4
    assert last["reserved_bytes"] <= 1.1 * (LAYERS - 1) * max(layer_input, 4096)


def test_reaching_the_host_cap_raises_a_clear_error():
    model = tiny_llama()
    layer_input = 2 * 600 * 64 * 4  # one layer input, 307,200 bytes
    handle = install_offloaded_checkpointing(model, min_tokens=0, host_cap_bytes=layer_input + 1000)
    ids = torch.randint(0, 101, (2, 600))
    with pytest.raises(MemoryError, match="cap") as info:
        model(input_ids=ids, labels=ids)
    assert str(layer_input + 1000) in str(info.value)
    del info
    gc.collect()
    assert handle.stats()["in_use_bytes"] == 0
    # A shorter sequence fits under the same cap.
    loss, _ = step(model, ids[:, :100], 0)
    assert torch.isfinite(loss)


def test_own_cgroup_and_its_parents_are_read(monkeypatch, tmp_path):
    import rslora_fast.offload.host_memory as off

    proc = tmp_path / "cgroup"
    proc.write_text("0::/slurm/job_7/step_0\n")
    real_open = open

    def fake_open(path, *a, **k):
        return real_open(proc if path == "/proc/self/cgroup" else path, *a, **k)

    monkeypatch.setattr("builtins.open", fake_open)
    assert off._own_cgroup_limits() == [
        "/sys/fs/cgroup/slurm/job_7/step_0/memory.max",
        "/sys/fs/cgroup/slurm/job_7/memory.max",
        "/sys/fs/cgroup/slurm/memory.max",
    ]


def test_changing_lengths_under_the_cap_reuse_memory_instead_of_growing():
    """A length search (each step longer than the last) frees the idle blocks of older lengths
    rather than holding every length's blocks at once; the default cap is half the host's RAM."""
    from rslora_fast.offload import default_host_cap_bytes

    model = tiny_llama(dropout=0.0)
    assert (
        install_offloaded_checkpointing(tiny_llama(), min_tokens=0).host_cap_bytes == default_host_cap_bytes()
    )
    longest = 2 * 400 * 64 * 4 * (LAYERS - 1)  # bytes of all offloaded inputs at the longest length
    handle = install_offloaded_checkpointing(model, min_tokens=0, host_cap_bytes=int(1.5 * longest))
    for n in (100, 200, 300, 400):  # unbounded, the pool would hold all four lengths: 2.5x longest
        ids = torch.randint(0, 101, (2, n))
        loss, _ = step(model, ids, 0)
        assert torch.isfinite(loss)
    assert handle.stats()["reserved_bytes"] <= 1.5 * longest


def test_default_host_cap_follows_cgroup_limits_and_launchers(monkeypatch, tmp_path):
    import rslora_fast.offload.host_memory as off

    limit = tmp_path / "memory.max"
    limit.write_text(str(8 << 30) + "\n")  # a container limit far below any host's RAM
    monkeypatch.setattr(off, "_CGROUP_LIMITS", (str(limit),))
    monkeypatch.setattr(off, "_own_cgroup_limits", lambda: [])
    for var in off._LOCAL_PROCESS_VARS:
        monkeypatch.delenv(var, raising=False)
    assert off.default_host_cap_bytes() == 4 << 30
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")  # Slurm's compressed form
    assert off.default_host_cap_bytes() == 1 << 30
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2,4")  # always set by Slurm; this node first
    assert off.default_host_cap_bytes() == 2 << 30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's variable wins
    assert off.default_host_cap_bytes() == 2 << 30
    limit.write_text("max\n")  # cgroup v2 "no limit": physical RAM again
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert off.default_host_cap_bytes() == physical // 2 // 2
    model = tiny_llama()
    assert install_offloaded_checkpointing(model, host_cap_bytes=float("inf")).host_cap_bytes is None
    with pytest.raises(ValueError, match="got -1"):
        install_offloaded_checkpointing(tiny_llama(), host_cap_bytes=-1)


def test_eval_and_no_grad_run_the_layers_unchanged():
    model = tiny_llama()
    plain = copy.deepcopy(model)
    handle = install_offloaded_checkpointing(model, min_tokens=0)
    ids = torch.randint(0, 101, (1, 30))
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert handle.stats().get("offloads", 0) == 0


def test_uninstall_restores_the_layers():
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = find_decoder_layers(model)
    handle = install_offloaded_checkpointing(model, min_tokens=0)
    assert all(not layer.gradient_checkpointing for layer in layers)
    with pytest.raises(ValueError, match="already installed"):
        install_offloaded_checkpointing(model)
    step(model, torch.randint(0, 101, (1, 20)), 0)
    uninstall_offloaded_checkpointing(handle)
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert all(layer.gradient_checkpointing for layer in layers)
    assert handle.stats() == {}


def test_memory_budget_keeps_layers_without_recompute_and_stays_exact():
    base = tiny_llama()
    ref = reference_copy(base)
    ours = copy.deepcopy(base)
    handle = install_offloaded_checkpointing(ours, min_tokens=0, max_memory_gb=1.0)
    ids = torch.randint(0, 101, (2, 48))
    for s in range(3):
        loss_r, grads_r = step(ref, ids, s)
        loss_o, grads_o = step(ours, ids, s)
        assert_bitwise(loss_o, loss_r, "loss")
        for n in grads_r:
            assert_bitwise(grads_o[n], grads_r[n], n)
    # Step 0 measured every layer while checkpointing; later steps keep them all (1 GiB fits).
    assert handle.stats()["offloads"] == LAYERS - 1
    kept = handle.budget_stats()
    assert kept["kept_layers"] == kept["layers"] == LAYERS and kept["budget_bytes"] == 1 << 30
    assert 0 < kept["kept_bytes"] <= 1 << 30

    tight = copy.deepcopy(base)
    h2 = install_offloaded_checkpointing(tight, min_tokens=0, max_memory_gb=0.0)
    for s in range(2):
        step(tight, ids, s)
    assert h2.stats()["offloads"] == 2 * (LAYERS - 1)
    assert h2.budget_stats()["kept_layers"] == 0 and h2.budget_stats()["kept_bytes"] == 0


def test_memory_budget_keeps_the_layers_that_fit_and_logs_it(caplog):
    # A budget of about two layers' measured activations keeps exactly the first two layers.
    base = tiny_llama()
    probe = copy.deepcopy(base)
    h = install_offloaded_checkpointing(probe, min_tokens=0, max_memory_gb=1.0)
    ids = torch.randint(0, 101, (2, 48))
    for s in range(2):
        step(probe, ids, s)
    per_layer = h.budget_stats()["kept_bytes"] / LAYERS
    ours = copy.deepcopy(base)
    h2 = install_offloaded_checkpointing(ours, min_tokens=0, max_memory_gb=2.5 * per_layer / 2**30)
    with caplog.at_level(logging.INFO, logger="rslora_fast.offload"):
        for s in range(2):
            step(ours, ids, s)
    st = h2.budget_stats()
    assert st["kept_layers"] == 2 and st["layers"] == LAYERS
    assert h2.stats()["offloads"] == (LAYERS - 1) + (LAYERS - 1 - 2)  # step 0 all; step 1 past the kept two
    assert any(f"keeps 2 of {LAYERS} decoder layers" in r.getMessage() for r in caplog.records)


def test_scheduler_binding_round_trip_and_misuse():
    sched = core.OffloadScheduler(None, lookahead=2)
    src = torch.randn(1000, dtype=torch.float64)
    h = sched.offload(src.data_ptr(), src.numel() * 8)
    assert sched.state(h) == "offloaded" and sched.nbytes(h) == 8000
    dst = torch.empty_like(src)
    sched.prefetch(h, dst.data_ptr())
    sched.wait(h)
    assert torch.equal(dst, src)
    sched.release(h)
    with pytest.raises(core.OffloadError, match="unknown handle"):
        sched.release(h)
    with pytest.raises(core.RsloraError):
        sched.wait(h)
    st = sched.stats()
    assert st["in_use_bytes"] == 0 and st["offloads"] == 1 and st["reserved_bytes"] >= 8000
