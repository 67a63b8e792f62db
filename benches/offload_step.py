"""Training-step bench of the checkpointing modes: peak GPU memory and step time.

Llama-3-8B shape by default (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads),
random weights, LoRA r=16 on the seven projections, batch 1, forward + backward (no optimizer).

The modes are measured on **one** model, interleaved: each round runs every mode (order reversed
every other round, so a drift of clocks or temperature falls on both sides), with ``--warmup`` steps
after each switch and ``--iters`` timed steps. The step time of a mode is the median of all its timed
steps; the ratio is also given as the median of the per-round ratios.

Modes:

* ``plain``   : per-layer checkpointing (``use_gradient_checkpointing=True``)
* ``offload`` : the "unsloth" mode (layer inputs offloaded to pinned host memory)
* ``budget``  : ``offload`` with ``--budget-gb`` of activations kept without recompute
* ``save``    : ``offload`` with ``save_policy="auto"`` (layers skip their recompute when their
  saved tensors can cross PCIe in time; no budget)
* ``none``    : no checkpointing (usually out of memory at long sequences)

LoRA (``--lora``): ``rslora`` (default) is the product: ``rslora_fast.get_peft_model`` with its fast
decoder path, on a bf16 or NF4 (``--base 4bit``, double-quantized) base; ``minimal`` is a bare
LoRA module defined here on the plain transformers layers (the modes then wrap transformers' own
layer code).

Run on the H200::

    python benches/offload_step.py --seq 16384                      # the issue's table row (bf16)
    python benches/offload_step.py --seq 16384 --base 4bit
    python benches/offload_step.py --seq 16384 --layers 8 --rounds 2  # quicker
    python benches/offload_step.py --max-seq --mem-fraction 0.3     # longest sequence under a cap

Prints one JSON line per (mode, seq), a summary line per seq (saved bytes / offloaded bytes, time
ratio) and appends all of them to ``--out`` when given.
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
CKPT = {"plain": True, "offload": "unsloth", "budget": "unsloth", "save": "unsloth", "none": False}


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args):
    """The model to train: (model, its transformers model that checkpointing is installed on)."""
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
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(args.device):
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.requires_grad_(False)
    if args.base == "4bit":
        from rslora_fast.quant import Linear4bit

        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name in PROJ:
                    if hasattr(parent, name):
                        setattr(parent, name, Linear4bit.from_linear(getattr(parent, name)))
    if args.lora == "minimal":
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name in PROJ:
                    if hasattr(parent, name):
                        setattr(parent, name, Lora(getattr(parent, name), args.r, args.r))
        model.train()
        return model, model
    import rslora_fast

    peft = rslora_fast.get_peft_model(
        model, r=args.r, target_modules=list(PROJ), lora_alpha=args.r, lora_dropout=0, bias="none",
        use_gradient_checkpointing=True, random_state=3407, max_seq_length=max(args.seq),
    )  # fmt: skip
    peft.train()
    return peft, peft.get_base_model()


def set_mode(inner, mode: str, args) -> None:
    """Install ``mode`` on the transformers model (replacing whatever mode was there)."""
    from rslora_fast.checkpointing import apply_gradient_checkpointing

    budget = args.budget_gb if mode == "budget" else None
    save = "auto" if mode == "save" else "never"
    apply_gradient_checkpointing(inner, CKPT[mode], max(args.seq), max_memory_gb=budget, save_policy=save)
    handle = inner.__dict__.get("_rslora_offload")
    if handle is not None:
        handle.lookahead = args.lookahead


def run_step(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None


def host_stats(inner) -> dict | None:
    handle = inner.__dict__.get("_rslora_offload")
    if handle is None:
        return None
    return {k: handle.stats().get(k) for k in ("pinned_bytes", "pageable_bytes", "offloads")}


def measure_interleaved(model, inner, seq: int, args) -> dict[str, dict]:
    """Every mode on the same model, interleaved over ``--rounds``; one result dict per mode."""
    device = torch.device(args.device)
    ids = torch.randint(0, args.vocab, (1, seq), device=device)
    times: dict[str, list[list[float]]] = {m: [] for m in args.modes}
    peaks: dict[str, int] = {m: 0 for m in args.modes}
    hosts: dict[str, dict | None] = {}
    oom: set[str] = set()
    for rnd in range(args.rounds):
        order = args.modes if rnd % 2 == 0 else list(reversed(args.modes))
        for mode in order:
            if mode in oom:
                continue
            set_mode(inner, mode, args)
            try:
                for _ in range(args.warmup):
                    run_step(model, ids)
                _sync(device)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                got = []
                for _ in range(args.iters):
                    _sync(device)
                    t = time.perf_counter()
                    run_step(model, ids)
                    _sync(device)
                    got.append(time.perf_counter() - t)
                times[mode].append(got)
                if device.type == "cuda":
                    peaks[mode] = max(peaks[mode], torch.cuda.max_memory_allocated(device) - base)
                hosts[mode] = host_stats(inner)
            except torch.OutOfMemoryError:
                oom.add(mode)
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    out = {}
    for mode in args.modes:
        if mode in oom or not times[mode]:
            out[mode] = {"mode": mode, "seq": seq, "oom": True}
            continue
        flat = [t for rnd in times[mode] for t in rnd]
        med = statistics.median(flat)
        out[mode] = {
            "mode": mode,
            "seq": seq,
            "peak_bytes": peaks[mode],
            "step_s": med,
            "step_s_rounds": [statistics.median(r) for r in times[mode]],
            "tokens_per_s": seq / med,
        }
        if hosts.get(mode):
            out[mode]["host"] = hosts[mode]
    return out


def fits(model, inner, seq, args) -> bool:
    try:
        ids = torch.randint(0, args.vocab, (1, seq), device=args.device)
        run_step(model, ids)
        _sync(torch.device(args.device))
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()


def summary(results: dict[str, dict], seq: int, args) -> dict | None:
    p, o = results.get("plain"), results.get("offload")
    if not (p and o) or p.get("oom") or o.get("oom"):
        return None
    offloaded = (args.layers - 1) * seq * args.hidden * 2
    paired = [b / a for a, b in zip(p["step_s_rounds"], o["step_s_rounds"])]
    return {
        "seq": seq,
        "base": args.base,
        "lora": args.lora,
        "saved_over_offloaded": (p["peak_bytes"] - o["peak_bytes"]) / offloaded,
        "time_ratio_offload_over_plain": o["step_s"] / p["step_s"],
        "time_ratio_median_of_rounds": statistics.median(paired),
        "rounds": args.rounds,
        "iters_per_round": args.iters,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[16384])
    ap.add_argument("--modes", nargs="+", default=["plain", "offload"], choices=sorted(CKPT))
    ap.add_argument("--lora", choices=("rslora", "minimal"), default="rslora")
    ap.add_argument("--base", choices=("bf16", "4bit"), default="bf16")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--lookahead", type=int, default=1)
    ap.add_argument("--budget-gb", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after each mode switch")
    ap.add_argument("--iters", type=int, default=2, help="timed steps per mode per round")
    ap.add_argument("--max-seq", action="store_true", help="search the longest sequence per mode")
    ap.add_argument("--mem-fraction", type=float, default=None)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke run only")
    ap.add_argument("--out", default=None, help="append the JSON lines here")
    args = ap.parse_args(argv)
    if args.mem_fraction:
        torch.cuda.set_per_process_memory_fraction(args.mem_fraction)

    lines: list[dict] = []

    def emit(row: dict) -> None:
        row = {**row, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d")}  # fmt: skip
        lines.append(row)
        print(json.dumps(row), flush=True)

    model, inner = build(args)
    if args.max_seq:
        for mode in args.modes:
            set_mode(inner, mode, args)
            lo, hi = 0, 1024
            while fits(model, inner, hi, args):
                lo, hi = hi, hi * 2
            while hi - lo > 256:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(model, inner, mid, args) else (lo, mid)
            emit({"mode": mode, "max_seq": lo, "mem_fraction": args.mem_fraction})
    else:
        for seq in args.seq:
            results = measure_interleaved(model, inner, seq, args)
            for row in results.values():
                emit(row)
            s = summary(results, seq, args)
            if s:
                emit(s)
    set_mode(inner, "none", args)
    if args.out:
        from rslora_fast.bench import append_jsonl

        append_jsonl(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
