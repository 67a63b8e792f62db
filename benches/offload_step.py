"""Training-step bench of the checkpointing modes: peak GPU memory and step time.

Llama-3-8B shape by default (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads),
bf16 base, LoRA r=16 on the seven projections (a minimal LoRA defined here, so the bench depends
only on torch + transformers), batch 1, no optimizer (forward + backward only). Modes:

* ``plain``   : torch.utils.checkpoint per decoder layer (transformers' own, non-reentrant)
* ``offload`` : rslora_fast.offload.install_offloaded_checkpointing (the "unsloth" mode)
* ``budget``  : ``offload`` with ``--budget-gb`` of activations kept without recompute
* ``none``    : no checkpointing (usually out of memory at long sequences)

Run on the H200::

    python benches/offload_step.py --seq 16384                   # the issue's table row
    python benches/offload_step.py --seq 16384 --layers 8        # quicker
    python benches/offload_step.py --max-seq --mem-fraction 0.3  # longest sequence under a cap

Prints one JSON line per (mode, seq) and a summary (saved bytes / offloaded bytes, time ratio).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time

import torch
from torch import nn

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Lora(nn.Module):
    """Frozen base Linear + trainable low-rank update (fp32 adapters, as PEFT keeps them)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.b = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.scale = alpha / r

    def forward(self, x):
        lora = (x.to(self.a.dtype) @ self.a.t()) @ self.b.t()
        return self.base(x) + (lora * self.scale).to(x.dtype)


def build(args):
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq) * 2,
        attn_implementation="sdpa",
    )
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.requires_grad_(False)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in PROJ:
                if hasattr(parent, name):
                    setattr(parent, name, Lora(getattr(parent, name), args.r, args.r))
    model.train()
    return model


def set_mode(model, mode, args):
    from rslora_fast.offload import install_offloaded_checkpointing

    if mode == "plain":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return None
    if model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()
    if mode == "offload":
        return install_offloaded_checkpointing(model, lookahead=args.lookahead)
    if mode == "budget":
        return install_offloaded_checkpointing(model, lookahead=args.lookahead, max_memory_gb=args.budget_gb)
    return None


def run_step(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None


def measure(model, seq, args):
    ids = torch.randint(0, args.vocab, (1, seq), device="cuda")
    for _ in range(args.warmup):
        run_step(model, ids)
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.iters):
        torch.cuda.synchronize()
        t = time.perf_counter()
        run_step(model, ids)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {
        "peak_bytes": torch.cuda.max_memory_allocated() - base,
        "step_s": statistics.median(times),
        "tokens_per_s": seq / statistics.median(times),
    }


def fits(model, seq, args) -> bool:
    try:
        ids = torch.randint(0, args.vocab, (1, seq), device="cuda")
        run_step(model, ids)
        torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[16384])
    ap.add_argument("--modes", nargs="+", default=["plain", "offload"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--lookahead", type=int, default=1)
    ap.add_argument("--budget-gb", type=float, default=8.0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--max-seq", action="store_true", help="search the longest sequence per mode")
    ap.add_argument("--mem-fraction", type=float, default=None)
    args = ap.parse_args()
    if args.mem_fraction:
        torch.cuda.set_per_process_memory_fraction(args.mem_fraction)

    results = {}
    for mode in args.modes:
        model = build(args)
        handle = set_mode(model, mode, args)
        if args.max_seq:
            lo, hi = 0, 1024
            while fits(model, hi, args):
                lo, hi = hi, hi * 2
            while hi - lo > 256:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(model, mid, args) else (lo, mid)
            print(json.dumps({"mode": mode, "max_seq": lo, "mem_fraction": args.mem_fraction}), flush=True)
        else:
            for seq in args.seq:
                try:
                    r = measure(model, seq, args)
                except torch.OutOfMemoryError:
                    r = {"oom": True}
                r.update(mode=mode, seq=seq)
                if handle is not None:
                    r["host"] = {
                        k: handle.stats().get(k) for k in ("pinned_bytes", "pageable_bytes", "offloads")
                    }
                results[(mode, seq)] = r
                print(json.dumps(r), flush=True)
        if handle is not None:
            handle.uninstall()
        del model, handle
        gc.collect()
        torch.cuda.empty_cache()

    for seq in args.seq:
        p, o = results.get(("plain", seq)), results.get(("offload", seq))
        if p and o and "oom" not in p and "oom" not in o:
            offloaded = (args.layers - 1) * seq * args.hidden * 2
            print(
                json.dumps(
                    {
                        "seq": seq,
                        "saved_over_offloaded": (p["peak_bytes"] - o["peak_bytes"]) / offloaded,
                        "time_ratio_offload_over_plain": o["step_s"] / p["step_s"],
                    }
                )
            )


if __name__ == "__main__":
    main()
