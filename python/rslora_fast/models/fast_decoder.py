"""The fast decoder-layer path for llama-family models (llama, mistral, qwen2, qwen3) and gemma.

``install_fast_decoder(model)`` switches, per module instance, what the generic transformers code
does with many small kernels to our fused ones, keeping the module tree, the parameters and the
checkpointing wrappers exactly as they are:

* RMSNorm modules (``input_layernorm``, ``post_attention_layernorm``, the final norm, Qwen3's
  per-head ``q_norm``/``k_norm``) run :func:`rslora_fast.ops.rms_norm.rms_norm`: one kernel each
  way instead of cast / pow / mean / rsqrt / multiply / cast / multiply.
* Attention modules compute q, k, v through :func:`rslora_fast.ops.lora_linear.lora_linears` (one
  autograd node for the three projections of the same input: their input gradients are summed in
  one buffer) and rotate q and k in place with :func:`rslora_fast.ops.rope.apply_rope_` (one
  launch for both, instead of slice / negate / concatenate / multiply / add per tensor). The
  attention itself stays transformers' (SDPA, flash, eager: whatever the config selects), as does
  the KV cache, so ``generate`` works unchanged.
* MLP modules run the fused SwiGLU (GeGLU for gemma) forward of :mod:`rslora_fast.models.fast_mlp`.

Installed by ``get_peft_model`` (after the adapters are injected) and removed by ``unload`` /
``merge_and_unload``. A module that does not qualify keeps its generic forward; one log line gives
the counts and the reasons.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections import Counter
from typing import Any

import torch
from torch import nn

from ..ops.lora_linear import lora_linears
from ..ops.rms_norm import rms_norm
from ..ops.rope import apply_rope_, rotate_half
from . import fast_mlp

logger = logging.getLogger(__name__)

ATTENTION_CLASSES = (
    "LlamaAttention",
    "MistralAttention",
    "Qwen2Attention",
    "Qwen3Attention",
    "GemmaAttention",
)
RMSNORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "GemmaRMSNorm")
# Gemma normalizes as x_hat * (1 + w) in float32 with one rounding (our op's gemma=True) and names
# its epsilon `eps`; the llama family rounds x_hat first and names it `variance_epsilon`.
_GEMMA_NORMS = ("GemmaRMSNorm",)


def _norm_eps(module: nn.Module) -> float | None:
    eps = getattr(module, "eps" if type(module).__name__ in _GEMMA_NORMS else "variance_epsilon", None)
    return eps if isinstance(eps, float) else None


# ---------------------------------------------------------------------------- RMSNorm
def _fast_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if hidden_states.dtype != w.dtype or hidden_states.device != w.device:
        # transformers then returns the weight's dtype (an fp32 weight upcasts the output): keep
        # its exact behaviour rather than widen the kernel's contract.
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, w, _norm_eps(self), gemma=type(self).__name__ in _GEMMA_NORMS)


def _rms_norm_why_not(module: nn.Module) -> str | None:
    if type(module).__name__ not in RMSNORM_CLASSES:
        return f"{type(module).__name__} is not a supported RMSNorm"
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or _norm_eps(module) is None:
        return "RMSNorm without a 1-d weight and a float epsilon"
    return None


# ---------------------------------------------------------------------------- attention
def _has_backward_hooks(*modules: nn.Module | None) -> bool:
    """A module with a (full) backward hook returns its output through a hook node, and such an
    output's views may not be written in place: rotating q/k in place would then fail."""
    g = nn.modules.module
    if g._global_backward_hooks or g._global_backward_pre_hooks:
        return True
    return any(m is not None and (m._backward_hooks or m._backward_pre_hooks) for m in modules)


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, in_place: bool = True):
    ok = (
        in_place
        and q.dtype == k.dtype == cos.dtype == sin.dtype
        and q.device == cos.device
        and q.stride(-1) == 1
        and k.stride(-1) == 1
        and cos.dim() == 3
        and cos.shape == sin.shape
        and cos.shape[-1] == q.shape[-1]
        and not cos.requires_grad
        and not sin.requires_grad
    )
    if ok:
        return apply_rope_(q, k, cos, sin)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # transformers' apply_rotary_pos_emb, out of place
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s


def _fast_attention_forward(
    self,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    past_key_values: Any = None,
    **kwargs: Any,
):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = lora_linears(hidden_states, (self.q_proj, self.k_proj, self.v_proj))
    q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape)
    if getattr(self, "q_norm", None) is not None:  # Qwen3: RMSNorm over each head before rotation
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = position_embeddings
    hooked = _has_backward_hooks(
        self.q_proj, self.k_proj, getattr(self, "q_norm", None), getattr(self, "k_norm", None)
    )
    q, k = _rotate(q, k, cos, sin, in_place=not hooked)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    eager = sys.modules[type(self).__module__].eager_attention_forward
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
    extra = {}
    if type(self).__name__ == "MistralAttention":
        extra["sliding_window"] = getattr(self.config, "sliding_window", None)
    elif hasattr(self, "sliding_window"):
        extra["sliding_window"] = self.sliding_window
    out, weights = attention(
        self,
        q,
        k,
        v,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **extra,
        **kwargs,
    )
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


def _attention_why_not(module: nn.Module) -> str | None:
    name = type(module).__name__
    if name not in ATTENTION_CLASSES:
        return f"{name} is not a supported attention"
    if not all(
        isinstance(getattr(module, p, None), nn.Module) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    ):
        return f"{name} lacks q/k/v/o projections"
    if not hasattr(sys.modules.get(type(module).__module__), "eager_attention_forward"):
        return f"{name}'s module has no eager_attention_forward (unknown transformers layout)"
    for attr in ("head_dim", "scaling", "attention_dropout", "layer_idx", "config"):
        if not hasattr(module, attr):
            return f"{name} has no {attr} (unknown transformers layout)"
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return "this transformers version has no ALL_ATTENTION_FUNCTIONS.get_interface (older layout)"
    if "past_key_values" not in inspect.signature(type(module).forward).parameters:
        return f"{name}.forward takes no past_key_values (older transformers cache API)"
    return None


# ---------------------------------------------------------------------------- install / remove
_KINDS = (
    ("attention", _attention_why_not, _fast_attention_forward, lambda n: n.endswith("Attention")),
    ("RMSNorm", _rms_norm_why_not, _fast_rms_norm_forward, lambda n: n.endswith("RMSNorm")),
    ("MLP", fast_mlp._why_not, fast_mlp._fused_forward, lambda n: n.endswith("MLP")),
)


def install_fast_decoder(model: nn.Module) -> dict[str, int]:
    """Switch every supported attention, RMSNorm and MLP module of ``model`` to the fused path.

    Returns the number of modules switched per kind; logs one line with those counts and, for
    modules of those kinds left on the generic path, why.
    """
    counts: dict[str, int] = {kind: 0 for kind, *_ in _KINDS}
    skipped: Counter = Counter()
    for module in model.modules():
        name = type(module).__name__
        for kind, why_not, forward, looks_like in _KINDS:
            if not looks_like(name):
                continue
            if _ours(module):
                counts[kind] += 1  # installed already (a second get_peft_model on the same model)
                continue
            # someone else's per-instance forward (accelerate's device-map hooks, a profiler) stays
            reason = "has a patched forward" if "forward" in module.__dict__ else why_not(module)
            if reason is None:
                # a partial (not a bound method) so the model still pickles; deepcopy rebinds it
                module.forward = functools.partial(forward, module)
                counts[kind] += 1
            else:
                skipped[reason] += 1
    if any(counts.values()) or skipped:
        done = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        rest = "; ".join(f"{n} x {r}" for r, n in skipped.items()) or "none"
        logger.info("fast path: %s modules use fused kernels; generic path: %s", done, rest)
    return counts


_FAST_FORWARDS = {forward for _, _, forward, _ in _KINDS}


def _ours(module: nn.Module) -> bool:
    f = module.__dict__.get("forward")
    return isinstance(f, functools.partial) and f.func in _FAST_FORWARDS and f.args[:1] == (module,)


def uninstall_fast_decoder(model: nn.Module) -> None:
    """Restore the class ``forward`` of every module switched by :func:`install_fast_decoder`
    (a per-instance forward installed by anyone else is left alone)."""
    for module in model.modules():
        if _ours(module):
            del module.__dict__["forward"]
