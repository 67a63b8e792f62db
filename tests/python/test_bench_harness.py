"""The training-step benchmark harness runs end to end on CPU with a tiny shape (so it cannot rot)."""

from __future__ import annotations

import json

import pytest


def _load_bench():
    from rslora_fast import bench

    return bench


def test_train_step_harness_tiny_cpu(tmp_path):
    bench = _load_bench()
    out = tmp_path / "rows.jsonl"
    systems = "rslora_fast:4bit:unsloth,rslora_fast:16bit:true,rslora_fast:4bit:unsloth:budget=1"
    argv = [
        "--shape",
        "tiny",
        "--systems",
        systems,
        "--batch",
        "2",
        "--seq-len",
        "32",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--cache",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        "--in-process",
    ]
    assert bench.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["system"] for r in rows] == systems.split(",")
    for r in rows:
        assert r["losses_finite"] and r["tokens_per_s"] > 0 and len(str(r["final_loss"])) > 0
        assert r["step_s_median"] > 0
    # Only the budget system reports what its budget kept (1 GiB holds every layer of the tiny shape).
    assert [("kept_layers" in r) for r in rows] == [False, False, True]
    assert rows[2]["kept_layers"] == rows[2]["layers"] == 2


def test_unknown_system_is_reported(tmp_path):
    bench = _load_bench()
    with pytest.raises(ValueError, match="unknown system"):
        bench.load_system("nope:bf16", tmp_path, 8, 4)


def _load_offload_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benches" / "offload_step.py"
    spec = importlib.util.spec_from_file_location("offload_step_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("base,lora", [("bf16", "rslora"), ("4bit", "rslora"), ("bf16", "minimal")])
def test_offload_step_bench_interleaves_modes_on_cpu(tmp_path, base, lora):
    bench = _load_offload_bench()
    out = tmp_path / "offload.jsonl"
    argv = ["--device", "cpu", "--seq", "600", "--layers", "3", "--hidden", "64", "--intermediate", "128",
            "--heads", "4", "--kv-heads", "2", "--vocab", "256", "--rounds", "3", "--iters", "2",
            "--modes", "plain", "offload", "--base", base, "--lora", lora, "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_mode = {r["mode"]: r for r in rows if "mode" in r}
    assert set(by_mode) == {"plain", "offload"}
    for r in by_mode.values():
        assert len(r["step_s_rounds"]) == 3 and r["step_s"] > 0
    # Only the offloaded mode parked layer inputs on the host: 2 of 3 layers (the last stays) in
    # each of the 1 warm-up + 2 timed steps since its last install (each round re-installs it).
    assert "host" not in by_mode["plain"]
    assert by_mode["offload"]["host"]["offloads"] == 2 * 3
    summary = [r for r in rows if "time_ratio_offload_over_plain" in r]
    assert len(summary) == 1 and summary[0]["rounds"] == 3
