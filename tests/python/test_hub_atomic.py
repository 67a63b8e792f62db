"""Hub uploads (HfApi replaced in the test: no network) and crash-safe saves (a failure injected mid-save)."""

from __future__ import annotations

import os

import pytest
import torch

from rslora_fast import RsloraError, get_peft_model
from rslora_fast.demo import build_demo_model
from rslora_fast.hub import HubError, HubUnreachableError, push_folder
from rslora_fast.loading import from_pretrained


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_demo_model(tmp_path_factory.mktemp("hub_base"), hidden_size=64, num_layers=2, seed=1)


def _peft(path, load_in_4bit=True):
    model, tok = from_pretrained(
        path, load_in_4bit=load_in_4bit, dtype=torch.float32, device_map="cpu", progress=False
    )
    return get_peft_model(model, r=8, use_gradient_checkpointing=False, random_state=1), tok


def test_push_to_hub_uploads_the_adapter(base_dir, fake_hub):
    pm, tok = _peft(base_dir)
    url = pm.push_to_hub("me/tiny-lora", private=True, token="t")
    assert url.endswith("/commit/abc")
    assert fake_hub["create"] == {
        "repo_id": "me/tiny-lora",
        "private": True,
        "exist_ok": True,
        "repo_type": "model",
    }
    assert fake_hub["upload"]["repo_id"] == "me/tiny-lora"
    assert fake_hub["upload"]["files"] == {"adapter_config.json", "adapter_model.safetensors"}


@pytest.mark.parametrize("method", ["merged_16bit", "merged_4bit", "lora"])
def test_push_to_hub_merged_uploads_what_the_save_writes(base_dir, fake_hub, tmp_path, method):
    pm, tok = _peft(base_dir)
    pm.push_to_hub_merged("me/tiny-merged", tok, save_method=method, private=False)
    saved = pm.save_pretrained_merged(tmp_path / "local", tok, save_method=method)
    assert fake_hub["upload"]["files"] == {str(p.relative_to(saved)) for p in saved.rglob("*") if p.is_file()}
    assert fake_hub["create"]["private"] is False
    with pytest.raises(ValueError, match=r"\['merged_16bit', 'merged_4bit', 'lora'\].*'gguf'"):
        pm.push_to_hub_merged("me/x", tok, save_method="gguf")


def test_offline_push_names_the_repo(base_dir, monkeypatch, tmp_path):
    (tmp_path / "f.txt").write_text("x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError, match=r"'me/offline'.*no network was reached") as info:
        push_folder(tmp_path, "me/offline")
    assert isinstance(info.value, RsloraError)

    import httpx
    from huggingface_hub import HfApi

    monkeypatch.delenv("HF_HUB_OFFLINE")

    def refuse(self, *a, **k):
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(HubUnreachableError, match=r"'me/net'.*no network was reached"):
        push_folder(tmp_path, "me/net")

    def forbidden(self, *a, **k):
        raise PermissionError("403 Forbidden")

    monkeypatch.setattr(HfApi, "create_repo", forbidden)
    with pytest.raises(HubError, match=r"'me/denied'.*403") as info:
        push_folder(tmp_path, "me/denied")
    assert not isinstance(info.value, HubUnreachableError)


# ----------------------------------------------------------------------------- atomic saves
def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _fail_on_write(monkeypatch, after=0):
    """Make safetensors' writer raise on its (after+1)-th call, as a full disk would."""
    import safetensors.torch

    real = safetensors.torch.save_file
    count = {"n": 0}

    def failing(tensors, filename, metadata=None):
        count["n"] += 1
        if count["n"] > after:
            with open(filename, "wb") as fh:  # half a file, then the error
                fh.write(b"partial")
            raise OSError(28, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_failed_adapter_save_leaves_the_previous_adapter(base_dir, tmp_path, monkeypatch):
    pm, tok = _peft(base_dir)
    out = tmp_path / "adapter"
    pm.save_pretrained(out)
    tok.save_pretrained(out)
    before = _snapshot(out)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.add_(1.0)
    _fail_on_write(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        pm.save_pretrained(out)
    assert _snapshot(out) == before
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()
    pm.save_pretrained(out)  # a good save replaces the adapter and keeps the tokenizer beside it
    after = _snapshot(out)
    assert after["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    assert after["tokenizer.json"] == before["tokenizer.json"]


@pytest.mark.parametrize("method", ["merged_16bit", "merged_4bit"])
def test_failed_merged_save_leaves_the_previous_export(base_dir, tmp_path, monkeypatch, method):
    pm, tok = _peft(base_dir)
    out = tmp_path / "merged"
    pm.save_pretrained_merged(out, tok, save_method=method, max_shard_size="100KB")
    before = _snapshot(out)
    assert sum(n.startswith("model-") for n in before) >= 2
    _fail_on_write(monkeypatch, after=1)  # the first shard is written, the second fails
    with pytest.raises(OSError, match="No space"):
        pm.save_pretrained_merged(out, tok, save_method=method, max_shard_size="100KB")
    assert _snapshot(out) == before
    assert _leftovers(tmp_path) == []


def test_resave_drops_stale_shards_and_keeps_other_files(base_dir, tmp_path):
    pm, tok = _peft(base_dir)
    out = tmp_path / "m"
    pm.save_pretrained_merged(out, tok, max_shard_size="100KB")
    (out / "README.md").write_text("my notes")
    pm.save_pretrained_merged(out, tok)  # one shard now
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and not [n for n in names if n.startswith("model-")]
    assert "model.safetensors.index.json" not in names
    assert (out / "README.md").read_text() == "my notes"


def test_atomic_file_and_stale_temporaries(tmp_path):
    from rslora_fast.atomic import atomic_dir, atomic_file

    target = tmp_path / "x.gguf"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    # a temporary left by a process that no longer exists is removed by the next write
    dead = tmp_path / ".out.tmp-999999999-abcd"
    dead.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
    assert not dead.exists() and (tmp_path / "out" / "a").read_text() == "a"
    assert os.listdir(tmp_path / "out") == ["a"]


def test_a_previous_version_caught_between_renames_is_restored(tmp_path):
    from rslora_fast.atomic import atomic_dir

    old = tmp_path / ".out.old-999999999-abcd"  # the fallback swap died after its first rename
    old.mkdir()
    (old / "adapter_model.safetensors").write_text("v1")
    (old / "tokenizer.json").write_text("tok")
    with atomic_dir(tmp_path / "out", owned=("adapter_*",)) as tmp:
        (tmp / "adapter_model.safetensors").write_text("v2")
    assert not old.exists()
    assert (tmp_path / "out" / "adapter_model.safetensors").read_text() == "v2"
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "tok"  # the restored version's neighbour


def test_replacing_without_an_atomic_exchange(tmp_path, monkeypatch):
    import rslora_fast.atomic as atomic

    for exchange in (atomic._exchange, lambda a, b: False):  # Linux renameat2, then the two-rename fallback
        monkeypatch.setattr(atomic, "_exchange", exchange)
        target = tmp_path / f"out{id(exchange)}"
        for version in ("v1", "v2"):
            with atomic.atomic_dir(target) as tmp:
                (tmp / "f").write_text(version)
        assert (target / "f").read_text() == "v2"
        assert _leftovers(tmp_path) == []
