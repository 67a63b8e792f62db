"""Load benchmark: rslora_fast.from_pretrained(load_in_4bit=True) vs transformers + bitsandbytes.

Writes (once, into ``--cache``, with ``rslora_fast.bench.build_checkpoint``) a checkpoint of random bf16
weights with a real model's shapes (default: Llama-3-8B), then loads it in a fresh subprocess per loader and
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
from pathlib import Path

# The checkpoint is the training-step harness's (same shapes, same random bf16 weights, one writer).
from rslora_fast.bench import SHAPES, append_jsonl, build_checkpoint  # noqa: E402

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
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    ap.add_argument(
        "--cache", type=Path, default=Path("bench-cache"), help="checkpoint cache (written if missing)"
    )
    ap.add_argument("--out", type=Path, default=Path("load_bench.jsonl"))
    ap.add_argument("--no-baseline", action="store_true", help="skip transformers + bitsandbytes")
    args = ap.parse_args()
    ckpt = build_checkpoint(args.shape, args.cache)

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
        append_jsonl(args.out, [res])
    cols = ["loader", "load_s", "peak_host_rss_gb", "peak_gpu_gb", "gpu_after_gb", "error"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
