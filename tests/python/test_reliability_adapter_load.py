"""Adapter loading is validated in full before any module changes, and all or nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import rslora_fast
from rslora_fast import PeftModel, get_peft_model
from rslora_fast.peft import LoraLinear
from rslora_fast.peft.io import WEIGHTS_NAME


def _saved_adapter(make, path: Path, seed: int = 1, **kw) -> Path:
    pm = get_peft_model(make(), r=4, lora_alpha=8, use_gradient_checkpointing=False, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in pm.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g))
    pm.save_pretrained(path)
    return path


def _lora_count(model) -> int:
    return sum(isinstance(m, LoraLinear) for m in model.modules())


def _corrupt(path: Path, how: str) -> None:
    f = path / WEIGHTS_NAME
    if how == "empty":
        f.write_bytes(b"")
        return
    if how == "truncated":
        f.write_bytes(f.read_bytes()[:-40])
        return
    sd = load_file(f)
    last = sorted(k for k in sd if "lora_B" in k)[-1]  # the last key: earlier ones would be copied
    if how == "nan":
        sd[last][0, 0] = float("nan")
    elif how == "int":
        sd[last] = sd[last].to(torch.int32)
    elif how == "shape":
        sd[last] = sd[last][:, :-1].contiguous()
    save_file(sd, f, metadata={"format": "pt"})


@pytest.mark.parametrize("how", ["nan", "int", "shape", "truncated", "empty"])
def test_failed_from_pretrained_leaves_no_lora_modules_and_the_next_good_load_works(
    peft_tiny_model, tmp_path, how
):
    good = _saved_adapter(peft_tiny_model, tmp_path / "good")
    bad = _saved_adapter(peft_tiny_model, tmp_path / "bad")
    _corrupt(bad, how)
    model = peft_tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(model, bad)
    assert str(bad / WEIGHTS_NAME) in str(info.value)  # the message names the file
    assert _lora_count(model) == 0
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    pm = PeftModel.from_pretrained(model, good)
    assert _lora_count(pm) > 0


def test_failed_load_adapter_keeps_every_tensor_and_scaling(peft_tiny_model, tmp_path):
    first = _saved_adapter(peft_tiny_model, tmp_path / "first", seed=1)
    other = _saved_adapter(peft_tiny_model, tmp_path / "other", seed=2)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 32  # would change every scaling
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    _corrupt(other, "nan")
    pm = PeftModel.from_pretrained(peft_tiny_model(), first)
    tensors = {k: v.clone() for k, v in pm.state_dict().items()}
    scalings = [m.scaling for m in pm.modules() if isinstance(m, LoraLinear)]
    with pytest.raises(ValueError, match="NaN"):
        pm.load_adapter(other)
    assert all(torch.equal(pm.state_dict()[k], v) for k, v in tensors.items())
    assert [m.scaling for m in pm.modules() if isinstance(m, LoraLinear)] == scalings


def test_huge_rank_is_refused_before_any_allocation(peft_tiny_model, tmp_path):
    path = _saved_adapter(peft_tiny_model, tmp_path / "a")
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["r"] = 4194304
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    model = peft_tiny_model()
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"r=4194304 .* out of range; expected an int in 1\.\.\d+"):
        PeftModel.from_pretrained(model, path)
    assert time.perf_counter() - start < 5
    assert _lora_count(model) == 0


def test_catastrophic_target_regex_does_not_hang(peft_tiny_model):
    # Python's backtracking re takes exponential time on "(.*)*X" against a long module name.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from conftest import peft_build_tiny_model as mk\n"
        "from rslora_fast import get_peft_model\n"
        "m = mk(); m.model.layers[0].self_attn.add_module('q' * 40, __import__('torch').nn.Linear(32, 32))\n"
        "try:\n    get_peft_model(m, target_modules='(.*)*X', use_gradient_checkpointing=False)\n"
        "except ValueError as e:\n    print('raised', type(e).__name__)\n"
    )
    env = {"PYTHONPATH": str(Path(rslora_fast.__file__).parent.parent), "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "raised" in res.stdout


def test_empty_or_malformed_config_names_the_path(peft_tiny_model, tmp_path):
    path = _saved_adapter(peft_tiny_model, tmp_path / "a")
    (path / "adapter_config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"adapter_config\.json.*not a valid JSON"):
        PeftModel.from_pretrained(peft_tiny_model(), path)
    (path / "adapter_config.json").write_text("")
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        PeftModel.from_pretrained(peft_tiny_model(), path)


def test_get_peft_model_refuses_a_model_wrapped_by_hf_peft(peft_tiny_model):
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(peft_tiny_model(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="already wrapped by HF peft"):
        get_peft_model(wrapped, use_gradient_checkpointing=False)


@pytest.mark.parametrize("bad", [0, -5])
def test_get_peft_model_refuses_non_positive_max_seq_length(peft_tiny_model, bad):
    with pytest.raises(ValueError, match=f"max_seq_length.*{bad}"):
        get_peft_model(peft_tiny_model(), max_seq_length=bad, use_gradient_checkpointing=False)
