"""Decode projections (``ProjectionGroup``, ``kernels/decode_matvec.cu``): GB/s on the weight bytes
for the Llama-3-8B shapes at batch 1 and 8, 4-bit (NF4, double-quantized scales) and 16-bit, with
and without LoRA r=16, against the device-to-device copy bandwidth measured in the same run.

    python benches/decode_matvec.py --out results/decode_matvec.jsonl

Each figure times one CUDA graph that calls enough distinct copies of the group (same shapes,
fresh weights) to read at least 256 MiB, as the layers of a decode step do, so the L2 cache holds
none of them; median of ``--repeat`` replays (CUDA events, after an L2 flush). ``weight_GBps``
counts the base weight bytes (packed codes and their scales for 4-bit); ``plain_us`` is the
reference path (dequantize, matmul, LoRA) of one copy for comparison. Prints one JSON line per row
and appends it to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _gpu_timing import copy_bandwidth_gbs, gpu_bench_args, median_ms  # noqa: E402

from rslora_fast.bench import emit_row  # noqa: E402
from rslora_fast.generate.matvec import ProjectionGroup, reference  # noqa: E402
from rslora_fast.peft.layer import LoraLinear  # noqa: E402
from rslora_fast.quant.linear4bit import Linear4bit  # noqa: E402

# (group, K, member widths) of Llama-3-8B.
SHAPES = [
    ("q/k/v", 4096, (4096, 1024, 1024)),
    ("o", 4096, (4096,)),
    ("gate/up", 4096, (14336, 14336)),
    ("down", 14336, (4096,)),
]
MIN_BYTES = 256 << 20


def _layer(k: int, n: int, quant: bool, rank: int, dtype: torch.dtype) -> nn.Module:
    lin = nn.Linear(k, n, bias=False, device="cuda", dtype=dtype)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.02)
    base = Linear4bit.from_linear(lin, compute_dtype=dtype) if quant else lin
    if not rank:
        return base
    layer = LoraLinear(base, r=rank, lora_alpha=2 * rank)
    with torch.no_grad():
        layer.lora_A.weight.normal_(0.0, 0.02)
        layer.lora_B.weight.normal_(0.0, 0.02)
    return layer


def _weight_bytes(layers: list[nn.Module]) -> int:
    total = 0
    for layer in layers:
        base = getattr(layer, "base_layer", layer)
        state = getattr(base, "quant_state", None)
        if state is None:
            total += base.weight.numel() * base.weight.element_size()
            continue
        total += (
            base.weight.numel() * base.weight.element_size()
            + state.absmax.numel() * state.absmax.element_size()
        )
        if state.nested:
            total += state.nested_absmax.numel() * 4
    return total


def _graph_of(fn):
    """A CUDA graph replaying ``fn`` (warmed up on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def bench_row(name, k, ns, quant, rank, batch, dtype, repeat, copy_gbs) -> dict:
    one = [_layer(k, n, quant, rank, dtype) for n in ns]
    per_copy = _weight_bytes(one)
    copies = max(1, -(-MIN_BYTES // per_copy))
    groups = [ProjectionGroup.from_modules(one, dtype)]
    groups += [
        ProjectionGroup.from_modules([_layer(k, n, quant, rank, dtype) for n in ns], dtype)
        for _ in range(copies - 1)
    ]
    x = torch.randn(batch, k, device="cuda", dtype=dtype)

    graph = _graph_of(lambda: [g(x) for g in groups])
    ms, spread = median_ms(graph.replay, repeat=repeat)
    plain = _graph_of(lambda: reference(x, groups[0]))
    plain_ms, _ = median_ms(plain.replay, repeat=repeat)
    gbs = copies * per_copy / (ms * 1e-3) / 1e9
    return {
        "group": name,
        "k": k,
        "n": list(ns),
        "weights": "nf4-dq" if quant else str(dtype).removeprefix("torch."),
        "dtype": str(dtype).removeprefix("torch."),
        "lora_r": rank,
        "batch": batch,
        "kernel_path": groups[0].uses_kernel,
        "copies": copies,
        "weight_bytes": per_copy,
        "us_per_call": round(1e3 * ms / copies, 2),
        "spread_ms": round(spread, 4),
        "weight_GBps": round(gbs, 1),
        "pct_of_copy": round(100 * gbs / copy_gbs, 1),
        "plain_us": round(1e3 * plain_ms, 2),
        "copy_GBps": round(copy_gbs, 1),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    args = gpu_bench_args(
        parser,
        "benches/decode_matvec.py",
        repeat=50,
        out="results/decode_matvec.jsonl",
        only_help="only the groups whose name contains this",
    )
    if args is None:
        return 1
    dtype = getattr(torch, args.dtype)
    copy_gbs = copy_bandwidth_gbs()
    with torch.no_grad():
        for name, k, ns in SHAPES:
            if args.only not in name:
                continue
            for quant in (True, False):
                for rank in (0, 16):
                    for batch in (1, 8):
                        row = bench_row(name, k, ns, quant, rank, batch, dtype, args.repeat, copy_gbs)
                        emit_row(row, args.out)
                        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
