"""``rslora-fast finetune``: LoRA / QLoRA fine-tuning from one command, on HF ``Trainer``.

With no ``--model`` and no ``--data`` it runs the embedded demo (a small llama built locally and the
bundled dataset), shows the loss falling, saves the adapter, reloads it and generates.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from .errors import DataError, TrainingDivergedError, UsageError

logger = logging.getLogger("rslora_fast.finetune")

# One exit-code table for ``rslora-fast finetune`` (also in ``--help`` and docs/finetune-cli.md).
EXIT_OK = 0
EXIT_UNEXPECTED = 1  # a bug or an unforeseen failure: the traceback is printed
EXIT_USAGE = 2  # bad input or usage: data file, model path, flags, a locked --output-dir
EXIT_DIVERGED = 3  # the loss or the adapter weights became NaN/Inf; adapter/ is left as it was
EXIT_SIGINT = 130  # Ctrl-C: the adapter trained so far is saved first
EXIT_SIGTERM = 143  # SIGTERM: handled like Ctrl-C

EXIT_CODES_HELP = """exit codes:
  0    training finished, adapter saved and reloaded
  1    unexpected error (traceback printed)
  2    bad input or usage: data file, model path, flags, --output-dir locked by another run
  3    training diverged (NaN/Inf loss or weights): adapter/ not overwritten, step named
  130  interrupted by Ctrl-C (SIGINT) after saving the adapter trained so far
  143  stopped by SIGTERM, handled like Ctrl-C"""

LOCK_NAME = ".rslora-fast.lock"


# ----------------------------------------------------------------------------- arguments


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``finetune`` arguments (LoRA options mirror ``get_peft_model``)."""
    p = parser or argparse.ArgumentParser(prog="rslora-fast finetune", description=__doc__.splitlines()[0])
    p.epilog = EXIT_CODES_HELP
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--model", default=None, help="local folder or hub id (default: the embedded demo model)")
    p.add_argument(
        "--data",
        default=None,
        help="JSONL/JSON/TXT/CSV/parquet file with text, messages/conversations, instruction/input/output "
        "or prompt/completion rows (default: bundled demo data)",
    )
    p.add_argument("--text-field", default=None, help="field holding plain text")
    p.add_argument(
        "--messages-field", default=None, help="field holding chat turns (role/content or from/value)"
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="chat template name (llama-3, chatml, gemma-3, qwen-2.5, mistral, phi-3, ...); "
        "default: the tokenizer's own, chatml when it has none",
    )
    p.add_argument(
        "--responses-only",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="loss on assistant turns / completions only (default: on for chat, alpaca and "
        "prompt/completion data, off for text)",
    )
    p.add_argument(
        "--txt-split",
        default="paragraph",
        choices=["paragraph", "line"],
        help="a .txt/.md file gives one row per blank-line paragraph, or per non-empty line",
    )
    p.add_argument(
        "--nan-policy",
        default="stop",
        choices=["stop", "skip"],
        help="on a NaN/Inf loss: stop (exit 3), or skip the step's gradients (stop after 10 in a row)",
    )
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
    p.add_argument(
        "--resume",
        action="store_true",
        help="resume from the newest complete checkpoint in --output-dir (half-written ones are skipped)",
    )
    p.add_argument(
        "--save-merged", default=None, choices=["merged_16bit", "lora"], help="also export a merged model"
    )
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument(
        "--prompt",
        default=None,
        help="prompt to generate from after training (chat data: through the chat template); default: the first row's prompt",
    )
    p.add_argument("--max-new-tokens", type=int, default=24)
    return p


# ----------------------------------------------------------------------------- batching


class PadCollator:
    """Pads a batch to its longest row; labels are the rows' ``labels`` (else their inputs), -100 on padding."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows):
        import torch

        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        labels = torch.full((len(rows), n), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"])
            mask[i, :k] = 1
            labels[i, :k] = torch.tensor(r.get("labels", r["input_ids"]))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------- training


MAX_SKIPPED_STEPS = 10  # --nan-policy skip: this many non-finite steps in a row count as divergence


def _nonfinite_params(model) -> list[str]:
    """Names of trainable parameters holding NaN or Inf (one device sync when all are finite)."""
    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(p).all().to(named[0][1].device) for _, p in named])
    if bool(finite.all()):
        return []
    return [n for (n, _), ok in zip(named, finite.tolist()) if not ok]


def _make_trainer_class():
    from transformers import Trainer, TrainerCallback

    class FiniteWeights(TrainerCallback):
        """After every optimizer step, before any checkpoint save: the adapter must be finite."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            bad = _nonfinite_params(model) if model is not None else []
            if bad:
                raise TrainingDivergedError(
                    f"adapter weights became non-finite at step {state.global_step} "
                    f"({len(bad)} tensors, e.g. {bad[0]})",
                    step=state.global_step,
                )
            return control

    class FinetuneTrainer(Trainer):
        """Adds tokens/s and GPU memory to every log line, and stops on a NaN/Inf loss.

        The raw loss of every micro-batch is checked (Trainer's ``logging_nan_inf_filter`` hides NaN
        from the logged loss), and :class:`FiniteWeights` checks the adapter after each step.
        """

        _last: tuple[float, int] | None = None
        nan_policy = "stop"
        _skipped = 0

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.add_callback(FiniteWeights())

        def training_step(self, model, inputs, *args: Any, **kwargs: Any):
            import torch

            loss = super().training_step(model, inputs, *args, **kwargs)
            if bool(torch.isfinite(loss).all()):
                self._skipped = 0
                return loss
            step = self.state.global_step + 1
            if self.nan_policy != "skip" or self._skipped + 1 >= MAX_SKIPPED_STEPS:
                raise TrainingDivergedError(f"loss became {loss.item()} at step {step}", step=step)
            self._skipped += 1
            logger.warning("non-finite loss at step %d: dropping this step's gradients", step)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.zero_()
            return torch.zeros_like(loss)

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


# ----------------------------------------------------------------------------- run safety


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived during training (``signum`` says which)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopSignals:
    """Turns SIGINT and SIGTERM into :class:`TrainingInterrupted` while training (main thread only)."""

    def __enter__(self) -> _StopSignals:
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame) -> None:
        raise TrainingInterrupted(signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class OutputDirLock:
    """``<output-dir>/.rslora-fast.lock`` holding our pid: one run per output dir.

    A lock whose pid is no longer running is stale and taken over (with a log line).
    """

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_NAME

    def __enter__(self) -> OutputDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = self._holder()
                if pid is not None and pid != os.getpid() and _pid_alive(pid):
                    raise UsageError(
                        f"--output-dir {self.path.parent} is in use by another run (lock {self.path}, pid {pid})",
                        hint="wait for that run, pass another --output-dir, or delete the lock if that pid is not a finetune run",
                    ) from None
                logger.warning("taking over stale lock %s (pid %s is not running)", self.path, pid)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            return self
        raise UsageError(f"cannot take the lock {self.path}", hint="delete it if no run uses --output-dir")

    def _holder(self) -> int | None:
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None  # unreadable or half-written: treated as stale

    def __exit__(self, *exc: Any) -> None:
        if self._holder() == os.getpid():
            self.path.unlink(missing_ok=True)


CHECKPOINT_FILES = (
    "trainer_state.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
)


def latest_complete_checkpoint(out: Path) -> Path | None:
    """The newest ``checkpoint-N`` holding every file a resume needs, skipping half-written ones."""
    found = []
    for d in out.glob("checkpoint-*"):
        suffix = d.name.rsplit("-", 1)[-1]
        if d.is_dir() and suffix.isdigit():
            found.append((int(suffix), d))
    for _, d in sorted(found, reverse=True):
        missing = [f for f in CHECKPOINT_FILES if not (d / f).is_file()]
        if not missing:
            try:
                json.loads((d / "trainer_state.json").read_text())
                return d
            except (OSError, ValueError):
                missing = ["a readable trainer_state.json"]
        logger.warning("skipping incomplete checkpoint %s (missing %s)", d, ", ".join(missing))
    return None


# ----------------------------------------------------------------------------- run


def prepare_data(args: argparse.Namespace, data_path: str, records, tokenizer):
    """Render, check and tokenize the rows read from ``data_path``; everything that can fail does so
    here, before the model loads. Returns ``(format, examples, rows)``."""
    from .chat_templates import get_chat_template
    from .data_formats import describe, render_all, tokenize_examples, untrained_rows

    if args.chat_template or not getattr(tokenizer, "chat_template", None):
        get_chat_template(tokenizer, args.chat_template)  # a name wins; else fill the gap only
    fmt, examples = render_all(records, tokenizer, args.text_field, args.messages_field)
    responses_only = args.responses_only if args.responses_only is not None else fmt != "text"
    rows = tokenize_examples(examples, tokenizer, args.max_seq_length, args.packing, responses_only)
    if not rows:
        raise DataError(
            f"{data_path}: {len(examples)} rows hold fewer than --max-seq-length {args.max_seq_length} "
            "tokens in all, so packing makes no row; lower --max-seq-length or drop --packing"
        )
    empty = untrained_rows(rows)
    if len(empty) == len(rows):
        raise DataError(
            f"{data_path}: no row keeps a trained token within --max-seq-length {args.max_seq_length}; "
            "raise it or pass --no-responses-only"
        )
    if empty:
        shown = ", ".join(str(i + 1) for i in empty[:20]) + (" ..." if len(empty) > 20 else "")
        logger.warning(
            "%d of %d rows have no trained token after truncation (rows %s)", len(empty), len(rows), shown
        )
    print(describe(examples[0], fmt, rows, responses_only), flush=True)
    return fmt, examples, rows


def _sample_prompt(args, fmt: str, examples, tokenizer) -> tuple[str, str]:
    """``(shown prompt, prompt text to tokenize)``: the first row's prompt part, templated once."""
    if args.prompt is None:
        return examples[0].prompt, examples[0].prompt
    if fmt in ("chat", "alpaca"):
        msgs = [{"role": "user", "content": args.prompt}]
        return args.prompt, tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return args.prompt, (tokenizer.bos_token or "") + args.prompt


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one fine-tune as described by ``args``; returns a summary dict (losses, paths, exit_code)."""
    from .data_formats import read_records
    from .demo_model import build_demo_model, demo_data_path
    from .loading import _load_tokenizer, _resolve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    demo = args.model is None
    data_path = args.data or str(demo_data_path())
    records = read_records(data_path, txt_split=args.txt_split)  # file-level checks before anything loads
    model_path = args.model or str(build_demo_model())
    tokenizer = _load_tokenizer(_resolve(model_path, None, None, None), None, False)
    fmt, examples, rows = prepare_data(args, data_path, records, tokenizer)
    out = Path(args.output_dir)
    with OutputDirLock(out):
        return _train(args, demo, model_path, tokenizer, fmt, examples, rows, out)


def _load_base(args, model_path, dtype):
    """The base model as ``--max-seq-length`` / ``--load-in-4bit`` ask (training, and the reload check)."""
    from . import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_path, max_seq_length=args.max_seq_length, dtype=dtype, load_in_4bit=args.load_in_4bit
    )
    return model


def _train(args, demo, model_path, tokenizer, fmt, examples, rows, out: Path) -> dict[str, Any]:
    import torch
    from transformers import TrainingArguments

    from . import FastLanguageModel

    # The demo's base is random, so it needs a livelier learning rate and a fixed number of steps.
    lr = args.lr if args.lr is not None else (3e-3 if demo else 2e-4)
    max_steps = args.max_steps if args.max_steps is not None else (600 if demo else -1)
    use_cuda = torch.cuda.is_available()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    logger.info("model %s, data %s rows, device %s", model_path, len(rows), "cuda" if use_cuda else "cpu")
    resume = latest_complete_checkpoint(out) if args.resume else None
    if args.resume and resume is None:
        logger.warning("--resume: no complete checkpoint in %s; starting from step 0", out)

    model = _load_base(args, model_path, dtype)
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
    trainer.nan_policy = args.nan_policy
    adapter_dir = out / "adapter"
    interrupted: int | None = None
    try:
        with _StopSignals():
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except TrainingInterrupted as exc:
        interrupted = exc.signum
        logger.warning("%s: saving the adapter to %s before exiting", exc, adapter_dir)
    except TrainingDivergedError as exc:
        raise _diverged(exc, out) from None
    bad = _nonfinite_params(model)
    if bad:
        raise _diverged(
            TrainingDivergedError(f"{len(bad)} adapter tensors are non-finite", trainer.state.global_step),
            out,
        )
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary: dict[str, Any] = {
        "adapter": str(adapter_dir),
        "losses": losses,
        "interrupted": interrupted is not None,
    }
    if losses:
        logger.info("loss: first %.4f -> last %.4f", losses[0], losses[-1])
    if interrupted is not None:
        summary["exit_code"] = EXIT_SIGTERM if interrupted == signal.SIGTERM else EXIT_SIGINT
        return summary

    if args.save_merged == "merged_16bit":
        merged_dir = out / "merged_16bit"
        model.save_pretrained_merged(str(merged_dir), tokenizer, save_method="merged_16bit")
        summary["merged"] = str(merged_dir)
        logger.info("merged 16-bit model written to %s", merged_dir)

    summary.update(_generate_sample(args, model_path, dtype, adapter_dir, tokenizer, fmt, examples))
    if len(losses) > 1:
        print(
            f"loss fell from {losses[0]:.4f} to {losses[-1]:.4f} over {trainer.state.global_step} steps"
            if losses[-1] < losses[0]
            else f"loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}"
        )
    summary["exit_code"] = EXIT_OK
    return summary


def _diverged(exc: TrainingDivergedError, out: Path) -> TrainingDivergedError:
    """The error to report: which step, and that adapter/ and the checkpoints are untouched."""
    good = latest_complete_checkpoint(out)
    where = f"last complete checkpoint: {good}" if good else "no checkpoint was saved before it"
    msg = f"training diverged at step {exc.step}: {exc}; {out / 'adapter'} was not overwritten; {where}"
    err = TrainingDivergedError(msg, step=exc.step)
    err.hint = "lower --lr, use --dtype bfloat16/float32, or try --nan-policy skip"  # type: ignore[attr-defined]
    return err


def _generate_sample(args, model_path, dtype, adapter_dir, tokenizer, fmt, examples) -> dict[str, Any]:
    """Reload the saved adapter on a fresh base and generate, proving the files are complete."""
    import torch

    from . import PeftModel

    base = _load_base(args, model_path, dtype)
    reloaded = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    reloaded.eval()
    shown, prompt_text = _sample_prompt(args, fmt, examples, tokenizer)
    enc = tokenizer(prompt_text, return_tensors="pt", add_special_tokens=False).to(
        next(reloaded.parameters()).device
    )
    with torch.no_grad():
        gen = reloaded.generate(
            **enc,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    answer = tokenizer.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"\nprompt: {shown}\nreloaded adapter generates: {answer.strip()}")
    return {"prompt": shown, "prompt_text": prompt_text, "generation": answer}
