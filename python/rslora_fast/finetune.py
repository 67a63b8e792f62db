"""``rslora-fast finetune``: LoRA / QLoRA fine-tuning from one command, on HF ``Trainer``.

With no ``--model`` and no ``--data`` it runs the embedded demo (a small llama built locally and the
bundled dataset), shows the loss falling, saves the adapter, reloads it and generates.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("rslora_fast.finetune")

TEXT_SUFFIXES = {".txt", ".text", ".md"}


# ----------------------------------------------------------------------------- arguments


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``finetune`` arguments (LoRA options mirror ``get_peft_model``)."""
    p = parser or argparse.ArgumentParser(prog="rslora-fast finetune", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="local folder or hub id (default: the embedded demo model)")
    p.add_argument(
        "--data", default=None, help="JSONL/JSON/text/CSV/parquet file (default: bundled demo data)"
    )
    p.add_argument("--text-field", default=None, help="field holding plain text")
    p.add_argument("--messages-field", default=None, help="field holding chat messages [{role, content}]")
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dtype", default=None, choices=[None, "bfloat16", "float16", "float32"])
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--bias", default="none", choices=["none", "all", "lora_only"])
    p.add_argument(
        "--target-modules",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="comma-separated leaf names, or all-linear",
    )
    p.add_argument("--use-rslora", action="store_true")
    p.add_argument(
        "--gradient-checkpointing",
        default="unsloth",
        choices=["unsloth", "true", "false"],
        help="checkpointing mode",
    )
    # fused: one kernel for all adapter tensors (the foreach AdamW took ~40 ms of a 0.4 s 8B step)
    p.add_argument("--optim", default="adamw_torch_fused")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-4; 3e-3 for the demo)")
    p.add_argument("--lr-scheduler", default="linear")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (demo: 600)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--packing", action="store_true", help="concatenate examples into full-length rows")
    p.add_argument("--output-dir", default="runs/finetune")
    p.add_argument("--save-steps", type=int, default=100)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    p.add_argument(
        "--save-merged", default=None, choices=["merged_16bit", "lora"], help="also export a merged model"
    )
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--prompt", default=None, help="prompt to generate from after training")
    p.add_argument("--max-new-tokens", type=int, default=24)
    return p


# ----------------------------------------------------------------------------- data


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a data file into a list of dicts.

    JSONL and plain text are read directly; JSON, CSV and parquet go through ``datasets`` when it is
    installed (plain JSON lists and CSV are read without it too).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data: no such file {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".ndjson"}:
        out = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
        return out
    if suffix in TEXT_SUFFIXES:
        return [{"text": block} for block in path.read_text(encoding="utf-8").split("\n\n") if block.strip()]
    try:
        import datasets  # optional
    except ImportError:
        datasets = None
    if datasets is not None and suffix in {".json", ".csv", ".parquet"}:
        kind = {".json": "json", ".csv": "csv", ".parquet": "parquet"}[suffix]
        return list(datasets.load_dataset(kind, data_files=str(path), split="train"))
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else data.get("data", [])
    if suffix == ".csv":
        import csv

        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"--data: unsupported file type {suffix!r}; use .jsonl, .json, .txt, .csv or .parquet")


def record_to_text(rec: dict[str, Any], tokenizer, text_field: str | None, messages_field: str | None) -> str:
    """One training string per record, through the tokenizer's chat template when there is one."""
    if text_field:
        return str(rec[text_field])
    messages = rec.get(messages_field or "messages")
    if messages is None and "instruction" in rec:
        messages = [
            {"role": "user", "content": str(rec["instruction"])},
            {"role": "assistant", "content": str(rec.get("response", rec.get("output", "")))},
        ]
    if messages is not None:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + (tokenizer.eos_token or "")
    if "text" in rec:
        return str(rec["text"])
    raise ValueError(
        f"cannot find text in record with fields {sorted(rec)}; pass --text-field or --messages-field"
    )


def tokenize(texts: list[str], tokenizer, max_len: int, packing: bool) -> list[dict[str, list[int]]]:
    """Token ids per example (truncated), or packed rows of exactly ``max_len`` tokens."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if not packing:
        return [{"input_ids": x[:max_len]} for x in ids if x]
    flat = [t for x in ids for t in x]
    return [{"input_ids": flat[i : i + max_len]} for i in range(0, len(flat) - max_len + 1, max_len)]


class PadCollator:
    """Pads a batch to its longest row; labels are the inputs with padding set to -100."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows):
        import torch

        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------- training


def _make_trainer_class():
    from transformers import Trainer

    class FinetuneTrainer(Trainer):
        """Adds tokens/s and GPU memory to every log line (and so to the progress bar)."""

        _last: tuple[float, int] | None = None

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            import torch

            now, seen = time.perf_counter(), int(self.state.num_input_tokens_seen)
            if self._last is not None and now > self._last[0] and seen > self._last[1]:
                logs["tokens_per_s"] = round((seen - self._last[1]) / (now - self._last[0]), 1)
            self._last = (now, seen)
            if torch.cuda.is_available():
                logs["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            super().log(logs, *args, **kwargs)

        def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
            # Checkpoints hold the adapter in PEFT format, not a copy of the frozen base model.
            self.model.save_pretrained(output_dir or self.args.output_dir)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            (model or self.model).load_adapter(resume_from_checkpoint, is_trainable=True)

    return FinetuneTrainer


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one fine-tune as described by ``args``; returns a summary dict (losses, paths)."""
    import torch
    from transformers import TrainingArguments

    from . import FastLanguageModel, PeftModel
    from .demo import build_demo_model, demo_data_path

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    demo = args.model is None
    model_path = args.model or str(build_demo_model())
    # The demo's base is random, so it needs a livelier learning rate and a fixed number of steps.
    lr = args.lr if args.lr is not None else (3e-3 if demo else 2e-4)
    max_steps = args.max_steps if args.max_steps is not None else (600 if demo else -1)
    data_path = args.data or str(demo_data_path())
    use_cuda = torch.cuda.is_available()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    logger.info("model %s, data %s, device %s", model_path, data_path, "cuda" if use_cuda else "cpu")

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_path, max_seq_length=args.max_seq_length, dtype=dtype, load_in_4bit=args.load_in_4bit
    )
    targets: Any = args.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    mode = {"true": True, "false": False}.get(args.gradient_checkpointing, args.gradient_checkpointing)
    model = FastLanguageModel.get_peft_model(
        model,
        r=args.r,
        target_modules=targets,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        bias=args.bias,
        use_gradient_checkpointing=mode,
        random_state=args.seed,
        max_seq_length=args.max_seq_length,
        use_rslora=args.use_rslora,
    )
    model.print_trainable_parameters()

    records = read_records(data_path)
    texts = [record_to_text(r, tokenizer, args.text_field, args.messages_field) for r in records]
    rows = tokenize(texts, tokenizer, args.max_seq_length, args.packing)
    if not rows:
        raise ValueError(f"{data_path}: no training rows (packing needs at least --max-seq-length tokens)")
    logger.info("%d records -> %d training rows", len(records), len(rows))

    out = Path(args.output_dir)
    bf16 = use_cuda and torch.cuda.is_bf16_supported()
    targs = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=lr,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        num_train_epochs=args.epochs,
        max_steps=max_steps,
        optim=args.optim,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        save_total_limit=2,
        seed=args.seed,
        bf16=bf16,
        fp16=use_cuda and not bf16,
        use_cpu=not use_cuda,
        report_to=[],
        remove_unused_columns=False,
        include_num_input_tokens_seen=True,
        dataloader_pin_memory=use_cuda,
        # Only LoRA weights train and every one is used each step; Trainer would otherwise turn on
        # find_unused_parameters for a non-PreTrainedModel, which breaks reentrant checkpointing.
        ddp_find_unused_parameters=False,
    )
    trainer = _make_trainer_class()(
        model=model, args=targs, train_dataset=rows, data_collator=PadCollator(tokenizer.pad_token_id)
    )
    adapter_dir = out / "adapter"
    interrupted = False
    previous = signal.getsignal(signal.SIGINT)
    try:
        trainer.train(resume_from_checkpoint=True if args.resume else None)
    except KeyboardInterrupt:
        interrupted = True
        logger.warning("interrupted: saving the adapter to %s before exiting", adapter_dir)
    finally:
        signal.signal(signal.SIGINT, previous)
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary: dict[str, Any] = {"adapter": str(adapter_dir), "losses": losses, "interrupted": interrupted}
    if losses:
        logger.info("loss: first %.4f -> last %.4f", losses[0], losses[-1])
    if interrupted:
        return summary

    if args.save_merged == "merged_16bit":
        merged_dir = out / "merged_16bit"
        model.save_pretrained_merged(str(merged_dir), tokenizer, save_method="merged_16bit")
        summary["merged"] = str(merged_dir)
        logger.info("merged 16-bit model written to %s", merged_dir)

    # Reload the saved adapter on a fresh base and generate, proving the files are complete.
    base, tok2 = FastLanguageModel.from_pretrained(
        model_path, max_seq_length=args.max_seq_length, dtype=dtype, load_in_4bit=args.load_in_4bit
    )
    reloaded = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    reloaded.eval()
    prompt = (
        args.prompt
        or (records[0].get("instruction") if isinstance(records[0], dict) else None)
        or texts[0][:40]
    )
    if getattr(tok2, "chat_template", None):
        prompt_text = tok2.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        prompt_text = prompt
    enc = tok2(prompt_text, return_tensors="pt", add_special_tokens=False).to(
        next(reloaded.parameters()).device
    )
    with torch.no_grad():
        gen = reloaded.generate(
            **enc,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tok2.pad_token_id,
            eos_token_id=tok2.eos_token_id,
        )
    answer = tok2.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"\nprompt: {prompt}\nreloaded adapter generates: {answer.strip()}")
    summary.update(prompt=prompt, generation=answer)
    if losses and len(losses) > 1:
        print(
            f"loss fell from {losses[0]:.4f} to {losses[-1]:.4f} over {trainer.state.global_step} steps"
            if losses[-1] < losses[0]
            else f"loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}"
        )
    if any(math.isnan(x) for x in losses):
        raise RuntimeError("training produced a NaN loss")
    return summary
