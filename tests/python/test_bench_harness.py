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
    systems = "rslora_fast:4bit:unsloth,rslora_fast:16bit:true"
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


def test_unknown_system_is_reported(tmp_path):
    bench = _load_bench()
    with pytest.raises(ValueError, match="unknown system"):
        bench.load_system("nope:bf16", tmp_path, 8, 4)
