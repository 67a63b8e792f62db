"""Full training steps of rslora_fast beside its peers, each system in its own process.

    rslora-fast bench --shape llama-3-8b --systems rslora_fast:4bit:unsloth,hf_peft:bf16
    python benches/train_step.py --systems rslora_fast:4bit:unsloth,unsloth:4bit --peer-wheels .peer-wheels
    rslora-fast bench --mode longctx --cap-gib 24 --systems rslora_fast:4bit:unsloth

(``python benches/train_step.py`` and ``python -m rslora_fast.bench`` are the same command, except
that the Unsloth systems run only from a checkout: their runner is ``benches/peers.py``, and the
package holds no Unsloth code.)

Builds the named shape with random bf16 weights once into ``--cache`` (save_pretrained), loads it
through each system's own loader in its own process, runs ``--warmup`` + ``--steps`` training steps
(random token ids, labels = inputs, ``torch.optim.AdamW(lr=2e-4)`` on the LoRA parameters with
torch's defaults, or fused with ``--optimizer fused``; LoRA r=16 on the seven projections), then
``--busy-steps`` more with the GPU kept ahead of the host (its own time per step), and as many
with its kernel timeline traced (its idle share of the step).
Prints a table with every figure as a ratio to the Unsloth system of the same precision measured in
the same call; every row is appended as a JSON line to ``--out`` as soon as its system finishes.

Systems (``name:base[:checkpointing][:budget=GiB][:embed=host][:save=auto|always]``, checkpointing one of unsloth | true | false):
  rslora_fast:4bit | rslora_fast:16bit   rslora_fast; ``budget=`` is ``get_peft_model(max_memory_gb=)``,
                                        ``embed=host`` is ``get_peft_model(offload_embedding=True)``,
                                        ``save=`` is ``get_peft_model(save_policy=)``
  hf_peft:bf16       transformers + peft, bf16 base, HF (non-reentrant) checkpointing
  hf_peft_bnb:nf4    transformers + peft + bitsandbytes NF4, double quant (from the peer wheels)
  unsloth:4bit | unsloth:bf16   Unsloth from the peer wheels (``--peer-wheels DIR``), own process
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# One row per shape, in the order of _SHAPE_FIELDS (the Hugging Face config keys).
_SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "rope_theta",
    "model_type",
)
_SHAPE_ROWS: dict[str, tuple] = {
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128256, 500000.0, "llama"),
    # Llama-3.2-1B-like: 16 layers, hidden 2048, the head tied to the input embedding (below).
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256, 500000.0, "llama"),
    "llama-3.2-3b": (3072, 8192, 28, 24, 8, 128256, 500000.0, "llama"),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064, 1000000.0, "qwen2"),
    "mistral-7b": (4096, 14336, 32, 32, 8, 32768, 1000000.0, "mistral"),
    # CPU-sized, for the test that keeps this harness from rotting
    "tiny": (64, 128, 2, 4, 2, 256, 10000.0, "llama"),
}
SHAPES: dict[str, dict] = {
    name: dict(zip(_SHAPE_FIELDS, row, strict=True)) for name, row in _SHAPE_ROWS.items()
}
SHAPES["llama-3.2-1b"]["tie_word_embeddings"] = True
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> accepted bases (the first is the default)
SYSTEM_BASES: dict[str, tuple[str, ...]] = {
    "rslora_fast": ("4bit", "16bit"),
    "hf_peft": ("bf16",),
    "hf_peft_bnb": ("nf4",),
    "unsloth": ("4bit", "bf16"),
}
# Systems whose packages come only from the peer wheels (bitsandbytes, Unsloth, TRL).
PEER_SYSTEMS = frozenset({"hf_peft_bnb", "unsloth"})
CHECKPOINTING = {"unsloth": "unsloth", "true": True, "false": False}
OPTIMIZERS = ("default", "fused")


@dataclass(frozen=True)
class SystemSpec:
    """One system of the bench, parsed from ``name:base[:checkpointing][:budget=GiB][:embed=host][:save=...]``."""

    text: str
    name: str
    base: str
    checkpointing: str
    budget: float | None
    offload_embedding: bool = False
    save_policy: str = "never"

    @property
    def precision(self) -> str:
        return "4bit" if self.base in ("4bit", "nf4") else "16bit"


def parse_system(text: str) -> SystemSpec:
    """Parse and check one system; ValueError names the bad part and what is accepted."""
    parts = text.split(":")
    name = parts[0]
    if name not in SYSTEM_BASES:
        raise ValueError(f"unknown system {text!r}: the name is one of {sorted(SYSTEM_BASES)}")
    base = parts[1] if len(parts) > 1 and parts[1] else SYSTEM_BASES[name][0]
    if base not in SYSTEM_BASES[name]:
        raise ValueError(f"system {text!r}: base {base!r} is not one of {list(SYSTEM_BASES[name])}")
    mode, budget, embed, save = "unsloth", None, False, "never"
    for extra in parts[2:]:
        if extra.startswith("budget=") and name == "rslora_fast":
            try:
                budget = float(extra.removeprefix("budget="))
            except ValueError:
                raise ValueError(f"system {text!r}: budget must be GiB as a number, got {extra!r}") from None
        elif extra in ("save=auto", "save=always") and name == "rslora_fast":
            save = extra.removeprefix("save=")
        elif extra == "embed=host" and name == "rslora_fast":
            embed = True
        elif extra in CHECKPOINTING:
            mode = extra
        else:
            accepted = list(CHECKPOINTING) + (
                ["budget=GiB", "embed=host", "save=auto", "save=always"] if name == "rslora_fast" else []
            )
            raise ValueError(f"system {text!r}: {extra!r} is not one of {accepted}")
    return SystemSpec(text, name, base, mode, budget, embed, save)


def shape_folder_name(shape: str) -> str:
    """The cache folder of a shape: its name plus a digest of its config (a changed shape rebuilds)."""
    digest = hashlib.sha1(json.dumps(SHAPES[shape], sort_keys=True).encode()).hexdigest()[:8]
    return f"{shape}-{digest}"


def build_checkpoint(shape: str, cache: Path) -> Path:
    """Write the shape's random bf16 model once (save_pretrained, safetensors shards); returns the folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(cache) / shape_folder_name(shape)
    if (folder / "config.json").exists():
        return folder
    spec = dict(SHAPES[shape])
    model_type = spec.pop("model_type")
    tied = spec.pop("tie_word_embeddings", False)
    config = AutoConfig.for_model(
        model_type, max_position_embeddings=131072, tie_word_embeddings=tied, **spec
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"building a random {shape} checkpoint in {folder} ...", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = folder.with_suffix(".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="5GB")
    # Token ids are random; any tokenizer makes the folder a complete checkpoint for every loader.
    from rslora_fast.demo import build_demo_tokenizer

    build_demo_tokenizer().save_pretrained(tmp)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the parent keeps no GPU memory while the systems run
    tmp.rename(folder)
    return folder


def install_peer_wheels(folder: Path, cache: Path) -> Path:
    """``pip install --no-index --no-deps --target`` the peer wheels once per set; returns the target.

    Only the peer systems' processes get the target on PYTHONPATH, so rslora_fast's own systems run
    without bitsandbytes, Unsloth or TRL.
    """
    wheels = sorted(Path(folder).glob("*.whl"))
    if not wheels:
        raise ValueError(f"--peer-wheels {folder}: no *.whl files there (the peers' wheels are expected)")
    stamp = hashlib.sha1("".join(f"{w.name}:{w.stat().st_size}" for w in wheels).encode()).hexdigest()[:10]
    target = Path(cache).resolve() / f"peers-{stamp}"
    if (target / ".installed").exists():
        return target
    tmp = target.with_suffix(".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    proc = subprocess.run([*cmd, "--target", str(tmp), *map(str, wheels)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ValueError(f"installing the peer wheels from {folder} failed: {proc.stderr.strip()[-600:]}")
    (tmp / ".installed").write_text("\n".join(w.name for w in wheels) + "\n")
    tmp.rename(target)
    return target


# ----------------------------------------------------------------------------- loaders per system


def load_system(system: str, model_dir: Path, seq_len: int, lora_r: int):
    """Load ``system`` and attach LoRA; returns the trainable model (Unsloth: see benches/peers.py)."""
    spec = parse_system(system)
    if spec.name == "unsloth":
        raise ValueError(f"{system!r} is loaded by benches/peers.py in its own process, not here")
    if spec.name == "rslora_fast":
        return _load_rslora_fast(spec, model_dir, seq_len, lora_r)
    return _load_hf_peft(spec, model_dir, lora_r)


def _device_dtype():
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, torch.bfloat16 if device == "cuda" else torch.float32


def protocol_lora(lora_r: int, checkpointing: str, seq_len: int) -> dict:
    """The protocol's ``get_peft_model`` keywords, shared by rslora_fast and Unsloth (benches/peers.py)
    and the DDP bench; ``checkpointing`` is a key of CHECKPOINTING."""
    return dict(
        r=lora_r,
        target_modules=TARGETS,
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing=CHECKPOINTING[checkpointing],
        random_state=3407,
        max_seq_length=seq_len,
    )


def _load_rslora_fast(spec: SystemSpec, model_dir: Path, seq_len: int, lora_r: int):
    from rslora_fast import FastLanguageModel

    _, dtype = _device_dtype()
    model, _ = FastLanguageModel.from_pretrained(
        str(model_dir), max_seq_length=seq_len, dtype=dtype, load_in_4bit=spec.precision == "4bit"
    )
    return FastLanguageModel.get_peft_model(
        model,
        max_memory_gb=spec.budget,
        offload_embedding=spec.offload_embedding,
        save_policy=spec.save_policy,
        **protocol_lora(lora_r, spec.checkpointing, seq_len),
    )


def _load_hf_peft(spec: SystemSpec, model_dir: Path, lora_r: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device, dtype = _device_dtype()
    kwargs: dict = dict(dtype=dtype, device_map=device, attn_implementation="sdpa")
    if spec.name == "hf_peft_bnb":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if CHECKPOINTING[spec.checkpointing]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    cfg = LoraConfig(
        r=lora_r, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, cfg)


# ----------------------------------------------------------------------------- the timed loop


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_optimizer(params, kind: str):
    """The protocol's optimizer: torch's AdamW with its defaults (headline), or its fused variant."""
    import torch

    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer {kind!r} is not one of {list(OPTIMIZERS)}")
    return torch.optim.AdamW(params, lr=2e-4, **({"fused": True} if kind == "fused" else {}))


def _one_step(model, opt, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _timed_step(model, opt, ids, spin_cycles: int = 0) -> tuple[object, float, float, float | None]:
    """One step: (loss, wall s, host enqueue s, GPU s between CUDA events around the step).

    With ``spin_cycles`` the GPU first spins that long, so the host queues the whole step while the
    GPU is still busy: the events then time the step's GPU work alone, without waiting on the host.
    """
    import torch

    cuda = ids.is_cuda
    _sync()
    if spin_cycles:
        torch.cuda._sleep(spin_cycles)
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    loss = _one_step(model, opt, ids)
    enqueue = time.perf_counter() - t0
    if cuda:
        end.record()
    _sync()
    wall = time.perf_counter() - t0
    return loss, wall, enqueue, (start.elapsed_time(end) / 1e3 if cuda else None)


def _spin_cycles_per_s() -> float:
    """GPU clock cycles per second of ``torch.cuda._sleep`` (measured, clocks vary)."""
    import torch

    torch.cuda._sleep(1000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    end.synchronize()
    return 20_000_000 / (start.elapsed_time(end) / 1e3)


def train_steps(
    model,
    batch: int,
    seq_len: int,
    vocab: int,
    warmup: int,
    steps: int,
    optimizer: str = "default",
    busy_steps: int = 0,
) -> dict:
    """Run the protocol's loop; returns per-step times (wall, host enqueue, GPU), losses, peaks."""
    import torch

    device = next(p for p in model.parameters()).device
    model.train()  # from_pretrained returns eval mode; checkpointing only acts in training mode
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer)
    gen = torch.Generator().manual_seed(0)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out: dict = {"step_times": [], "enqueue_times": [], "gpu_times": [], "losses": []}
    for i in range(warmup + steps):
        if i == warmup and cuda:  # the timed steps' peak; warm-up (compiles, first allocations) apart
            out["peak_alloc_warmup_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
        loss, wall, enqueue, gpu = _timed_step(model, opt, ids)
        if i >= warmup:
            out["step_times"].append(wall)
            out["enqueue_times"].append(enqueue)
            out["gpu_times"].append(gpu)
        out["losses"].append(float(loss))
    if cuda:
        out["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    if cuda and busy_steps and out["step_times"]:
        out.update(_busy_steps(model, opt, gen, batch, seq_len, vocab, device, busy_steps, out))
        out.update(_traced_steps(model, opt, gen, batch, seq_len, vocab, device, busy_steps, out))
    return out


def _busy_steps(model, opt, gen, batch, seq_len, vocab, device, n: int, timed: dict) -> dict:
    """The GPU's own time per step: steps queued behind a spin longer than the host needs to queue them."""
    import torch

    spin_s = 1.25 * max(statistics.median(timed["step_times"]), max(timed["enqueue_times"])) + 0.02
    cycles = int(spin_s * _spin_cycles_per_s())
    busy, enqueue = [], []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
        loss, _, enq, gpu = _timed_step(model, opt, ids, spin_cycles=cycles)
        busy.append(gpu)
        enqueue.append(enq)
        timed["losses"].append(float(loss))
    # A host that waited on the GPU inside the step (a sync, or a full launch queue) may have let it
    # idle after the spin: the busy time is then an upper bound.
    return {"busy_times": busy, "busy_upper_bound": max(enqueue) > 0.9 * spin_s}


def union_length(spans: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals (overlaps, e.g. kernels on two streams, counted once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _traced_steps(model, opt, gen, batch, seq_len, vocab, device, n: int, timed: dict) -> dict:
    """The GPU's idle share per step from its kernel timeline (CUDA activity only, no op tracing).

    Kernels, copies and memsets that overlap count once; idle = 1 - busy / the step's wall time.
    Tracing adds a little host time per launch, so the traced steps' own wall time is reported too.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    idle, walls = [], []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            loss, wall, _, _ = _timed_step(model, opt, ids)
        timed["losses"].append(float(loss))
        cuda = torch.autograd.DeviceType.CUDA
        spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == cuda]
        if not spans:
            return {}
        idle.append(max(0.0, 1.0 - union_length(spans) / 1e6 / wall))
        walls.append(wall)
    return {"traced_idle": idle, "traced_step_times": walls}


def step_stats(res: dict, batch: int, seq_len: int) -> dict:
    """Medians, spread (slowest / median), host enqueue and the GPU's idle share of the step."""
    times = res["step_times"]
    med = statistics.median(times)
    stats = {
        "tokens_per_s": round(batch * seq_len / med, 1),
        "step_s_median": round(med, 4),
        "step_s_max": round(max(times), 4),
        "spread": round(max(times) / med, 3),
        "host_enqueue_s_median": round(statistics.median(res["enqueue_times"]), 4),
        "timed_steps": len(times),
    }
    gpu = [g for g in res["gpu_times"] if g is not None]
    if gpu:
        stats["gpu_event_s_median"] = round(statistics.median(gpu), 4)
    if res.get("busy_times"):
        busy = statistics.median(res["busy_times"])
        stats["gpu_busy_s_median"] = round(busy, 4)
        stats["gpu_idle_share_spin"] = round(max(0.0, 1.0 - busy / med), 4)
        stats["gpu_busy_upper_bound"] = res["busy_upper_bound"]
        stats.update(gpu_idle_share=stats["gpu_idle_share_spin"], gpu_idle_source="spin")
    if res.get("traced_idle"):
        stats["gpu_idle_share"] = round(statistics.median(res["traced_idle"]), 4)
        stats["gpu_idle_source"] = "kernel trace"
        stats["traced_step_s_median"] = round(statistics.median(res["traced_step_times"]), 4)
    return stats


def measure(model, args: argparse.Namespace, load_s: float, extra: dict | None = None) -> dict:
    """Train ``model`` under the protocol and build its result row (shared with the peer runner)."""
    import torch

    vocab = json.loads((Path(args.model_dir) / "config.json").read_text())["vocab_size"]
    cuda = torch.cuda.is_available()
    after_load = torch.cuda.memory_allocated() / 2**30 if cuda else None
    res = train_steps(
        model, args.batch, args.seq_len, vocab, args.warmup, args.steps, args.optimizer, args.busy_steps
    )
    row = {"kind": "train_step", "system": args.system, "shape": args.shape, "batch": args.batch}
    row["seq_len"] = args.seq_len
    row.update(step_stats(res, args.batch, args.seq_len))
    row.update(
        {
            "peak_alloc_gib": res.get("peak_alloc_gib"),
            "peak_alloc_warmup_gib": res.get("peak_alloc_warmup_gib"),
            "peak_reserved_gib": res.get("peak_reserved_gib"),
            "after_load_gib": after_load,
            "load_s": round(load_s, 1),
            "final_loss": res["losses"][-1],
            "optimizer": args.optimizer,
            "warmup": args.warmup,
            "losses_finite": all(x == x and abs(x) != float("inf") for x in res["losses"]),
            "gpu": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
        }
    )
    row.update(extra or {})
    return row


def worker(args: argparse.Namespace, peer=None) -> dict:
    """One system in this process: load (``peer.load_model`` for a peer system), train, measure."""
    model_dir = Path(args.model_dir)
    t0 = time.perf_counter()
    load = peer.load_model if peer is not None else load_system
    model = load(args.system, model_dir, args.seq_len, args.r)
    _sync()
    load_s = time.perf_counter() - t0
    row = measure(model, args, load_s, {"version": peer.version()} if peer is not None else None)
    if parse_system(args.system).name == "rslora_fast":
        row.update(_budget_fields(model))  # after training: the budget is planned in the first step
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
        "kind": "longctx",
        "mode": "longctx",
        "cap_gib": args.cap_gib,
        "longest_seq_len": best and best["seq_len"],
        "len_step": unit,
        "tokens_per_s": best and round(best["seq_len"] / best["step_s"], 1),
        "peak_alloc_gib": best and best["peak_alloc_gib"],
        "date": time.strftime("%Y-%m-%d"),
    }
    return row


# ----------------------------------------------------------------------------- ratios and the table


def ratio_rows(rows: list[dict]) -> list[dict]:
    """Each measured row against the Unsloth row of its precision and optimizer from the same call."""
    refs: dict[tuple, dict] = {}
    for r in rows:
        if r.get("kind") == "train_step" and parse_system(r["system"]).name == "unsloth":
            spec = parse_system(r["system"])
            refs.setdefault((spec.precision, r["optimizer"], spec.checkpointing), r)
            refs.setdefault((spec.precision, r["optimizer"]), r)
    out = []
    for r in rows:
        if r.get("kind") != "train_step" or parse_system(r["system"]).name == "unsloth":
            continue
        spec = parse_system(r["system"])
        # A memory budget spends memory to skip recompute: its peer is Unsloth without checkpointing.
        mode = "false" if spec.budget is not None else spec.checkpointing
        ref = refs.get((spec.precision, r["optimizer"], mode)) or refs.get((spec.precision, r["optimizer"]))
        if ref is None:
            continue
        ratio = {"kind": "ratio_to_unsloth", "system": r["system"], "optimizer": r["optimizer"]}
        ratio["unsloth"] = ref["system"]
        ratio["tokens_per_s"] = round(r["tokens_per_s"] / ref["tokens_per_s"], 3)
        for key in ("peak_alloc_gib", "spread", "host_enqueue_s_median"):
            if r.get(key) and ref.get(key):
                ratio[key] = round(r[key] / ref[key], 3)
        out.append(ratio)
    return out


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict]) -> None:
    if rows and rows[0].get("mode") == "longctx":
        print("| system | cap (GiB) | longest trained | tokens/s there | peak alloc (GiB) |")
        print("|---|---|---|---|---|")
        for r in rows:
            if "longest_seq_len" not in r:
                print(f"| {r['system']} | {r.get('error') or r.get('skipped')} |")
                continue
            print(
                f"| {r['system']} | {r['cap_gib']} | {r['longest_seq_len']} | {r['tokens_per_s']} | "
                f"{(r['peak_alloc_gib'] or 0):.2f} |"
            )
        return
    ratios = {(x["system"], x["optimizer"]): x for x in ratio_rows(rows)}
    print(
        "| system | optimizer | tokens/s | x Unsloth | step (s) | slowest/median | host enqueue (s) "
        "| GPU busy (s) | GPU idle | peak alloc (GiB) | x Unsloth | load (s) | final loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("kind") != "train_step":
            print(f"| {r['system']} | {r.get('optimizer', '')} | {'failed' if 'error' in r else 'skipped'}: "
                  f"{(r.get('error') or r.get('skipped') or '')[:160]} |")  # fmt: skip
            continue
        x = ratios.get((r["system"], r["optimizer"]), {})
        idle = r.get("gpu_idle_share")
        bound = r.get("gpu_idle_source") == "spin" and r.get("gpu_busy_upper_bound")
        idle_s = "-" if idle is None else f"{100 * idle:.1f}%" + ("+" if bound else "")
        print(
            f"| {r['system']} | {r['optimizer']} | {r['tokens_per_s']:,.0f} | {_fmt(x.get('tokens_per_s'))} | "
            f"{r['step_s_median']:.3f} | {r['spread']:.2f} | {r['host_enqueue_s_median']:.3f} | "
            f"{_fmt(r.get('gpu_busy_s_median'), '.3f')} | {idle_s} | {_fmt(r['peak_alloc_gib'])} | "
            f"{_fmt(x.get('peak_alloc_gib'))} | {r['load_s']} | {r['final_loss']:.4f} |"
        )


# ----------------------------------------------------------------------------- running the systems


def _worker_args(args: argparse.Namespace, system: str, optimizer: str, model_dir: Path) -> list[str]:
    flags = {
        "--system": system,
        "--optimizer": optimizer,
        "--model-dir": model_dir,
        "--shape": args.shape,
        "--mode": args.mode,
        "--batch": args.batch,
        "--seq-len": args.seq_len,
        "--warmup": args.warmup,
        "--steps": args.steps,
        "--busy-steps": args.busy_steps,
        "--r": args.r,
        "--cap-gib": args.cap_gib,
        "--max-len": args.max_len,
        "--len-step": args.len_step,
    }
    return ["--worker", *[str(x) for kv in flags.items() for x in kv]]


def run_worker_process(cmd: list[str], env: dict, log: Path, timeout: float | None) -> str | None:
    """Run one system's process (output to ``log``); returns None on success, else the error line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        # Its own session, so that a timeout also ends what it started (compile workers).
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"timed out after {timeout:.0f} s (log: {log})"
    if proc.returncode == 0:
        return None
    lines = [x for x in log.read_text(errors="replace").strip().splitlines() if x.strip()]
    sys.stderr.write("\n".join(lines[-40:]) + "\n")
    return f"exit {proc.returncode}: {lines[-1] if lines else ''} (log: {log})"


def _installed_here(spec: SystemSpec) -> bool:
    """HF peft + bitsandbytes also runs where bitsandbytes is installed (a dev venv, a carried site)."""
    import importlib.util

    return spec.name == "hf_peft_bnb" and importlib.util.find_spec("bitsandbytes") is not None


@dataclass
class Runner:
    """How the systems of one call run: where peers come from, and the time left."""

    peer_site: Path | None
    runners: dict[str, list[str]]
    deadline: float | None

    def skip_reason(self, spec: SystemSpec, script: str) -> str | None:
        if spec.name in PEER_SYSTEMS and self.peer_site is None and not _installed_here(spec):
            return f"no --peer-wheels given: {spec.name} runs from the peer wheels"
        if spec.name == "unsloth" and "unsloth" not in self.runners:
            return f"Unsloth runs only from a checkout ({script}); the package holds no Unsloth code"
        if self.deadline is not None and self.deadline - time.time() < 20:
            return "the call's --time-budget-s was spent before this system started"
        return None

    def env(self, spec: SystemSpec) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if spec.name in PEER_SYSTEMS and self.peer_site is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.peer_site), env.get("PYTHONPATH")]))
        if spec.name == "unsloth":
            env.update(UNSLOTH_DISABLE_STATISTICS="1", HF_HUB_OFFLINE="1")
        return env

    def timeout(self) -> float | None:
        return None if self.deadline is None else max(1.0, self.deadline - time.time())


def run_one(args, p, runner: Runner, system: str, optimizer: str, model_dir: Path) -> dict:
    """One system: in its own process (or here with --in-process); failures become error rows."""
    head = {"kind": "train_step", "system": system, "optimizer": optimizer, "shape": args.shape}
    try:
        spec = parse_system(system)
    except ValueError as e:
        return {**head, "kind": "error", "error": str(e)}
    reason = runner.skip_reason(spec, "python benches/train_step.py")
    if reason:
        return {**head, "kind": "skipped", "skipped": reason}
    wargs = _worker_args(args, system, optimizer, model_dir)
    result = Path(args.cache).resolve() / f"result-{os.getpid()}.json"
    result.unlink(missing_ok=True)
    if args.in_process and spec.name not in PEER_SYSTEMS:
        ns = p.parse_args([*wargs, "--result", str(result)])
        return longctx_worker(ns) if args.mode == "longctx" else worker(ns)
    cmd = runner.runners.get(spec.name, [sys.executable, "-m", "rslora_fast.bench"])
    log = Path(args.cache).resolve() / "logs" / f"{system.replace(':', '_')}-{optimizer}.log"
    print(f"[{time.strftime('%H:%M:%S')}] {system} ({optimizer}) ...", file=sys.stderr, flush=True)
    err = run_worker_process([*cmd, *wargs, "--result", str(result)], runner.env(spec), log, runner.timeout())
    if err is not None or not result.exists():
        return {**head, "kind": "error", "error": err or "the worker wrote no result"}
    return json.loads(result.read_text())


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append each row to ``path`` as one JSON line (the benches' result files), making its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def emit_row(row: dict, out: str) -> None:
    """Print and append one row at once, so a call cut short keeps what it measured."""
    print(json.dumps(row), flush=True)
    append_jsonl(out, [row])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rslora-fast bench", description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    p.add_argument("--systems", default="rslora_fast:4bit:unsloth,rslora_fast:16bit:unsloth,hf_peft:bf16")
    p.add_argument("--mode", default="step", choices=["step", "longctx"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (Unsloth compiles in them)")
    p.add_argument("--steps", type=int, default=20, help="timed steps; the median is reported")
    p.add_argument(
        "--busy-steps", type=int, default=5, help="CUDA: extra steps timing the GPU's own work, each way"
    )
    p.add_argument("--optimizer", default="default", help="default | fused | default,fused (one row each)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--cap-gib", type=float, default=24.0)
    p.add_argument("--max-len", type=int, default=131072)
    p.add_argument("--len-step", type=int, default=1024, help="longctx: search granularity in tokens")
    p.add_argument("--cache", default="bench-cache")
    p.add_argument("--out", default="results/train_step.jsonl")
    p.add_argument("--peer-wheels", help="folder of the peer wheels (Unsloth, bitsandbytes, TRL)")
    p.add_argument("--time-budget-s", type=float, help="systems not started within this are skipped")
    p.add_argument(
        "--in-process", action="store_true", help="run rslora_fast systems in this process (tests)"
    )
    # internal: one system per worker process
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--system", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def main(
    argv: list[str] | None = None,
    runners: dict[str, list[str]] | None = None,
    loaders: dict | None = None,
) -> int:
    """The bench's command line. ``runners`` maps a system name to the command that runs its worker
    (benches/train_step.py names benches/peers.py for Unsloth); ``loaders`` maps a system name to the
    module a peer runner loads it with (``load_model``, ``version``; see benches/peers.py)."""
    p = build_parser()
    args = p.parse_args(argv)
    optimizers = [o for o in args.optimizer.split(",") if o]
    bad = [o for o in optimizers if o not in OPTIMIZERS]
    if bad or not optimizers:
        p.error(f"--optimizer {args.optimizer!r}: each must be one of {list(OPTIMIZERS)}")
    if args.worker:
        peer = (loaders or {}).get(parse_system(args.system).name)
        row = longctx_worker(args) if args.mode == "longctx" else worker(args, peer)
        Path(args.result).write_text(json.dumps(row))
        return 0

    peer_site = install_peer_wheels(Path(args.peer_wheels), Path(args.cache)) if args.peer_wheels else None
    deadline = None if args.time_budget_s is None else time.time() + args.time_budget_s
    runner = Runner(peer_site, runners or {}, deadline)
    model_dir = build_checkpoint(args.shape, Path(args.cache))
    rows = []
    for optimizer in optimizers:
        for system in [s for s in args.systems.split(",") if s]:
            row = run_one(args, p, runner, system, optimizer, model_dir)
            rows.append(row)
            emit_row(row, args.out)
    for ratio in ratio_rows(rows):
        emit_row(ratio, args.out)
    print_table(rows)
    return 0 if all(r.get("kind") != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
