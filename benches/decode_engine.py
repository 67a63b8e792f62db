"""Speed of the fast decode engine alone (no generate loop, no sampling): prefill and per-token step.

Builds a Llama-3-8B-shaped model with random weights on the GPU (bf16, or NF4 bases with
``--bits 4``), attaches LoRA r=16 on the seven projections, and for each batch size prefills a
random prompt and runs the captured step, feeding back the argmax. Prints the prefill time, tokens/s
and milliseconds per step (the second of two identical rounds, after the capture). The
weight bytes read per step over the step time gives the achieved bandwidth on the weights.

    python benches/decode_engine.py --bits 16 --batch 1 8
    python benches/decode_engine.py --bits 4 --batch 1 8 --prompt 512 --new 128

``--tiny`` runs a 2-layer model (on CPU when there is no GPU) to check the script itself.
"""

from __future__ import annotations

import argparse
import time

import torch


def _model(tiny: bool, bits: int, device: str):
    import transformers

    from rslora_fast import get_peft_model
    from rslora_fast.bench import SHAPES, TARGETS
    from rslora_fast.quant.linear4bit import Linear4bit

    shape = {k: v for k, v in SHAPES["tiny" if tiny else "llama-3-8b"].items() if k != "model_type"}
    cfg = transformers.LlamaConfig(**shape, tie_word_embeddings=False)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        base = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if bits == 4:
        for name, module in list(base.named_modules()):
            parent, _, leaf = name.rpartition(".")
            if leaf in TARGETS:
                setattr(base.get_submodule(parent), leaf, Linear4bit.from_linear(module))
    model = get_peft_model(base, r=16, lora_alpha=16, use_gradient_checkpointing=False)
    return model.eval(), cfg


def _weight_bytes(model) -> int:
    """Bytes the step reads from weights: every parameter and buffer but the embedding table."""
    embed = model.get_base_model().model.embed_tokens.weight
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t is not embed]
    return sum(t.numel() * t.element_size() for t in tensors)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(batch: int, model, vocab: int, prompt: int, new: int, device: str) -> None:
    from rslora_fast.generate.engine import FastEngine

    engine = FastEngine(model, batch, prompt + new)
    ids = torch.randint(0, vocab, (batch, prompt), device=device)
    mask = torch.ones_like(ids)
    for _ in range(2):  # the first round captures the graph
        _sync(device)
        t0 = time.perf_counter()
        tokens = engine.prefill(ids, mask).argmax(-1)
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(new - 1):
            tokens = engine.step(tokens).argmax(-1)
        _sync(device)
        t2 = time.perf_counter()
    step = (t2 - t1) / (new - 1)
    gbs = _weight_bytes(model) / step / 1e9
    print(
        f"batch {batch}: prefill {prompt} tokens {1e3 * (t1 - t0):.1f} ms; decode {batch / step:.1f} tok/s, "
        f"{1e3 * step:.2f} ms/step, {gbs:.0f} GB/s on the weights",
        flush=True,
    )
    engine.release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, choices=(4, 16), default=16)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg = _model(args.tiny or device == "cpu", args.bits, device)
    print(f"{args.bits}-bit {'tiny' if args.tiny else 'Llama-3-8B shape'} on {device}", flush=True)
    for batch in args.batch:
        run(batch, model, cfg.vocab_size, args.prompt, args.new, device)


if __name__ == "__main__":
    main()
