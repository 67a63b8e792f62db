#!/usr/bin/env python3
"""Regenerate the tables of docs/benchmarks.md from the results files they cite.

Each table is rendered from one file under ``docs/results/`` (every figure is that file's, rounded
for print) and printed as markdown under a ``<!-- results/FILE -->`` line. ``--check`` compares
each printed table with docs/benchmarks.md instead and exits 1 when one is missing or differs.

Usage: ``python scripts/results_tables.py [--check]``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"

DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
SYSTEMS = {
    "rslora_fast:4bit:unsloth": 'rslora_fast, 4-bit, `"unsloth"` checkpointing',
    "rslora_fast:4bit:true": "rslora_fast, 4-bit, `True` (plain checkpointing)",
    "rslora_fast:16bit:unsloth": 'rslora_fast, 16-bit, `"unsloth"` checkpointing',
    "hf_peft:bf16": "transformers + peft, bf16 base",
    "hf_peft_bnb:nf4": "transformers + peft + bitsandbytes NF4 (double quant)",
}
KERNELS = {
    "swiglu fwd": "SwiGLU forward",
    "swiglu bwd": "SwiGLU backward",
    "geglu(tanh) fwd": "GeGLU (tanh) forward",
    "geglu(tanh) bwd": "GeGLU (tanh) backward",
    "rms_norm fwd (rows of 4096)": "RMSNorm forward, rows of 4096",
    "rms_norm bwd (rows of 4096)": "RMSNorm backward with dw, rows of 4096",
    "rms_norm bwd dx only (rows of 4096)": "RMSNorm backward, frozen weight (dx only)",
    "rope q+k (2 x 4096, 32/8 heads)": "RoPE q+k in place, 2 x 4096 tokens, 32/8 heads",
    "cross_entropy [4096, 128256] in chunks of 523 fwd": "cross-entropy forward, 4096 x 128256 (chunks of 523 rows)",
    "cross_entropy [4096, 128256] in chunks of 523 bwd": "cross-entropy backward (in place)",
}
TARGET_PCT = 80.0  # below it a kernel's share of copy bandwidth is printed bold


def rows(name: str) -> list[dict]:
    path = RESULTS / name
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def train_step(name: str, with_load: bool = True) -> str:
    header = ["system", "step (s)", "tokens/s", "peak alloc (GiB)", "peak reserved (GiB)", "after load (GiB)"]
    body = []
    for r in rows(name):
        row = [
            SYSTEMS[r["system"]],
            f"{r['step_s_median']:.3f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['peak_alloc_gib']:.2f}",
            f"{r['peak_reserved_gib']:.2f}",
            f"{r['after_load_gib']:.2f}",
        ]
        body.append(row + ([f"{r['load_s']:.1f}"] if with_load else []))
    return table(header + (["load (s)"] if with_load else []), body)


def budget(name: str) -> str:
    data = rows(name)
    base = next(r for r in data if ":budget=" not in r["system"])
    body = []
    for r in data:
        _, _, gib = r["system"].partition(":budget=")
        body.append([
            f"{gib} GiB" if gib else "none (all offloaded)",
            f"{r['peak_alloc_gib']:.2f}",
            f"{r['peak_alloc_gib'] / base['peak_alloc_gib']:.1f}x",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['step_s_median']:.3f}",
        ])  # fmt: skip
    return table(
        ["activation budget", "peak alloc (GiB)", "x the offloaded peak", "tokens/s", "step (s)"], body
    )


def kernels(name: str) -> str:
    body = []
    for r in rows(name):
        pct = f"{r['pct_of_copy']:.1f}%"
        body.append([
            KERNELS[r["kernel"]],
            DTYPES[r["dtype"]],
            f"{r['ours_ms']:.3f}",
            f"{r['ours_GBps']:,.0f}",
            f"**{pct}**" if r["pct_of_copy"] < TARGET_PCT else pct,
            f"{r['eager_ms']:.3f}",
            f"{r['speedup_vs_eager']:.2f}x",
        ])  # fmt: skip
    header = ["kernel", "dtype", "ours (ms)", "GB/s", "% of copy", "eager PyTorch (ms)", "speed-up"]
    return table(header, body)


def nf4(name: str) -> str:
    body = [
        [
            r["impl"],
            "yes" if r["double_quant"] else "no",
            DTYPES[r["out_dtype"]],
            f"{r['ms']:.4f}",
            f"{r['gbs']:,.0f}",
            f"{r['pct_copy']:.1f}%",
            f"{r['pct_same_size_copy']:.1f}%",
            f"{r['launch_us']:.0f}",
        ]
        for r in rows(name)
    ]
    header = [
        "impl",
        "double quant",
        "out",
        "ms",
        "GB/s",
        "% of 1 GiB copy",
        "% of same-size copy",
        "host launch (us)",
    ]
    return table(header, body)


def decode_matvec(name: str) -> str:
    """4-bit groups: microseconds per call (and % of copy without LoRA) at batch 1 and 8."""
    cells: dict[str, dict[tuple[int, int], str]] = {}
    for r in rows(name):
        if r["weights"] != "nf4-dq":
            continue
        text = f"{r['us_per_call']:.2f} us"
        if not r["lora_r"]:
            text += f" ({r['pct_of_copy']:.0f}%)"
        cells.setdefault(r["group"], {})[(r["batch"], r["lora_r"])] = text
    keys = [(1, 0), (1, 16), (8, 0), (8, 16)]
    body = [[group, *(c.get(k, "") for k in keys)] for group, c in cells.items()]
    return table(["group", "batch 1", "batch 1, LoRA r=16", "batch 8", "batch 8, LoRA r=16"], body)


#: generation systems of ours -> (row label, the Unsloth system measured beside it)
GENERATE_PAIRS = {
    "rslora_fast:4bit": ("4-bit", "unsloth:4bit"),
    "rslora_fast:16bit:merged": ("16-bit, `merge_lora=True`", "unsloth:bf16"),
    "rslora_fast:16bit": ("16-bit", "unsloth:bf16"),
}


def generate(name: str) -> str:
    """Tokens/s beside Unsloth's per batch, then the long prompt's time to first token."""
    by = {(r["system"], r["batch"]): r for r in rows(name) if r.get("kind") == "generate"}
    body, ttft = [], []
    for batch in sorted({b for _, b in by}):
        for system, (label, peer_name) in GENERATE_PAIRS.items():
            r, peer = by.get((system, batch)), by.get((peer_name, batch))
            if r is None:
                continue
            ratio = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}" if peer else ""
            peer_tps = f"{peer['tokens_per_s']:,.1f}" if peer else "not run"
            tps, gbs = f"{r['tokens_per_s']:,.1f}", f"{r['weight_gb_per_s']:,.0f}"
            body.append([f"{label}, batch {batch}", tps, gbs, peer_tps, ratio])
            if peer and "ttft_long_s" in r and "ttft_long_s" in peer:
                prompt = f"time to first token, {r['long_prompt_len']:,}-token prompt, {label}"
                ours, theirs = r["ttft_long_s"], peer["ttft_long_s"]
                ttft.append([prompt, f"{ours:.4f} s", "", f"{theirs:.4f} s", f"{ours / theirs:.2f} (time)"])
    header = [
        "8B, prompt 512, 128 new tokens",
        "rslora_fast tok/s",
        "GB/s",
        "Unsloth tok/s",
        "ratio to Unsloth",
    ]
    return table(header, body + ttft)


#: results file -> how its table is rendered (each table of docs/benchmarks.md that has a file).
TABLES: dict[str, Callable[[str], str]] = {
    "train_step_2026-11-29.jsonl": train_step,
    "budget_2026-11-29.jsonl": budget,
    "train_step_2026-11-28.jsonl": train_step,
    "train_step_five_systems_2026-11-28.jsonl": lambda n: train_step(n, with_load=False),
    "kernels_2026-11-29.jsonl": kernels,
    "nf4_2026-11-29.jsonl": nf4,
    "decode_matvec_split_kernel_h200_2026-12-03.jsonl": decode_matvec,
    "generate_8b_split_kernel_h200_2026-12-03.jsonl": generate,
}


def render_all() -> dict[str, str]:
    return {name: render(name) for name, render in TABLES.items()}


def check(markdown: str) -> list[str]:
    """The results files whose table is not in ``markdown`` verbatim."""
    return [name for name, text in render_all().items() if text not in markdown]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.check:
        bad = check(BENCHMARKS.read_text(encoding="utf-8"))
        for name in bad:
            print(f"docs/benchmarks.md: the table of results/{name} differs from the file (or is missing)")
        return 1 if bad else 0
    for name, text in render_all().items():
        print(f"<!-- results/{name} -->\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
