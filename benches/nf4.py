"""NF4 dequantize bandwidth on the GPU: rslora_fast's kernel vs a device copy and bitsandbytes.

    python benches/nf4.py --out results/nf4.jsonl [--shape 14336 4096] [--repeat 50]

Dequantizes one NF4 weight (double-quantized scales, blocksize 64) into bf16 (and fp16/fp32),
times the median GPU time over repeats with CUDA events (cold L2, host launch hidden; see
_gpu_timing.py), the host time to launch one call, and reports GB/s counting bytes read (packed
codes + scales) and written, and the percentage of a device-to-device copy measured in the same
run (and of a copy moving the same bytes). bitsandbytes' dequantize is timed beside it when
importable. Prints a table and appends one JSON line per row to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _gpu_timing import copy_bandwidth_gbs, host_launch_us, median_ms  # noqa: E402

from rslora_fast.bench import append_jsonl  # noqa: E402
from rslora_fast.quant import functional as F  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[14336, 4096])
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--out", default="results/nf4.jsonl")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: nothing to bench")
        return 1
    rows_, cols = args.shape
    n = rows_ * cols
    w = torch.randn(rows_, cols, device="cuda", dtype=torch.bfloat16) * 0.02
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    same_size_copy: dict[int, float] = {}
    name = torch.cuda.get_device_name()

    def add(impl, dq, dtype, fn, nbytes_scales):
        ms, spread = median_ms(fn, warmup=5, repeat=args.repeat)
        launch_us = host_launch_us(fn)
        nbytes = (n + 1) // 2 + nbytes_scales + n * torch.tensor([], dtype=dtype).element_size()
        gbs = nbytes / (ms * 1e-3) / 1e9
        # Second ceiling: a copy moving the same bytes as this kernel (reads + writes), which pays the
        # same ramp-up and tail as a ~45 us kernel; the 1 GiB copy above is the strict one.
        if nbytes not in same_size_copy:
            same_size_copy[nbytes] = copy_bandwidth_gbs(nbytes // 2)
        same = same_size_copy[nbytes]
        rows.append(dict(bench="nf4_dequant", impl=impl, shape=[rows_, cols], blocksize=args.blocksize,
                         double_quant=dq, out_dtype=str(dtype).removeprefix("torch."), ms=ms,
                         spread_ms=spread, launch_us=launch_us, gbs=gbs, pct_copy=100 * gbs / copy_gbs, copy_gbs=copy_gbs,
                         pct_same_size_copy=100 * gbs / same, same_size_copy_gbs=same,
                         device=name, time=time.time()))  # fmt: skip

    for dq in (True, False):
        p, s = F.quantize_4bit(w, args.blocksize, "nf4", dq)
        scale_bytes = s.absmax.numel() * s.absmax.element_size()
        if dq:
            scale_bytes += s.nested_absmax.numel() * 4 + 256 * 4
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            out = torch.empty(n, dtype=dtype, device="cuda")
            add(
                "rslora_fast",
                dq,
                dtype,
                lambda p=p, s=s, out=out: F.dequantize_4bit(p, s, out=out),
                scale_bytes,
            )
        try:
            import bitsandbytes.functional as bnbf

            bp, bs = bnbf.quantize_4bit(w, blocksize=args.blocksize, quant_type="nf4", compress_statistics=dq)
            for dtype in (torch.bfloat16,):
                bout = torch.empty(rows_, cols, dtype=dtype, device="cuda")
                add("bitsandbytes", dq, dtype,
                    lambda bp=bp, bs=bs, bout=bout: bnbf.dequantize_4bit(bp, bs, out=bout), scale_bytes)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - optional baseline
            print(f"bitsandbytes baseline skipped: {exc}")

    print(f"device: {name}; copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    print(
        f"{'impl':<24}{'DQ':<6}{'out':<10}{'ms':>9}{'GB/s':>9}{'% copy':>9}{'% same-size':>13}{'launch us':>11}"
    )
    for r in rows:
        print(f"{r['impl']:<24}{str(r['double_quant']):<6}{r['out_dtype']:<10}{r['ms']:>9.4f}"
              f"{r['gbs']:>9.0f}{r['pct_copy']:>8.1f}%{r['pct_same_size_copy']:>12.1f}%{r['launch_us']:>11.1f}")  # fmt: skip
    append_jsonl(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
