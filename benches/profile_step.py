"""Where one training step's time goes: torch.profiler over the protocol's steps, by category.

    python benches/profile_step.py --system rslora_fast:4bit:unsloth --out results/profile.txt
    python benches/profile_step.py --smoke      # tiny shape on CPU (CI)

Loads the shape through ``rslora_fast.bench``'s loader, runs warm-up steps, profiles ``--steps``
steps and prints the time per step by category: LoRA GEMMs and LoRA casts (matrix products and
copies with the LoRA rank among their matrix dimensions, from the ops' recorded input shapes), base
GEMMs, attention, norms, NF4 dequantize, cross-entropy, optimizer, copies, the rest; then the LoRA
share of the step and the top kernels. On CUDA the categories are GPU kernel time; on CPU, op time.
A JSON line with the same figures is appended to ``--json-out``.
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

# (category, name fragments), first match wins; names are kernel names on CUDA, op names on CPU.
CATEGORIES = [
    ("optimizer", ("adam", "multi_tensor_apply", "_foreach")),
    ("nf4 dequantize", ("nf4", "dequant")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "scaled_dot_product")),
    ("cross-entropy", ("cross_entropy", "log_softmax", "nll_loss", "fused_ce", "logsumexp")),
    ("norms", ("rms_norm", "rmsnorm", "layer_norm")),
    ("gemm", ("gemm", "cutlass", "sm90_xmma", "cublas", "nvjet", "aten::mm", "aten::addmm", "aten::bmm")),
    ("copies / casts", ("memcpy", "copy_", "memset", "_to_copy")),
]
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_"}
COPY_OPS = {"aten::copy_"}


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "elementwise / other"


def is_lora_shape(shapes, r: int) -> bool:
    """True when the LoRA rank is one of the matrix dimensions of an input (A: [r, in], B: [out, r])."""
    return any(isinstance(s, (list, tuple)) and len(s) >= 2 and r in s[-2:] for s in shapes or [])


def breakdown(prof, r: int, on_gpu: bool, steps: int) -> dict[str, float]:
    """Milliseconds per step by category, LoRA GEMMs and casts split from the base ones by shape."""
    totals: dict[str, float] = defaultdict(float)
    kind = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
    for evt in prof.key_averages():
        if evt.device_type == kind:
            t = evt.self_device_time_total if on_gpu else evt.self_cpu_time_total
            totals[category(evt.key)] += t / 1e3 / steps
    lora = {"LoRA GEMMs": ("gemm", GEMM_OPS), "LoRA casts": ("copies / casts", COPY_OPS)}
    for name, (parent, ops) in lora.items():
        ms = 0.0
        for evt in prof.key_averages(group_by_input_shape=True):
            if (
                evt.device_type == torch.autograd.DeviceType.CPU
                and evt.key in ops
                and is_lora_shape(evt.input_shapes, r)
            ):
                ms += (evt.self_device_time_total if on_gpu else evt.self_cpu_time_total) / 1e3 / steps
        moved = min(ms, totals[parent])
        totals[parent] -= moved
        totals[name] = moved
    totals["base GEMMs"] = totals.pop("gemm", 0.0)
    return dict(totals)


def top_kernels(prof, on_gpu: bool, steps: int, n: int = 25) -> list[tuple[str, float]]:
    kind = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
    per: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        if evt.device_type == kind:
            per[evt.key] += (evt.self_device_time_total if on_gpu else evt.self_cpu_time_total) / 1e3 / steps
    return sorted(per.items(), key=lambda kv: -kv[1])[:n]


def report(args, step_ms: float, totals: dict[str, float], kernels, on_gpu: bool) -> tuple[str, dict]:
    busy = sum(totals.values())
    lora = totals.get("LoRA GEMMs", 0.0) + totals.get("LoRA casts", 0.0)
    where = "GPU kernel" if on_gpu else "CPU op"
    lines = [
        f"{args.system} {args.shape} batch {args.batch} x {args.seq_len}: step {step_ms:.1f} ms (host clock)",
        f"{where} time per step: {busy:.1f} ms ({100 * busy / step_ms:.0f}% of the step)",
        f"LoRA share: {lora:.1f} ms per step = {100 * lora / busy:.1f}% of the {where} time "
        f"({100 * lora / step_ms:.1f}% of the step)",
        "| category | ms / step | share |",
        "|---|---|---|",
    ]
    for cat, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {cat} | {ms:.2f} | {100 * ms / busy:.1f}% |")
    lines += ["", "| kernel | ms / step |", "|---|---|"]
    lines += [f"| {name[:90]} | {ms:.2f} |" for name, ms in kernels]
    row = {"kind": "profile", "system": args.system, "shape": args.shape, "batch": args.batch}
    row.update(seq_len=args.seq_len, step_ms=round(step_ms, 2), busy_ms=round(busy, 2))
    row.update(lora_ms=round(lora, 2), lora_share=round(lora / busy, 4), device="cuda" if on_gpu else "cpu")
    row["categories_ms"] = {k: round(v, 3) for k, v in totals.items()}
    return "\n".join(lines), row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3-8b")
    p.add_argument("--system", default="rslora_fast:4bit:unsloth")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--optimizer", default="default", choices=train_step.OPTIMIZERS)
    p.add_argument("--cache", default="bench-cache")
    p.add_argument("--out", default="results/profile.txt")
    p.add_argument("--json-out", default="results/profile.jsonl")
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU, seconds (CI)")
    args = p.parse_args(argv)
    if args.smoke:  # r=8: no dimension of the tiny shape is 8, so the LoRA split is unambiguous
        args.shape, args.batch, args.seq_len, args.r, args.warmup, args.steps = "tiny", 2, 32, 8, 1, 1
    model_dir = train_step.build_checkpoint(args.shape, Path(args.cache))
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    model = train_step.load_system(args.system, model_dir, args.seq_len, args.r)
    train_step.train_steps(model, args.batch, args.seq_len, vocab, args.warmup, 0, args.optimizer)
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities, record_shapes=True) as prof:
        res = train_step.train_steps(model, args.batch, args.seq_len, vocab, 0, args.steps, args.optimizer)
    step_ms = 1e3 * sum(res["step_times"]) / len(res["step_times"])
    totals = breakdown(prof, args.r, on_gpu, args.steps)
    text, row = report(args, step_ms, totals, top_kernels(prof, on_gpu, args.steps), on_gpu)
    print(text)
    for path, content in ((args.out, text + "\n"), (args.json_out, None)):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if content is not None:
            Path(path).write_text(content)
        else:
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
