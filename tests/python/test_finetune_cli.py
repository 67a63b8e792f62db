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
