"""The Unsloth peer of the benches, run in its own process from the peer wheels.

    python benches/peers.py train --bench-module PATH <worker flags>     (from benches/train_step.py)
    python benches/peers.py generate --bench-module PATH <worker flags>  (from benches/generate.py)

The harness that starts this process puts the installed peer wheels first on PYTHONPATH. Unsloth
patches transformers and peft when it is imported, so it is imported here before anything else;
the harness module (``rslora_fast/bench.py`` or ``benches/generate.py``) is then loaded from its
file, without importing the rslora_fast package, and measures the model this module loads (with the
protocol's LoRA keywords, from ``rslora_fast/bench.py`` loaded the same way).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

# This folder's kernels.py would shadow the PyPI package `kernels` that Unsloth and bitsandbytes probe.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _parts(system: str) -> tuple[str, str]:
    """(base, checkpointing) of ``unsloth:base[:checkpointing]``."""
    parts = system.split(":") + ["", ""]
    return parts[1] or "4bit", parts[2] or "unsloth"


def load_model(system: str, model_dir, seq_len: int, lora_r: int):
    """Unsloth's own loader and get_peft_model with the protocol's LoRA; returns the model for training."""
    import torch
    from unsloth import FastLanguageModel

    base, mode = _parts(system)
    four_bit = base == "4bit"
    model, _ = FastLanguageModel.from_pretrained(
        str(model_dir),
        max_seq_length=seq_len,
        dtype=torch.bfloat16,
        load_in_4bit=four_bit,
        load_in_16bit=not four_bit,
        fix_tokenizer=False,  # the checkpoint's stand-in tokenizer is not a real Llama-3 one
    )
    model = FastLanguageModel.get_peft_model(model, **_bench().protocol_lora(lora_r, mode, seq_len))
    FastLanguageModel.for_training(model)
    return model


def for_inference(model):
    from unsloth import FastLanguageModel

    FastLanguageModel.for_inference(model)
    return model


def version() -> str:
    import unsloth

    return f"unsloth {unsloth.__version__}"


def _load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


@functools.cache
def _bench():
    """``rslora_fast/bench.py`` (the protocol's LoRA keywords), loaded once from its file like the
    harness, so this process never imports the rslora_fast package."""
    package = importlib.util.find_spec("rslora_fast")  # finds the package without importing it
    if package is None or package.origin is None:
        raise RuntimeError(
            "benches/peers.py: rslora_fast is not on sys.path, so its bench.py cannot be found"
        )
    return _load_module(os.path.join(os.path.dirname(package.origin), "bench.py"), "peer_protocol")


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] not in ("train", "generate") or argv[1] != "--bench-module":
        print(__doc__, file=sys.stderr)
        return 2
    import unsloth  # noqa: F401  (first: it patches transformers and peft as it is imported)

    harness = _load_module(argv[2], "peer_harness")
    return harness.main(argv[3:], loaders={"unsloth": sys.modules[__name__]})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
