"""Turn benchmark JSON lines into PNG charts.

    python benches/plot.py results/train_step.jsonl --out docs/img

Charts: tokens/s and peak allocated GiB per system (step mode), longest trained sequence per system
and cap (longctx mode). Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("jsonl", nargs="+")
    p.add_argument("--out", default="docs/img")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for path in args.jsonl for line in open(path) if line.strip()]
    rows = [r for r in rows if "error" not in r]
    os.makedirs(args.out, exist_ok=True)
    step = [r for r in rows if r.get("mode", "step") == "step" and "tokens_per_s" in r]
    if step:
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
        names = [r["system"] for r in step]
        a.barh(names, [r["tokens_per_s"] for r in step], color="tab:blue")
        a.set_xlabel("tokens / s (higher is better)")
        b.barh(names, [r.get("peak_alloc_gib") or 0 for r in step], color="tab:orange")
        b.set_xlabel("peak allocated GiB (lower is better)")
        b.set_yticks([])
        fig.suptitle(f"{step[0]['shape']}, batch {step[0]['batch']} x {step[0]['seq_len']}, {step[0]['gpu']}")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "train_step.png"), dpi=110)
        print(f"wrote {args.out}/train_step.png")
    ctx = [r for r in rows if r.get("mode") == "longctx" and r.get("longest_seq_len")]
    if ctx:
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.barh([f"{r['system']} @ {r['cap_gib']:g} GiB" for r in ctx], [r["longest_seq_len"] for r in ctx])
        ax.set_xlabel("longest trained sequence at batch 1 (tokens)")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "longctx.png"), dpi=110)
        print(f"wrote {args.out}/longctx.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
