"""``rslora-fast finetune`` end to end on the embedded demo (CPU, a few steps), through ``main``."""

from __future__ import annotations

import json

import pytest
import torch

from rslora_fast.__main__ import main


def _state(ckpt):
    return json.loads((ckpt / "trainer_state.json").read_text())


@pytest.fixture
def cli_cache(tmp_path, monkeypatch):
    """Build the demo model under tmp_path, not in the user's cache."""
    monkeypatch.setenv("RSLORA_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_finetune_demo_saves_adapter_and_resumes(tmp_path, cli_cache, capsys):
    out = tmp_path / "run"
    common = ["finetune", "--output-dir", str(out), "--batch-size", "4", "--max-seq-length", "64",
              "--logging-steps", "1", "--save-steps", "3", "--max-new-tokens", "4"]  # fmt: skip
    assert main([*common, "--max-steps", "3", "--save-merged", "merged_16bit"]) == 0
    assert (cli_cache / "demo-llama" / "config.json").is_file()

    adapter = out / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16
    assert (adapter / "adapter_model.safetensors").is_file()
    first = _state(out / "checkpoint-3")
    losses = [h["loss"] for h in first["log_history"] if "loss" in h]
    assert len(losses) == 3 and all(x == x for x in losses)
    printed = capsys.readouterr().out
    assert "reloaded adapter generates:" in printed

    # the merged export loads in plain transformers
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged_16bit"))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.isfinite(merged(input_ids=torch.tensor([[5, 6, 7]])).logits).all()

    # --resume continues from checkpoint-3 up to the new --max-steps
    assert main([*common, "--max-steps", "5", "--resume"]) == 0
    second = _state(out / "checkpoint-5")
    assert second["global_step"] == 5
    steps = [h["step"] for h in second["log_history"] if "loss" in h]
    assert steps == [1, 2, 3, 4, 5]
    assert [h["loss"] for h in second["log_history"] if "loss" in h][:3] == losses


# ----------------------------------------------------------------------------- run safety

SHORT = ["--batch-size", "4", "--max-seq-length", "64", "--logging-steps", "1", "--max-new-tokens", "2"]


def test_diverging_run_exits_3_and_keeps_the_previous_adapter(tmp_path, cli_cache, capsys):
    out = tmp_path / "run"
    adapter = out / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"the last good adapter")
    code = main(["finetune", "--output-dir", str(out), *SHORT, "--max-steps", "4", "--save-steps", "100",
                 "--lr", "1e12", "--dtype", "float16"])  # fmt: skip
    assert code == 3
    err = capsys.readouterr().err
    assert "training diverged at step" in err and "was not overwritten" in err
    assert (adapter / "adapter_model.safetensors").read_bytes() == b"the last good adapter"
    assert not (out / ".rslora-fast.lock").exists()


def test_latest_complete_checkpoint_skips_a_half_written_one(tmp_path, caplog):
    from rslora_fast.finetune import CHECKPOINT_FILES, latest_complete_checkpoint

    for n in (2, 4, 6):
        d = tmp_path / f"checkpoint-{n}"
        d.mkdir()
        for f in CHECKPOINT_FILES:
            (d / f).write_text("{}")
    (tmp_path / "checkpoint-6" / "trainer_state.json").unlink()  # killed while saving
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"global_')  # truncated
    (tmp_path / "checkpoint-10").write_text("not a folder")
    with caplog.at_level("WARNING"):
        assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert "skipping incomplete checkpoint" in caplog.text and "checkpoint-6" in caplog.text
    assert latest_complete_checkpoint(tmp_path / "nothing") is None


def test_second_run_into_one_output_dir_fails_fast(tmp_path, cli_cache, capsys):
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".rslora-fast.lock").write_text(f"{holder.pid}\n")
        assert main(["finetune", "--output-dir", str(out), *SHORT, "--max-steps", "1"]) == 2
        err = capsys.readouterr().err
        assert f"lock {out / '.rslora-fast.lock'}, pid {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_from_a_dead_pid_is_taken_over(tmp_path):
    import subprocess
    import sys

    from rslora_fast.finetune import OutputDirLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".rslora-fast.lock").write_text(f"{dead.pid}\n")
    with OutputDirLock(tmp_path) as lock:
        assert lock.path.read_text().strip() == str(__import__("os").getpid())
    assert not lock.path.exists()


def test_sigterm_saves_the_adapter_and_exits_143(tmp_path, cli_cache):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "rslora_fast", "finetune", "--output-dir", str(out), *SHORT,
           "--max-steps", "100000", "--save-steps", "100000"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        seen = ""
        while "'loss'" not in seen and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
        assert "'loss'" in seen, seen[-2000:]
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, rest[-2000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "SIGTERM" in rest
