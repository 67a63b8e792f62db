"""Full training steps of rslora_fast against the baselines (protocol: shared benchmarks.md).

    rslora-fast bench --shape llama-3-8b --systems rslora_fast:4bit:unsloth,hf_peft:bf16
    rslora-fast bench --mode longctx --cap-gib 24 --systems rslora_fast:4bit:unsloth

(``python benches/train_step.py`` and ``python -m rslora_fast.bench`` are the same command.)

Builds the named shape with random bf16 weights once into ``--cache`` (save_pretrained), loads it
through each system's own loader in its own process, runs ``--warmup`` + ``--steps`` training steps
(random token ids, labels = inputs, AdamW 2e-4 on the LoRA parameters, LoRA r=16 on the seven
projections), and prints a table; every row is appended as a JSON line to ``--out``.

Systems (``name:base:checkpointing[:budget=GiB]``; the budget is ``get_peft_model(max_memory_gb=)``,
the GPU memory for layer activations kept without recompute, so tokens/s at 1x, 2x and 4x a peak is
``rslora_fast:4bit:unsloth:budget=7,...:budget=14,...:budget=28``):
  rslora_fast:4bit:unsloth | rslora_fast:4bit:true | rslora_fast:16bit:unsloth | rslora_fast:16bit:true | ...
  hf_peft:bf16             transformers + peft, bf16 base, HF (non-reentrant) checkpointing
  hf_peft_bnb:nf4          transformers + peft + bitsandbytes NF4 with double quant (when importable)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES: dict[str, dict] = {
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        model_type="llama",
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        model_type="llama",
    ),
    "llama-3.2-3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        model_type="llama",
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        rope_theta=1000000.0,
        model_type="qwen2",
    ),
    "mistral-7b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32768,
        rope_theta=1000000.0,
        model_type="mistral",
    ),
    # CPU-sized, for the test that keeps this harness from rotting
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        rope_theta=10000.0,
        model_type="llama",
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_checkpoint(shape: str, cache: Path) -> Path:
    """Write the shape's random bf16 model once (save_pretrained, safetensors shards); returns the folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = cache / shape
    if (folder / "config.json").exists():
        return folder
    spec = dict(SHAPES[shape])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(
        model_type, max_position_embeddings=131072, tie_word_embeddings=False, **spec
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = folder.with_suffix(".partial")
    model.save_pretrained(tmp, max_shard_size="5GB")
    # Token ids are random; any tokenizer makes the folder a complete checkpoint for every loader.
    from rslora_fast.demo import build_demo_tokenizer

    build_demo_tokenizer().save_pretrained(tmp)
    del model
    tmp.rename(folder)
    return folder


# ----------------------------------------------------------------------------- loaders per system


def load_system(system: str, model_dir: Path, seq_len: int, lora_r: int):
    """Load ``system`` (name:base:mode) and attach LoRA; returns the trainable model."""
    import torch

    name, base, mode, extra = (system.split(":") + ["", "", ""])[:4]
    budget = float(extra.removeprefix("budget=")) if extra.startswith("budget=") else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if name == "rslora_fast":
        from rslora_fast import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            str(model_dir), max_seq_length=seq_len, dtype=dtype, load_in_4bit=(base == "4bit")
        )
        ckpt = {"unsloth": "unsloth", "true": True, "false": False}[mode or "unsloth"]
        return FastLanguageModel.get_peft_model(
            model,
            r=lora_r,
            target_modules=TARGETS,
            lora_alpha=16,
            lora_dropout=0,
            bias="none",
            use_gradient_checkpointing=ckpt,
            max_memory_gb=budget,
            random_state=3407,
            max_seq_length=seq_len,
        )
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs: dict = dict(dtype=dtype, device_map=device, attn_implementation="sdpa")
    if name == "hf_peft_bnb":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    elif name != "hf_peft":
        raise ValueError(f"unknown system {system!r}")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    cfg = LoraConfig(
        r=lora_r, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, cfg)


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_steps(model, batch: int, seq_len: int, vocab: int, warmup: int, steps: int) -> dict:
    """Run the protocol's loop; returns step times, losses and peak memory."""
    import torch

    device = next(p for p in model.parameters()).device
    model.train()  # from_pretrained returns eval mode; checkpointing only acts in training mode
    params = [p for p in model.parameters() if p.requires_grad]
    # The same optimizer for every system: torch's fused AdamW on the GPU (one kernel for all LoRA
    # tensors instead of a foreach launch chain), the default elsewhere.
    opt = torch.optim.AdamW(params, lr=2e-4, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(warmup + steps):
        ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
        _sync()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    out = {"step_times": times, "losses": losses}
    if torch.cuda.is_available():
        out["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


def worker(args: argparse.Namespace) -> dict:
    """One system in this process: load, train, measure; returns the result row."""
    import torch

    model_dir = Path(args.model_dir)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    t0 = time.perf_counter()
    model = load_system(args.system, model_dir, args.seq_len, args.r)
    _sync()
    load_s = time.perf_counter() - t0
    after_load = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None
    res = train_steps(model, args.batch, args.seq_len, vocab, args.warmup, args.steps)
    times = res["step_times"]
    med = statistics.median(times)
    row = {
        "system": args.system,
        "shape": args.shape,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "tokens_per_s": round(args.batch * args.seq_len / med, 1),
        "step_s_median": round(med, 4),
        "step_s_spread": round(max(times) - min(times), 4),
        "peak_alloc_gib": res.get("peak_alloc_gib"),
        "peak_reserved_gib": res.get("peak_reserved_gib"),
        "after_load_gib": after_load,
        "load_s": round(load_s, 1),
        "final_loss": res["losses"][-1],
        "optimizer": "AdamW(fused)" if torch.cuda.is_available() else "AdamW",
        "losses_finite": all(x == x and abs(x) != float("inf") for x in res["losses"]),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    row.update(_budget_fields(model))
    return row


def _budget_fields(model) -> dict:
    """``kept_layers`` / ``layers`` of the memory budget when the system has one (see get_peft_model)."""
    from rslora_fast.checkpointing import offload_handle

    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    handle = offload_handle(inner)
    if handle is None or handle.max_memory_gb is None:
        return {}
    st = handle.budget_stats()
    return {
        "kept_layers": st["kept_layers"],
        "layers": st["layers"],
        "kept_gib": round(st["kept_bytes"] / 2**30, 2),
    }


def longctx_worker(args: argparse.Namespace) -> dict:
    """Longest batch-1 sequence (multiple of ``--len-step``) that trains one full step under a memory cap."""
    import torch

    model_dir = Path(args.model_dir)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total))
    model = load_system(args.system, model_dir, args.max_len, args.r)
    unit = args.len_step
    lo, hi, best = 1, args.max_len // unit, None
    while lo <= hi:
        mid = (lo + hi) // 2
        try:
            res = train_steps(model, 1, mid * unit, vocab, 0, 1)
            best = {
                "seq_len": mid * unit,
                "step_s": res["step_times"][0],
                "peak_alloc_gib": res["peak_alloc_gib"],
            }
            lo = mid + 1
        except torch.OutOfMemoryError:
            hi = mid - 1
        for p in model.parameters():
            p.grad = None
        torch.cuda.empty_cache()
    row = {
        "system": args.system,
        "shape": args.shape,
        "mode": "longctx",
        "cap_gib": args.cap_gib,
        "longest_seq_len": best and best["seq_len"],
        "len_step": unit,
        "tokens_per_s": best and round(best["seq_len"] / best["step_s"], 1),
        "peak_alloc_gib": best and best["peak_alloc_gib"],
        "date": time.strftime("%Y-%m-%d"),
    }
    return row


def print_table(rows: list[dict]) -> None:
    if rows and rows[0].get("mode") == "longctx":
        print("| system | cap (GiB) | longest trained | tokens/s there | peak alloc (GiB) |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['system']} | {r['cap_gib']} | {r['longest_seq_len']} | {r['tokens_per_s']} | "
                f"{(r['peak_alloc_gib'] or 0):.2f} |"
            )
        return
    print(
        "| system | step (s) | spread (s) | tokens/s | peak alloc (GiB) | peak reserved (GiB) | after load (GiB) "
        "| load (s) | final loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        if "error" in r:
            print(f"| {r['system']} | failed: {r['error'][:80]} |")
            continue
        print(
            f"| {r['system']} | {r['step_s_median']:.3f} | {r['step_s_spread']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{fmt(r['peak_alloc_gib'])} | {fmt(r['peak_reserved_gib'])} | {fmt(r['after_load_gib'])} | "
            f"{r['load_s']} | {r['final_loss']:.4f} |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rslora-fast bench", description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    p.add_argument("--systems", default="rslora_fast:4bit:unsloth,rslora_fast:16bit:unsloth,hf_peft:bf16")
    p.add_argument("--mode", default="step", choices=["step", "longctx"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--cap-gib", type=float, default=24.0)
    p.add_argument("--max-len", type=int, default=131072)
    p.add_argument("--len-step", type=int, default=1024, help="longctx: search granularity in tokens")
    p.add_argument("--cache", default="bench-cache")
    p.add_argument("--out", default="results/train_step.jsonl")
    p.add_argument("--in-process", action="store_true", help="run systems in this process (tests)")
    # internal: one system per worker process
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--system", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        row = longctx_worker(args) if args.mode == "longctx" else worker(args)
        Path(args.result).write_text(json.dumps(row))
        return 0

    model_dir = build_checkpoint(args.shape, Path(args.cache))
    rows = []
    for system in [s for s in args.systems.split(",") if s]:
        wargs = [
            "--worker",
            "--system",
            system,
            "--model-dir",
            str(model_dir),
            "--shape",
            args.shape,
            "--mode",
            args.mode,
            "--batch",
            str(args.batch),
            "--seq-len",
            str(args.seq_len),
            "--warmup",
            str(args.warmup),
            "--steps",
            str(args.steps),
            "--r",
            str(args.r),
            "--cap-gib",
            str(args.cap_gib),
            "--max-len",
            str(args.max_len),
            "--len-step",
            str(args.len_step),
        ]
        result = Path(args.cache) / f"result-{os.getpid()}.json"
        if args.in_process:
            ns = p.parse_args(wargs + ["--result", str(result)])
            row = longctx_worker(ns) if args.mode == "longctx" else worker(ns)
        else:
            proc = subprocess.run(
                [sys.executable, "-m", "rslora_fast.bench", *wargs, "--result", str(result)],
                text=True,
                capture_output=True,
            )
            if proc.returncode != 0:
                row = {
                    "system": system,
                    "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:][0]
                    if (proc.stderr or proc.stdout).strip()
                    else f"exit {proc.returncode}",
                }
                sys.stderr.write(proc.stderr[-4000:])
            else:
                row = json.loads(result.read_text())
        rows.append(row)
        print(json.dumps(row), flush=True)
        # one line per finished system, so a run cut short still leaves what it measured
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    print_table(rows)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
