"""``rslora-fast finetune`` end to end on the embedded demo (CPU, a few steps), through ``main``."""

from __future__ import annotations

import json
import math

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

    # a run killed while saving left a half-written checkpoint-4: --resume skips it and continues
    # from checkpoint-3 up to the new --max-steps
    half = out / "checkpoint-4"
    half.mkdir()
    (half / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
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


class _Toy(torch.nn.Module):
    """One trainable weight; the loss is NaN for batches whose first token is 7."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))

    def forward(self, input_ids, attention_mask=None, labels=None):
        loss = self.w.square().sum()
        if int(input_ids[0, 0]) == 7:
            loss = loss * float("nan")
        return {"loss": loss}


def _toy_trainer(tmp_path, policy, first_tokens):
    from transformers import TrainingArguments

    from rslora_fast.finetune import PadCollator, _make_trainer_class

    rows = [{"input_ids": [t, 1, 2]} for t in first_tokens]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=len(rows), per_device_train_batch_size=1,
                             learning_rate=0.1, report_to=[], use_cpu=True, save_strategy="no",
                             remove_unused_columns=False, logging_steps=1)  # fmt: skip
    trainer = _make_trainer_class()(model=_Toy(), args=args, train_dataset=rows, data_collator=PadCollator(0))
    trainer.nan_policy = policy
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
    return trainer


def test_nan_loss_stops_at_its_step_before_the_weights_change(tmp_path):
    from rslora_fast.errors import TrainingDivergedError

    trainer = _toy_trainer(tmp_path, "stop", [3, 7, 3])
    with pytest.raises(TrainingDivergedError, match="loss became nan at step 2") as exc:
        trainer.train()
    assert exc.value.step == 2
    assert torch.isfinite(trainer.model.w).all()


def test_nan_policy_skip_drops_the_bad_step_and_goes_on(tmp_path):
    trainer = _toy_trainer(tmp_path, "skip", [3, 7, 3, 3])
    trainer.train()
    assert trainer.state.global_step == 4
    assert torch.isfinite(trainer.model.w).all()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(x) for x in losses)


def test_nan_policy_skip_still_stops_after_ten_bad_steps_in_a_row(tmp_path):
    from rslora_fast.errors import TrainingDivergedError

    trainer = _toy_trainer(tmp_path, "skip", [3] + [7] * 12)
    with pytest.raises(TrainingDivergedError, match="at step 11"):
        trainer.train()
