"""Where one training step's GPU time goes: torch.profiler over rslora_fast steps (protocol workload).

    python benches/profile_step.py --system rslora_fast:4bit:unsloth --out results/profile.txt

Loads the shape through ``rslora_fast.bench``'s loader, runs warm-up steps, profiles two steps and
prints the kernels by self CUDA time plus totals per category (GEMM, attention, NF4 dequantize,
copies, elementwise/other).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

from rslora_fast import bench as train_step

CATEGORIES = [
    ("gemm", ("gemm", "cutlass", "sm90_xmma", "cublas", "nvjet")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("nf4 dequantize", ("nf4_dequant",)),
    ("copies", ("memcpy", "copy_", "memset")),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "elementwise / other"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3-8b")
    p.add_argument("--system", default="rslora_fast:4bit:unsloth")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--cache", default="bench-cache")
    p.add_argument("--out", default="results/profile.txt")
    args = p.parse_args(argv)
    model_dir = train_step.build_checkpoint(args.shape, Path(args.cache))
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    model = train_step.load_system(args.system, model_dir, args.seq_len, 16)
    train_step.train_steps(model, args.batch, args.seq_len, vocab, 3, 0)  # warm-up
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        res = train_step.train_steps(model, args.batch, args.seq_len, vocab, 0, 2)
    step_s = sum(res["step_times"]) / len(res["step_times"])
    totals: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        dev = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if dev and evt.device_type == torch.autograd.DeviceType.CUDA:
            kernels[evt.key] += dev / 1e3 / 2  # ms per step
    for name, ms in kernels.items():
        totals[category(name)] += ms
    lines = [
        f"{args.system} {args.shape} batch {args.batch} x {args.seq_len}: step {step_s * 1e3:.1f} ms (host clock)"
    ]
    gpu_ms = sum(totals.values())
    lines.append(
        f"GPU kernel time per step: {gpu_ms:.1f} ms ({100 * gpu_ms / (step_s * 1e3):.0f}% of the step)"
    )
    lines.append("| category | ms / step | share of GPU time |")
    lines.append("|---|---|---|")
    for cat, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {cat} | {ms:.1f} | {100 * ms / gpu_ms:.1f}% |")
    lines.append("")
    lines.append("| kernel | ms / step |")
    lines.append("|---|---|")
    for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:25]:
        lines.append(f"| {name[:90]} | {ms:.2f} |")
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
