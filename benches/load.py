"""Load benchmark: rslora_fast.from_pretrained(load_in_4bit=True) vs transformers + bitsandbytes.

Writes a checkpoint of random bf16 weights with a real model's shapes (default: Llama-3-8B,
sharded like the hub's, plus a tiny tokenizer), then loads it in a fresh subprocess per loader and
reports load time, peak host RSS, peak GPU memory during the load and GPU memory after it.

    python benches/load.py --out load.jsonl                  # Llama-3-8B shape, needs a GPU, ~17 GB disk
    python benches/load.py --shape tiny --out /tmp/l.jsonl   # seconds, CPU is fine (smoke test)

Each result is one JSON line in ``--out``; a table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "tiny": dict(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    ),
}  # fmt: skip


def write_checkpoint(out: Path, shape: str, shard_bytes: int = 5 << 30) -> None:
    """Random bf16 weights (std 0.02, norms 1) with ``shape``'s names/shapes, written shard by shard."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    if (out / "config.json").exists():
        print(f"reusing checkpoint in {out}")
        return
    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**SHAPES[shape])
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    gen_dev = "cuda" if torch.cuda.is_available() else "cpu"
    items = list(meta.state_dict().items())
    total = sum(t.numel() * 2 for _, t in items)
    groups: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in items:  # plan shards first so file names carry the right count
        if groups[-1] and size + t.numel() * 2 > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, t))
        size += t.numel() * 2
    nshards = len(groups)
    weight_map = {}
    g = torch.Generator(device=gen_dev).manual_seed(0)
    t0 = time.time()
    for idx, group in enumerate(groups, 1):
        shard = {}
        for name, t in group:
            if t.dim() == 1:
                shard[name] = torch.ones(t.shape, dtype=torch.bfloat16)
            else:
                x = torch.randn(t.shape, generator=g, device=gen_dev, dtype=torch.float32) * 0.02
                shard[name] = x.to(torch.bfloat16).cpu()
        fname = "model.safetensors" if nshards == 1 else f"model-{idx:05d}-of-{nshards:05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
        del shard
    if nshards > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    cfg.save_pretrained(out)
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(out)
    print(f"wrote {total / 1e9:.2f} GB in {nshards} shard(s) to {out} in {time.time() - t0:.1f}s")


CHILD = r"""
import json, resource, sys, time, threading
import torch
which, path = sys.argv[1], sys.argv[2]
cuda = torch.cuda.is_available()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
import transformers  # imports are not part of the load time
from rslora_fast.loading import from_pretrained
if which != "rslora_fast":
    import bitsandbytes
if cuda:
    torch.cuda.init(); torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
if which == "rslora_fast":
    model, tok = from_pretrained(path, load_in_4bit=True, progress=False)
else:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map="cuda:0" if cuda else "cpu")
if cuda:
    torch.cuda.synchronize()
dt = time.perf_counter() - t0
res = dict(loader=which, load_s=round(dt, 2),
           peak_host_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3),
           host_rss_before_gb=round(rss0 / 1e9, 3))
if cuda:
    res["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    res["gpu_after_gb"] = round(torch.cuda.memory_allocated() / 1e9, 3)
    res["gpu"] = torch.cuda.get_device_name()
    ids = torch.tensor([[1, 3, 4, 2]], device="cuda")
    with torch.no_grad():
        res["logits_finite"] = bool(torch.isfinite(model(ids).logits).all())
print("RESULT " + json.dumps(res))
"""


def run_child(which: str, path: Path) -> dict:
    env = dict(os.environ)
    repo_python = str(Path(__file__).resolve().parents[1] / "python")
    env["PYTHONPATH"] = repo_python + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(
        [sys.executable, "-c", CHILD, which, str(path)], capture_output=True, text=True, env=env
    )
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"loader": which, "error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--dir", type=Path, default=None, help="checkpoint directory (written if missing)")
    ap.add_argument("--out", type=Path, default=Path("load_bench.jsonl"))
    ap.add_argument("--shard-gb", type=float, default=5.0, help="shard size of the written checkpoint")
    ap.add_argument("--no-baseline", action="store_true", help="skip transformers + bitsandbytes")
    args = ap.parse_args()
    ckpt = args.dir or Path(f"/tmp/rslora_bench_{args.shape}_random_bf16")
    write_checkpoint(ckpt, args.shape, int(args.shard_gb * (1 << 30)))

    loaders = ["rslora_fast"]
    if not args.no_baseline:
        try:
            import bitsandbytes  # noqa: F401

            loaders.append("transformers+bitsandbytes")
        except ImportError:
            print("bitsandbytes not importable: baseline skipped")
    rows = []
    for which in loaders:
        res = run_child(which, ckpt)
        res.update(shape=args.shape, checkpoint=str(ckpt))
        rows.append(res)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(res) + "\n")
    cols = ["loader", "load_s", "peak_host_rss_gb", "peak_gpu_gb", "gpu_after_gb", "error"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
