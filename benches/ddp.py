"""Multi-GPU throughput (DDP and FSDP2): the train_step workload at 1 and N GPUs (torchrun), weak scaling.

    python benches/ddp.py --shape llama-3-8b --gpus 1,2 --mode ddp,fsdp2 --base 4bit
    python benches/ddp.py --shape llama-3-8b --gpus 1,2 --mode fsdp2 --base 16bit
    python benches/ddp.py --shape tiny --gpus 1,2 --mode ddp,fsdp2 --steps 3 --warmup 1   # CPU smoke (gloo)

For each base in ``--base``, each N in ``--gpus`` and each mode in ``--mode`` one
``torchrun --nproc-per-node N`` job runs this file as a worker (N = 1 runs once per base, with no
wrapper: the single-GPU baseline every mode is compared with): every rank loads the random-weight
checkpoint (built once by ``rslora_fast.bench.build_checkpoint`` into ``--cache``) on its own GPU
with ``rslora_fast``, attaches LoRA r=16 on the seven projections, wraps it (N > 1) with
:func:`rslora_fast.distributed.prepare_ddp` (``ddp``: everything replicated, LoRA gradients
all-reduced) or shards it with :func:`rslora_fast.distributed.fully_shard_lora` (``fsdp2``: frozen
base, 4-bit codes and scales included, LoRA weights and AdamW states sharded 1/N, gathered per
decoder layer), and runs ``--warmup`` + ``--steps`` AdamW steps on ``--batch`` x ``--seq-len``
random tokens per rank. The time of a step is the slowest rank's; throughput is
``N * batch * seq_len / median step time``. The table shows tokens/s, speedup over N=1 and
scaling efficiency per mode; the issue's target is speedup >= 1.85 at N=2. Rows are appended as
JSON lines to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    """One rank: load on this rank's device, wrap (DDP) or shard (FSDP2), time the steps; rank 0
    writes the row."""
    import torch
    import torch.distributed as dist

    from rslora_fast import FastLanguageModel
    from rslora_fast import bench as ts
    from rslora_fast.distributed import dist_env, fully_shard_lora, init_distributed, prepare_ddp

    device = init_distributed()
    env = dist_env()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t_load = time.perf_counter()
    model, _ = FastLanguageModel.from_pretrained(
        args.model_dir, max_seq_length=args.seq_len, dtype=dtype, load_in_4bit=args.base == "4bit",
        device_map=device, progress=False,
    )  # fmt: skip
    model = FastLanguageModel.get_peft_model(model, **ts.protocol_lora(16, args.checkpointing, args.seq_len))
    model.train()
    load_s = time.perf_counter() - t_load
    net = model
    if env.world_size > 1 and args.mode == "ddp":
        net = prepare_ddp(model)
    elif env.world_size > 1:
        kwargs = {}
        if args.fsdp_bf16:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        fully_shard_lora(model, **kwargs)
    # after sharding: FSDP2 replaced the parameters by sharded ones
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    gen = torch.Generator().manual_seed(1000 + env.rank)  # different data per rank, as in real DDP
    vocab = model.config.vocab_size
    if device.type == "cuda":
        torch.cuda.synchronize()
        after_wrap = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    else:
        after_wrap = None
    times = []
    for i in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
        if env.world_size > 1:  # the step is as slow as its slowest rank
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        if i >= args.warmup:
            times.append(dt.item())
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    peaks = [None] * env.world_size
    if env.world_size > 1:
        dist.all_gather_object(peaks, peak)
        dist.destroy_process_group()
    else:
        peaks = [peak]
    mode = args.mode if env.world_size > 1 else "single"
    if env.is_main:
        med = statistics.median(times)
        row = {
            "bench": "ddp", "mode": mode, "fsdp_bf16": args.fsdp_bf16 and mode == "fsdp2",
            "shape": args.shape, "base": args.base, "checkpointing": args.checkpointing,
            "gpus": env.world_size, "batch_per_rank": args.batch, "seq_len": args.seq_len,
            "step_times": times, "median_step_s": med,
            "tokens_per_s": env.world_size * args.batch * args.seq_len / med,
            "peak_alloc_gib_per_rank": peaks, "alloc_after_wrap_gib_rank0": after_wrap, "load_s_rank0": load_s,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        }  # fmt: skip
        Path(args.result).write_text(json.dumps(row))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _csv(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {allowed}, got {text!r}")
        return items

    return parse


def _launch(args: argparse.Namespace, model_dir: Path, n: int, base: str, mode: str) -> dict | None:
    result = Path(args.cache) / f"ddp-result-{os.getpid()}-{base}-{mode}-{n}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(n),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(Path(__file__).resolve()),
        "--worker", "--model-dir", str(model_dir), "--result", str(result), "--shape", args.shape,
        "--base", base, "--mode", mode, "--checkpointing", args.checkpointing, "--batch", str(args.batch),
        "--seq-len", str(args.seq_len), "--warmup", str(args.warmup), "--steps", str(args.steps),
        *(["--fsdp-bf16"] if args.fsdp_bf16 else []),
    ]  # fmt: skip
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0 or not result.exists():
        print(f"{base} {mode} N={n}: torchrun failed (exit {proc.returncode})", file=sys.stderr)
        return None
    row = json.loads(result.read_text())
    result.unlink()
    return row


def main(argv: list[str] | None = None) -> int:
    """Parse arguments; as the orchestrator launch one torchrun job per (base, GPU count, mode) and
    print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3-8b")
    p.add_argument("--gpus", default="1,2", help="comma-separated process counts, e.g. 1,2 or 1,2,4,8")
    p.add_argument("--base", type=_csv(("4bit", "16bit")), default=["4bit"], help="4bit, 16bit or both")
    p.add_argument("--mode", type=_csv(("ddp", "fsdp2")), default=["ddp"], help="ddp, fsdp2 or both")
    p.add_argument(
        "--fsdp-bf16",
        action="store_true",
        help="fsdp2: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) (LoRA gathered in bf16)",
    )
    p.add_argument("--checkpointing", choices=["unsloth", "true", "false"], default="unsloth")
    p.add_argument("--batch", type=int, default=2, help="sequences per rank")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cache", default="bench-cache")
    p.add_argument("--out", default="bench-results/ddp.jsonl")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.base, args.mode = args.base[0], args.mode[0]
        worker(args)
        return 0

    from rslora_fast.bench import append_jsonl, build_checkpoint

    model_dir = build_checkpoint(args.shape, Path(args.cache))
    rows = []
    for base in args.base:
        for n in [int(x) for x in args.gpus.split(",")]:
            for mode in args.mode if n > 1 else args.mode[:1]:  # N = 1: one unwrapped baseline
                row = _launch(args, model_dir, n, base, mode)
                if row is not None:
                    rows.append(row)
    if not rows:
        return 1
    print(
        f"\n{'base':>5} {'mode':>10} {'GPUs':>4} {'step s':>8} {'tokens/s':>10} {'speedup':>8} {'eff.':>6}"
        "  GiB/rank after wrap  peak GiB/rank"
    )
    for r in rows:
        single = next((x for x in rows if x["gpus"] == 1 and x["base"] == r["base"]), None)
        speed = r["tokens_per_s"] / single["tokens_per_s"] if single else float("nan")
        r["speedup_vs_1"] = speed
        peaks = ", ".join(f"{x:.1f}" for x in r["peak_alloc_gib_per_rank"] if x is not None) or "-"
        wrap = r.get("alloc_after_wrap_gib_rank0")
        mode = r["mode"] + ("+bf16" if r.get("fsdp_bf16") else "")
        print(
            f"{r['base']:>5} {mode:>10} {r['gpus']:>4} {r['median_step_s']:>8.3f} {r['tokens_per_s']:>10.0f}"
            f" {speed:>8.2f} {speed / r['gpus']:>6.0%}  {'-' if wrap is None else f'{wrap:.2f}':>19}  {peaks}"
        )
    append_jsonl(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
