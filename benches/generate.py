"""Generation after training and inside GRPO, beside Unsloth and HF peft + bitsandbytes.

    python benches/generate.py --peer-wheels .peer-wheels                  # part "generate": 8B rows
    python benches/generate.py --part grpo --peer-wheels .peer-wheels      # GRPO step, fast path on/off
    python benches/generate.py --smoke                                     # tiny shape on CPU (CI)

Part ``generate`` (protocol in docs/benchmarks.md): the shape with random bf16 weights, LoRA r=16 on
the seven projections with non-zero B, ``for_inference`` (Unsloth's own for its system; eval mode
for HF peft), then greedy ``model.generate`` of exactly ``--new-tokens`` tokens after a random
``--prompt-len`` prompt at each batch size; one warm-up, then the median of ``--runs`` runs. Per row:
tokens/s, the time to first token (prompt alone, 1 new token), decode tokens/s, achieved GB/s of
weight reads per decode step (bytes from the config: NF4 with double-quant absmax for 4-bit, bf16
otherwise), peak GiB; at batch 1 also the time to first token of a ``--long-prompt`` prompt. Every
row carries its ratio to the Unsloth row of the same precision and batch measured in the same call.

Part ``grpo``: TRL's ``GRPOTrainer`` (no vLLM; TRL from the peer wheels on the GPU machine) on the
1B-like shape with rslora_fast's fast generate path on and off (``RSLORA_FAST_GENERATE=off``);
median step time of ``--runs`` steps after one warm-up step.

Each system runs in its own process; one that fails is reported and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This folder's kernels.py would shadow the PyPI package `kernels` that bitsandbytes probes.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
GENERATE_SYSTEMS = "rslora_fast:4bit,unsloth:4bit,hf_peft_bnb:nf4,rslora_fast:16bit,unsloth:bf16"
SMOKE = ["--shape", "tiny", "--batches", "1,2", "--prompt-len", "16", "--new-tokens", "4",
         "--long-prompt", "32", "--runs", "1", "--max-seq-length", "64", "--grpo-completion", "4",
         "--grpo-batch", "2", "--grpo-generations", "2", "--grpo-prompt-len", "8"]  # fmt: skip


# ----------------------------------------------------------------------------- in a worker process


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def set_lora_b(model, std: float = 0.02, seed: int = 0) -> int:
    """Fill every LoRA B matrix with small random values (a trained adapter, not a no-op); returns the count."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
                n += 1
    if n == 0:
        raise RuntimeError("no lora_B parameter found: the adapter was not attached")
    return n


def weight_bytes_per_step(config: dict, four_bit: bool, r: int) -> int:
    """Bytes of weights one decode step reads: projections, LoRA A/B, norms, the head (not the embedding)."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]  # (in, out)
    weights = sum(i * o for i, o in shapes)
    # NF4: 4 bits a weight, a uint8 absmax per 64 weights, an fp32 scale per 256 absmax (double quant).
    per_weight = 0.5 + 1 / 64 + 4 / (64 * 256) if four_bit else 2
    lora = 2 * r * sum(i + o for i, o in shapes)
    per_layer = weights * per_weight + lora + 2 * 2 * h
    return int(layers * per_layer + 2 * config["vocab_size"] * h + 2 * h)


def _without_merged(system: str) -> tuple[str, bool]:
    """(system without a trailing ``:merged``, whether it had one): rslora_fast's merged
    generation path, ``for_inference(model, merge_lora=True)``."""
    if system.endswith(":merged"):
        return system.removesuffix(":merged"), True
    return system, False


def _load_for_inference(args, loaders: dict):
    """The system's model with LoRA attached, B non-zero, switched to generation by its own API."""
    system, merged = _without_merged(args.system)
    name = system.split(":")[0]
    if name in loaders:  # Unsloth, from benches/peers.py
        peer = loaders[name]
        model = peer.load_model(args.system, args.model_dir, args.max_seq_length, args.r)
        set_lora_b(model)
        return peer.for_inference(model), peer.version()
    from rslora_fast import bench

    model = bench.load_system(system, Path(args.model_dir), args.max_seq_length, args.r)
    set_lora_b(model)
    if name == "rslora_fast":
        import rslora_fast
        from rslora_fast import FastLanguageModel

        model = FastLanguageModel.for_inference(model, merge_lora=merged)
        return model, f"rslora_fast {rslora_fast.__version__}"
    import peft

    model.eval()
    base = model.get_base_model()
    base.gradient_checkpointing_disable()
    base.config.use_cache = True
    return model, f"peft {peft.__version__}"


def time_generate(model, batch: int, prompt_len: int, new_tokens: int, vocab: int, runs: int) -> tuple:
    """(median seconds, tokens produced per sequence) of greedy generate after one warm-up run."""
    import torch

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(batch * 100003 + prompt_len)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=gen).to(device)
    kw = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    times, produced = [], 0
    for i in range(1 + runs):
        _sync()
        t0 = time.perf_counter()
        out = model.generate(**kw)
        _sync()
        if i > 0:
            times.append(time.perf_counter() - t0)
        produced = out.shape[1] - prompt_len
    return statistics.median(times), produced


def generate_worker(args, loaders: dict) -> list[dict]:
    """One system: a row per batch size (tok/s, time to first token, GB/s), measured in this process."""
    import torch

    config = json.loads((Path(args.model_dir) / "config.json").read_text())
    t0 = time.perf_counter()
    model, version = _load_for_inference(args, loaders)
    load_s = time.perf_counter() - t0
    four_bit = args.system.split(":")[1] in ("4bit", "nf4")
    wbytes = weight_bytes_per_step(config, four_bit, args.r)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        total, produced = time_generate(
            model, batch, args.prompt_len, args.new_tokens, config["vocab_size"], args.runs
        )
        ttft, _ = time_generate(model, batch, args.prompt_len, 1, config["vocab_size"], args.runs)
        step = (total - ttft) / max(1, produced - 1)
        row = {"kind": "generate", "system": args.system, "shape": args.shape, "batch": batch}
        row.update(prompt_len=args.prompt_len, new_tokens=produced, version=version, load_s=round(load_s, 1))
        row.update(
            tokens_per_s=round(batch * produced / total, 2),
            generate_s_median=round(total, 4),
            ttft_s=round(ttft, 4),
            decode_tokens_per_s=round(batch / step, 2) if step > 0 else None,
            weight_bytes_per_step=wbytes,
            weight_gb_per_s=round(wbytes / step / 1e9, 3) if step > 0 else None,
        )
        if batch == 1 and args.long_prompt:
            long_ttft, _ = time_generate(model, 1, args.long_prompt, 1, config["vocab_size"], args.runs)
            row.update(long_prompt_len=args.long_prompt, ttft_long_s=round(long_ttft, 4))
        if torch.cuda.is_available():
            row["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rows.append(row)
    return rows


class _StepTimer:
    """A TrainerCallback timing each optimizer step (generation included) on the host clock."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, *a, **k):
                _sync()
                timer.t0 = time.perf_counter()

            def on_step_end(self, *a, **k):
                _sync()
                timer.times.append(time.perf_counter() - timer.t0)

        self.times: list[float] = []
        self.t0 = 0.0
        self.callback = Callback()


def grpo_worker(args) -> list[dict]:
    """GRPO steps with TRL's GRPOTrainer on an rslora_fast model; the median step time."""
    import dataclasses
    import tempfile

    import torch

    from rslora_fast import bench  # before TRL: rslora_fast installs its TRL compatibility first

    model = bench.load_system(args.system, Path(args.model_dir), args.max_seq_length, args.r)
    set_lora_b(model)
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    gen = torch.Generator().manual_seed(0)
    vocab = min(len(tok), json.loads((Path(args.model_dir) / "config.json").read_text())["vocab_size"])
    prompts = [tok.decode(torch.randint(3, vocab, (args.grpo_prompt_len,), generator=gen)) for _ in range(64)]
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    cuda = torch.cuda.is_available()
    options = dict(
        output_dir=tempfile.mkdtemp(prefix="grpo-bench-"),
        per_device_train_batch_size=args.grpo_batch,
        num_generations=args.grpo_generations,
        max_completion_length=args.grpo_completion,
        max_prompt_length=args.grpo_prompt_len * 4,
        generation_kwargs={"min_new_tokens": args.grpo_completion},  # equal work with the path on and off
        max_steps=1 + args.runs,
        learning_rate=2e-4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        bf16=cuda,
        use_cpu=not cuda,
        dataloader_num_workers=0,
        use_vllm=False,
        seed=0,
    )
    cfg = GRPOConfig(**{k: v for k, v in options.items() if k in fields})

    def reward(completions, **_):  # any cheap reward: GRPO's cost is generation and the update
        return [len(c) / 100.0 for c in completions]

    timer = _StepTimer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=cfg,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tok,
        callbacks=[timer.callback],
    )
    trainer.train()
    lengths = [
        h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h
    ]
    import trl

    row = {"kind": "grpo", "system": args.system, "shape": args.shape, "trl": trl.__version__}
    row.update(fast_generate=os.environ.get("RSLORA_FAST_GENERATE", "on"), steps=len(timer.times))
    row.update(
        step_s_median=round(statistics.median(timer.times[1:] or timer.times), 4),
        step_s_all=[round(t, 4) for t in timer.times],
        completion_mean_length=lengths[-1] if lengths else None,
        generations_per_step=args.grpo_batch,
    )
    return [row]


# ----------------------------------------------------------------------------- the parent


def ratio_to_unsloth(rows: list[dict]) -> None:
    """Add ``x_unsloth`` (tokens/s and time-to-first-token ratios) to each row beside its Unsloth row."""
    refs = {}
    for r in rows:
        if r.get("kind") == "generate" and r["system"].startswith("unsloth:"):
            refs[(r["system"].split(":")[1] == "4bit", r["batch"])] = r
    for r in rows:
        if r.get("kind") != "generate" or r["system"].startswith("unsloth:"):
            continue
        ref = refs.get((r["system"].split(":")[1] in ("4bit", "nf4"), r["batch"]))
        if ref:
            r["x_unsloth"] = {
                "unsloth": ref["system"],
                "tokens_per_s": round(r["tokens_per_s"] / ref["tokens_per_s"], 3),
            }
            r["x_unsloth"]["ttft"] = round(r["ttft_s"] / ref["ttft_s"], 3)
            if r.get("ttft_long_s") and ref.get("ttft_long_s"):
                r["x_unsloth"]["ttft_long"] = round(r["ttft_long_s"] / ref["ttft_long_s"], 3)


def print_tables(rows: list[dict]) -> None:
    print("| system | batch | tokens/s | x Unsloth | decode tok/s | weight GB/s | TTFT (s) | TTFT long (s) | "
          "x Unsloth (long) | peak (GiB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("kind") == "generate":
            x = r.get("x_unsloth", {})
            print(f"| {r['system']} | {r['batch']} | {r['tokens_per_s']:.1f} | {x.get('tokens_per_s', '-')} | "
                  f"{r['decode_tokens_per_s']} | {r['weight_gb_per_s']} | {r['ttft_s']:.3f} | "
                  f"{r.get('ttft_long_s', '-')} | {x.get('ttft_long', '-')} | {r.get('peak_alloc_gib', '-')} |")  # fmt: skip
        elif r.get("kind") in ("error", "skipped"):
            print(f"| {r['system']} | {r['kind']}: {(r.get('error') or r.get('skipped'))[:160]} |")
    grpo = [r for r in rows if r.get("kind") == "grpo"]
    if grpo:
        print("\n| GRPO system | fast generate | step (s) | completion length |\n|---|---|---|---|")
        for r in grpo:
            print(
                f"| {r['system']} | {r['fast_generate']} | {r['step_s_median']:.3f} | {r['completion_mean_length']} |"
            )


def _jobs(args) -> list[tuple[str, str, dict]]:
    """(system, role, extra env) per process to run, for the parts asked."""
    jobs = []
    if "generate" in args.part:
        jobs += [(s, "generate", {}) for s in args.systems.split(",") if s]
    if "grpo" in args.part:
        for base in args.grpo_bases.split(","):
            jobs += [
                (f"rslora_fast:{base}", "grpo", {}),
                (f"rslora_fast:{base}", "grpo", {"RSLORA_FAST_GENERATE": "off"}),
            ]
    return jobs


def _run_job(args, runner, bench, system: str, role: str, env_extra: dict, model_dir: Path) -> list[dict]:
    head = {"system": system, "role": role, **({"fast_generate": "off"} if env_extra else {})}
    try:
        base, merged = _without_merged(system)
        spec = bench.parse_system(base)
        if merged and (spec.name != "rslora_fast" or role != "generate"):
            raise ValueError(f"system {system!r}: ':merged' is rslora_fast's generation path only")
    except ValueError as e:
        return [{**head, "kind": "error", "error": str(e)}]
    reason = runner.skip_reason(spec, "python benches/generate.py")
    if role == "grpo" and reason is None and runner.peer_site is None:
        import importlib.util

        if importlib.util.find_spec("trl") is None:
            reason = "TRL is not installed here and no --peer-wheels were given (TRL comes from them)"
    if reason:
        return [{**head, "kind": "skipped", "skipped": reason}]
    result = Path(args.cache).resolve() / f"generate-result-{os.getpid()}.json"
    result.unlink(missing_ok=True)
    wargs = [*_worker_flags(args, model_dir), "--worker", role, "--system", system, "--result", str(result)]
    if spec.name.startswith("hf_peft"):
        wargs += ["--batches", args.hf_batches]
    cmd = runner.runners.get(spec.name, [sys.executable, str(Path(__file__).resolve())])
    env = runner.env(spec)
    if role == "grpo" and runner.peer_site is not None:  # TRL and its needs come from the peer wheels
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(runner.peer_site), env.get("PYTHONPATH")]))
    env.update(env_extra)
    tag = f"{role}-{system.replace(':', '_')}{'-off' if env_extra else ''}"
    print(f"[{time.strftime('%H:%M:%S')}] {tag} ...", file=sys.stderr, flush=True)
    err = bench.run_worker_process(
        [*cmd, *wargs], env, Path(args.cache).resolve() / "logs" / f"{tag}.log", runner.timeout()
    )
    if err is not None or not result.exists():
        return [{**head, "kind": "error", "error": err or "the worker wrote no result"}]
    return json.loads(result.read_text())


def _worker_flags(args, model_dir: Path) -> list[str]:
    keys = ["shape", "batches", "prompt_len", "new_tokens", "long_prompt", "runs", "max_seq_length", "r",
            "grpo_batch", "grpo_generations", "grpo_completion", "grpo_prompt_len"]  # fmt: skip
    flags = ["--model-dir", str(model_dir)]
    for k in keys:
        flags += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="generate", help="generate | grpo | generate,grpo")
    p.add_argument("--shape", default=None, help="default: llama-3-8b for generate, llama-3.2-1b for grpo")
    p.add_argument("--systems", default=GENERATE_SYSTEMS)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--hf-batches", default="1", help="batch sizes of the HF peft systems (slowest)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument(
        "--long-prompt", type=int, default=2048, help="time to first token at this prompt (batch 1)"
    )
    p.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up; the median is reported")
    p.add_argument("--max-seq-length", type=int, default=4096)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--grpo-bases", default="4bit")
    p.add_argument("--grpo-batch", type=int, default=8, help="completions per step")
    p.add_argument("--grpo-generations", type=int, default=8, help="completions per prompt")
    p.add_argument("--grpo-completion", type=int, default=128, help="new tokens per completion")
    p.add_argument("--grpo-prompt-len", type=int, default=64, help="random prompt length in tokens")
    p.add_argument("--cache", default="bench-cache")
    p.add_argument("--out", default="results/generate.jsonl")
    p.add_argument("--peer-wheels", help="folder of the peer wheels (Unsloth, bitsandbytes, TRL)")
    p.add_argument("--time-budget-s", type=float, help="systems not started within this are skipped")
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU, both parts, seconds (CI)")
    p.add_argument("--worker", choices=["generate", "grpo"], help=argparse.SUPPRESS)
    p.add_argument("--system", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, loaders: dict | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    args = p.parse_args(argv)
    if args.smoke:
        args = p.parse_args(SMOKE + ["--part", "generate,grpo"] + argv)
    if args.worker:
        rows = generate_worker(args, loaders or {}) if args.worker == "generate" else grpo_worker(args)
        Path(args.result).write_text(json.dumps(rows))
        return 0
    parts = [x for x in args.part.split(",") if x]
    if not parts or any(x not in ("generate", "grpo") for x in parts):
        p.error(f"--part {args.part!r}: each part must be one of ['generate', 'grpo']")
    from rslora_fast import bench

    peer_site = (
        bench.install_peer_wheels(Path(args.peer_wheels), Path(args.cache)) if args.peer_wheels else None
    )
    deadline = None if args.time_budget_s is None else time.time() + args.time_budget_s
    runner = bench.Runner(
        peer_site,
        {"unsloth": [sys.executable, str(HERE / "peers.py"), "generate", "--bench-module", __file__]},
        deadline,
    )
    rows, shape = [], args.shape
    for part in parts:
        args.shape = shape or ("llama-3-8b" if part == "generate" else "llama-3.2-1b")
        model_dir = bench.build_checkpoint(args.shape, Path(args.cache))
        for system, role, env_extra in [j for j in _jobs(args) if j[1] == part]:
            for row in _run_job(args, runner, bench, system, role, env_extra, model_dir):
                rows.append(row)
                bench.emit_row(row, args.out)  # at once: a call cut short keeps what it measured
    ratio_to_unsloth(rows)
    for row in rows:
        if "x_unsloth" in row:
            bench.emit_row({"kind": "ratio_to_unsloth", "system": row["system"], "batch": row["batch"],
                            **row["x_unsloth"]}, args.out)  # fmt: skip
    print_tables(rows)
    return 0 if all(r.get("kind") != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
