"""Fused SwiGLU MLP for llama-family decoder layers: ``down(swiglu(gate(x), up(x)))``.

transformers computes ``act_fn(gate_proj(x)) * up_proj(x)`` as separate kernels (SiLU, multiply, and
more in backward); :func:`rslora_fast.ops.swiglu` does it in one pass each way. The projections stay
whatever they are (``nn.Linear``, ``Linear4bit``, LoRA-wrapped); gate and up run as one fused LoRA
node (:func:`rslora_fast.ops.lora_linear.lora_linears`) when they qualify. Installed per MLP instance by
``get_peft_model`` and removed by ``unload`` / ``merge_and_unload``.
"""

from __future__ import annotations

import logging
import types
from collections import Counter

from torch import nn

from ..ops.lora_linear import lora_linears
from ..ops.swiglu import swiglu

logger = logging.getLogger(__name__)

SWIGLU_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
_SILU = ("silu", "swish")
_MARK = "_rslora_fast_mlp"


def _fused_forward(self, x):
    # gate and up share x: one autograd node, one input-gradient buffer (falls back to calling the
    # two projections when they cannot be fused).
    gate, up = lora_linears(x, [self.gate_proj, self.up_proj])
    return self.down_proj(swiglu(gate, up))


def _why_not(module: nn.Module) -> str | None:
    name = type(module).__name__
    if name not in SWIGLU_MLP_CLASSES:
        return f"{name} is not a supported SwiGLU MLP"
    if getattr(getattr(module, "config", None), "hidden_act", None) not in _SILU:
        return f"{name} activation is not SiLU"
    if not all(
        isinstance(getattr(module, p, None), nn.Module) for p in ("gate_proj", "up_proj", "down_proj")
    ):
        return f"{name} lacks gate/up/down projections"
    return None


def install_fast_mlp(model: nn.Module) -> int:
    """Switch every supported MLP of ``model`` to the fused SwiGLU forward; returns how many.

    Logs one line with the count and, for MLP-like modules left on the generic path, why.
    """
    fused, skipped = 0, Counter()
    for module in model.modules():
        if not type(module).__name__.endswith("MLP"):
            continue
        reason = _why_not(module)
        if reason is None:
            module.forward = types.MethodType(_fused_forward, module)
            setattr(module, _MARK, True)
            fused += 1
        else:
            skipped[reason] += 1
    if fused or skipped:
        rest = "; ".join(f"{n} x {r}" for r, n in skipped.items()) or "none"
        logger.info("fast path: %d MLP(s) use the fused SwiGLU kernel; generic path: %s", fused, rest)
    return fused


def uninstall_fast_mlp(model: nn.Module) -> None:
    """Restore the class ``forward`` of every MLP switched by :func:`install_fast_mlp`."""
    for module in model.modules():
        if module.__dict__.pop(_MARK, False):
            module.__dict__.pop("forward", None)
