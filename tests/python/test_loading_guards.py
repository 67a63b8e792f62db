"""Loader guards: a config describing fewer layers than the checkpoint holds is an error, and a CPU
4-bit load keeps no safetensors shard mapped (host memory stays near the model's own bytes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from rslora_fast.loading import CheckpointError, from_pretrained

CFG = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["a tiny model"], trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>"])
    )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


@pytest.fixture
def three_layers(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()
    model.save_pretrained(tmp_path)
    _tokenizer().save_pretrained(tmp_path)
    return tmp_path


def test_config_with_fewer_layers_than_checkpoint_is_an_error(three_layers):
    cfg = json.loads((three_layers / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (three_layers / "config.json").write_text(json.dumps(cfg))
    for load_in_4bit in (False, True):
        with pytest.raises(CheckpointError, match=r"num_hidden_layers=2.*model\.layers\.2\."):
            from_pretrained(three_layers, load_in_4bit=load_in_4bit, device_map="cpu", progress=False)


def test_unknown_weight_is_an_error_but_rotary_inv_freq_is_ignored(three_layers):
    path = three_layers / "model.safetensors"
    sd = load_file(str(path))
    sd["model.rotary_emb.inv_freq"] = torch.ones(8)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(sd, str(path), metadata={"format": "pt"})
    model, _ = from_pretrained(three_layers, load_in_4bit=False, device_map="cpu", progress=False)
    assert len(model.model.layers) == 3

    sd["model.extra_head.weight"] = torch.ones(4, 4)
    save_file(sd, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.extra_head\.weight"):
        from_pretrained(three_layers, load_in_4bit=False, device_map="cpu", progress=False)


# The child writes nothing: it loads a checkpoint written by the test and reports its memory.
_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from rslora_fast.loading import from_pretrained

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    def mapped(root):
        return sorted({l.split()[-1] for l in open("/proc/self/maps") if root in l})

    root, warm = sys.argv[1], sys.argv[2]
    from_pretrained(warm, load_in_4bit=True, device_map="cpu", progress=False)  # imports, code paths
    base = status("VmRSS")
    model, tok = from_pretrained(root, load_in_4bit=True, device_map="cpu", progress=False)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps({"growth": status("VmRSS") - base, "model_bytes": model_bytes, "maps": mapped(root)}))
    """
)


def _write_sharded(path, hidden, layers, shard_bytes):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                                   max_position_embeddings=128)  # fmt: skip
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    shards, cur, size = [], {}, 0
    for k, shape in shapes.items():
        t = torch.randn(shape) * 0.02 if len(shape) == 2 else torch.ones(shape)
        if cur and size + t.numel() * 4 > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += t.numel() * 4
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors")), max(
        f.stat().st_size for f in path.glob("*.safetensors")
    )


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_cpu_4bit_load_keeps_no_shard_mapped(tmp_path):
    big, warm = tmp_path / "big", tmp_path / "warm"
    big.mkdir()
    warm.mkdir()
    _write_sharded(warm, 64, 1, 1 << 20)
    total, shard = _write_sharded(big, 1024, 12, 48 << 20)  # ~0.5 GB of float32 in 48 MB shards
    out = subprocess.run([sys.executable, "-c", _CHILD, str(big), str(warm)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["maps"] == [], got["maps"]  # no shard is still mapped into the process
    limit = got["model_bytes"] + shard + int(0.3 * 2**30)
    assert got["growth"] <= limit, (got, total, shard)
