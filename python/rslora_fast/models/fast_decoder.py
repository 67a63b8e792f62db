"""The fast decoder-layer path for llama-family models (llama, mistral, qwen2, qwen3), gemma, gemma 2,
gemma 3 (text) and phi-3.

``install_fast_decoder(model)`` switches, per module instance, what the generic transformers code
does with many small kernels to our fused ones, keeping the module tree, the parameters and the
checkpointing wrappers exactly as they are:

* RMSNorm modules (``input_layernorm``, ``post_attention_layernorm``, gemma 2/3's
  ``pre_feedforward_layernorm``/``post_feedforward_layernorm``, the final norm, Qwen3's and Gemma 3's
  per-head ``q_norm``/``k_norm``) run :func:`rslora_fast.ops.rms_norm.rms_norm`: one kernel each
  way instead of cast / pow / mean / rsqrt / multiply / cast / multiply.
* Attention modules compute q, k, v through :func:`rslora_fast.ops.lora_linear.lora_linears` (one
  autograd node for the three projections of the same input: their input gradients are summed in
  one buffer; Phi-3's fused ``qkv_proj`` is one projection whose output is split) and rotate q and k
  in place with :func:`rslora_fast.ops.rope.apply_rope_` (one launch for both, instead of slice /
  negate / concatenate / multiply / add per tensor; a partial rotary factor rotates the leading
  part of each head). The attention itself stays transformers' (SDPA, flash, flex, eager: whatever
  the config selects, called with the same arguments, so Gemma 2's attention-logit soft-capping and
  the sliding windows are what transformers makes of them), as do the masks, the per-layer-type
  rotary tables of Gemma 3 and the KV cache, so ``generate`` works unchanged.
* MLP modules run the fused SwiGLU (GeGLU for the gemmas) forward of :mod:`rslora_fast.models.fast_mlp`.
* Decoder layers of llama, mistral, qwen2, qwen3 and gemma run transformers' own layer forward
  with one change: ``h = residual + attn_out; normed = post_attention_layernorm(h)`` is one op,
  :func:`rslora_fast.ops.rms_norm.add_rms_norm` (one kernel each way instead of an add and a norm);
  gemma 2 and gemma 3 layers likewise fuse ``h = residual + post_attention_layernorm(attn_out);
  pre_feedforward_layernorm(h)``. The layer's signature and output are transformers', so
  checkpointing, offload (which wraps whole layers) and hooks on the layer see no difference; a
  hooked norm or tensors the fused op does not take (mixed dtypes) run the add and the norm module
  as before. Phi-3 (dropouts around its adds) keeps its own layer.

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
from ..ops.rms_norm import add_rms_norm, rms_norm
from ..ops.rope import apply_rope_, rotate_half
from . import fast_mlp

logger = logging.getLogger(__name__)

ATTENTION_CLASSES = (
    "LlamaAttention",
    "MistralAttention",
    "Qwen2Attention",
    "Qwen3Attention",
    "GemmaAttention",
    "Gemma2Attention",
    "Gemma3Attention",
    "Phi3Attention",
)
RMSNORM_CLASSES = (
    "LlamaRMSNorm",
    "MistralRMSNorm",
    "Qwen2RMSNorm",
    "Qwen3RMSNorm",
    "GemmaRMSNorm",
    "Gemma2RMSNorm",
    "Gemma3RMSNorm",
    "Phi3RMSNorm",
)
# Gemma normalizes as x_hat * (1 + w) in float32 with one rounding (our op's gemma=True) and names
# its epsilon `eps`; the llama family rounds x_hat first and names it `variance_epsilon`.
_GEMMA_NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")
# What each attention class passes to the attention function besides q/k/v/mask/dropout/scaling,
# exactly as its transformers forward does: the window from the config (Mistral, Phi-3) or the
# module (per layer type: Gemma 2/3, Qwen2), and Gemma 2's attention-logit soft-capping (Gemma 3
# stores `attn_logit_softcapping` but does not pass it).
_CONFIG_WINDOW = ("MistralAttention", "Phi3Attention")
_SOFTCAP = ("Gemma2Attention",)


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


def _in_place_ok(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return (
        x.dtype == cos.dtype == sin.dtype
        and x.device == cos.device
        and x.stride(-1) == 1
        and cos.dim() == 3
        and cos.shape == sin.shape
        and not cos.requires_grad
        and not sin.requires_grad
    )


def _rotate_out_of_place(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for one tensor (c/s unsqueezed over heads); a partial
    rotary table rotates the leading ``c.shape[-1]`` features and passes the rest through."""
    rd = c.shape[-1]
    if rd == x.shape[-1]:
        return x * c + rotate_half(x) * s
    xr = x[..., :rd]
    return torch.cat((xr * c + rotate_half(xr) * s, x[..., rd:]), dim=-1)


def _rotate(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, in_place: bool = True
):
    """q and k rotated by cos/sin (in place when possible). ``k=None``: q holds the query and key
    heads together (Phi-3's fused projection) and is rotated alone; returns ``(q, None)``."""
    rd = cos.shape[-1]
    both = (q,) if k is None else (q, k)
    if in_place and all(_in_place_ok(t, cos, sin) for t in both) and rd <= q.shape[-1]:
        # a partial rotary table rotates the leading rd features of each head: the slices are views,
        # so rotating them in place rotates q and k
        qr = q if rd == q.shape[-1] else q[..., :rd]
        if k is None:
            kr = qr.new_empty((qr.shape[0], 0, *qr.shape[2:]))  # no separate key heads
        else:
            kr = k if rd == k.shape[-1] else k[..., :rd]
        apply_rope_(qr, kr, cos, sin)
        return q, k
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return _rotate_out_of_place(q, c, s), None if k is None else _rotate_out_of_place(k, c, s)


def _project_and_rotate(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k, v as ``[batch, heads, seq, head_dim]`` with q and k rotated (and normalized per head
    first where the model has ``q_norm``/``k_norm``: Qwen3, Gemma 3)."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    norms = (getattr(self, "q_norm", None), getattr(self, "k_norm", None))
    if getattr(self, "qkv_proj", None) is not None:  # Phi-3: one projection, split after
        (qkv,) = lora_linears(hidden_states, (self.qkv_proj,))
        nq = self.config.num_attention_heads * self.head_dim
        nk = self.num_key_value_heads * self.head_dim
        qk = qkv[..., : nq + nk].view(hidden_shape).transpose(1, 2)
        qk, _ = _rotate(qk, None, cos, sin, in_place=not _has_backward_hooks(self.qkv_proj))
        v = qkv[..., nq + nk :].view(hidden_shape).transpose(1, 2)
        heads = self.config.num_attention_heads
        return qk[:, :heads], qk[:, heads:], v
    q, k, v = lora_linears(hidden_states, (self.q_proj, self.k_proj, self.v_proj))
    q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape)
    if norms[0] is not None:  # RMSNorm over each head before rotation
        q, k = norms[0](q), norms[1](k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    hooked = _has_backward_hooks(self.q_proj, self.k_proj, *norms)
    q, k = _rotate(q, k, cos, sin, in_place=not hooked)
    return q, k, v


def _attention_extra(self) -> dict[str, Any]:
    """The arguments besides q/k/v that this class's transformers forward gives the attention."""
    name = type(self).__name__
    extra: dict[str, Any] = {}
    if name in _CONFIG_WINDOW:
        extra["sliding_window"] = getattr(self.config, "sliding_window", None)
    elif hasattr(self, "sliding_window"):
        extra["sliding_window"] = self.sliding_window
    if name in _SOFTCAP:
        extra["softcap"] = self.attn_logit_softcapping
    return extra


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
    cos, sin = position_embeddings
    q, k, v = _project_and_rotate(self, hidden_states, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    eager = sys.modules[type(self).__module__].eager_attention_forward
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
    out, weights = attention(
        self,
        q,
        k,
        v,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **_attention_extra(self),
        **kwargs,
    )
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


def _attention_why_not(module: nn.Module) -> str | None:
    name = type(module).__name__
    if name not in ATTENTION_CLASSES:
        return f"{name} is not a supported attention"
    fused = ("qkv_proj", "o_proj")  # Phi-3
    if not all(
        isinstance(getattr(module, p, None), nn.Module) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    ) and not all(isinstance(getattr(module, p, None), nn.Module) for p in fused):
        return f"{name} lacks q/k/v/o (or qkv/o) projections"
    if isinstance(getattr(module, "qkv_proj", None), nn.Module) and not isinstance(
        getattr(module, "num_key_value_heads", None), int
    ):
        return f"{name} has qkv_proj but no num_key_value_heads (unknown transformers layout)"
    if (
        isinstance(getattr(module, "qkv_proj", None), nn.Module)
        and getattr(module, "q_norm", None) is not None
    ):
        return f"{name} has qkv_proj and q_norm (a layout the fused-projection path does not cover)"
    if name in _SOFTCAP and not hasattr(module, "attn_logit_softcapping"):
        return f"{name} has no attn_logit_softcapping (unknown transformers layout)"
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


# ---------------------------------------------------------------------------- decoder layer
# The attributes each class's transformers forward reads (its bytecode's global and attribute
# names): a release whose layer reads anything else (a dropout, another norm) keeps its forward.
_LAYER_NAMES = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_SANDWICH_NAMES = (  # gemma 2/3: a norm on each side of attention and of the MLP
    "input_layernorm",
    "self_attn",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "mlp",
    "post_feedforward_layernorm",
)
_LAYER_LAYOUT = {
    "LlamaDecoderLayer": _LAYER_NAMES,
    "MistralDecoderLayer": _LAYER_NAMES,
    "Qwen2DecoderLayer": _LAYER_NAMES,
    "Qwen3DecoderLayer": _LAYER_NAMES,
    "GemmaDecoderLayer": _LAYER_NAMES,
    "Gemma2DecoderLayer": _SANDWICH_NAMES,
    "Gemma3DecoderLayer": _SANDWICH_NAMES,
}
DECODER_LAYER_CLASSES = tuple(_LAYER_LAYOUT)
# Set on a layer while its fused forward is active. Offload wraps whole layers after we patch
# them and may hand our forward back after uninstall; without the flag it runs the class forward.
_LAYER_FLAG = "_rslora_fused_add_norm"


def _fast_decoder_layer_forward(
    self,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values: Any = None,
    use_cache: bool | None = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' llama-family layer forward with the post-attention add and norm fused."""
    kwargs.update(
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
    )
    if not self.__dict__.get(_LAYER_FLAG):
        return type(self).forward(self, hidden_states, **kwargs)
    residual = hidden_states
    hidden_states = _attention(self, hidden_states, kwargs)
    residual, hidden_states = _add_and_norm(self.post_attention_layernorm, hidden_states, residual)
    return residual + self.mlp(hidden_states)


def _fast_sandwich_layer_forward(
    self,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' gemma 2/3 layer forward with the post-attention add and the pre-MLP norm fused."""
    kwargs.update(
        position_embeddings=position_embeddings,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
    )
    if not self.__dict__.get(_LAYER_FLAG):
        return type(self).forward(self, hidden_states, **kwargs)
    residual = hidden_states
    attn = self.post_attention_layernorm(_attention(self, hidden_states, kwargs))
    residual, hidden_states = _add_and_norm(self.pre_feedforward_layernorm, attn, residual)
    return residual + self.post_feedforward_layernorm(self.mlp(hidden_states))


def _attention(self, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The layer's self-attention on its normed input (the attention weights are dropped)."""
    hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    return hidden_states


def _add_and_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor):
    """``(residual + x, norm(residual + x))``, as one op when ``norm`` runs our RMSNorm, unhooked,
    on tensors of its weight's dtype and device."""
    w = getattr(norm, "weight", None)
    if (
        _ours(norm)
        and not _has_hooks(norm)
        and x.shape == residual.shape
        and x.dtype == residual.dtype == w.dtype
        and x.device == residual.device == w.device
    ):
        return add_rms_norm(x, residual, w, _norm_eps(norm), gemma=type(norm).__name__ in _GEMMA_NORMS)
    s = residual + x
    return s, norm(s)


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run any hook (its own or a global one)."""
    g = nn.modules.module
    if g._global_forward_hooks or g._global_forward_pre_hooks or _has_backward_hooks(module):
        return True
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _layer_why_not(module: nn.Module) -> str | None:
    name = type(module).__name__
    layout = _LAYER_LAYOUT.get(name)
    if layout is None:
        return f"{name} is not a supported decoder layer"
    code = getattr(type(module).forward, "__code__", None)
    if code is None or tuple(code.co_names) != layout:
        return f"{name}.forward is not the layer this path was written for (another transformers release)"
    if not all(isinstance(getattr(module, a, None), nn.Module) for a in layout):
        return f"{name} lacks {', '.join(layout)}"
    fused_norm = "post_attention_layernorm" if layout is _LAYER_NAMES else "pre_feedforward_layernorm"
    return _rms_norm_why_not(getattr(module, fused_norm))


# ---------------------------------------------------------------------------- install / remove
_KINDS = (
    ("attention", _attention_why_not, _fast_attention_forward, lambda n: n.endswith("Attention")),
    ("RMSNorm", _rms_norm_why_not, _fast_rms_norm_forward, lambda n: n.endswith("RMSNorm")),
    ("MLP", fast_mlp._why_not, fast_mlp._fused_forward, lambda n: n.endswith("MLP")),
    # only the named families' layers: the others (phi-3, ...) are not missing a fusion
    (
        "decoder layer",
        _layer_why_not,
        _fast_decoder_layer_forward,
        lambda n: _LAYER_LAYOUT.get(n) is _LAYER_NAMES,
    ),
    (
        "decoder layer",
        _layer_why_not,
        _fast_sandwich_layer_forward,
        lambda n: _LAYER_LAYOUT.get(n) is _SANDWICH_NAMES,
    ),
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
                module.__dict__[_LAYER_FLAG] = True
                continue
            # someone else's per-instance forward (accelerate's device-map hooks, a profiler) stays
            reason = "has a patched forward" if "forward" in module.__dict__ else why_not(module)
            if reason is None:
                # a partial (not a bound method) so the model still pickles; deepcopy rebinds it
                module.forward = functools.partial(forward, module)
                module.__dict__[_LAYER_FLAG] = True  # read by the decoder layer's forward only
                counts[kind] += 1
            else:
                skipped[reason] += 1
    if any(counts.values()) or skipped:
        done = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        rest = "; ".join(f"{n} x {r}" for r, n in skipped.items()) or "none"
        logger.info("fast path: %s modules use fused kernels; generic path: %s", done, rest)
    _warn_if_softcap_ignored(model)
    return counts


def _warn_if_softcap_ignored(model: nn.Module) -> None:
    """SDPA has no score soft-capping: transformers passes Gemma 2's cap to it and it is dropped
    (in transformers' own forward too). Say so, since the model then trains without it."""
    for module in model.modules():
        cap = getattr(module, "attn_logit_softcapping", None)
        impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if type(module).__name__ in _SOFTCAP and cap is not None and "sdpa" in str(impl):
            logger.warning(
                "attn_logit_softcapping=%s is not applied: attn_implementation=%r cannot soft-cap "
                "attention scores (transformers ignores it the same way); load the model with "
                "attn_implementation='eager' (or 'flex_attention') to train with it",
                cap,
                impl,
            )
            return


_FAST_FORWARDS = {forward for _, _, forward, _ in _KINDS}


def _ours(module: nn.Module) -> bool:
    f = module.__dict__.get("forward")
    return isinstance(f, functools.partial) and f.func in _FAST_FORWARDS and f.args[:1] == (module,)


def uninstall_fast_decoder(model: nn.Module) -> None:
    """Restore the class ``forward`` of every module switched by :func:`install_fast_decoder`
    (a per-instance forward installed by anyone else is left alone; a fused layer forward that
    offload wrapped stays inside the wrapper but runs the class forward from now on)."""
    for module in model.modules():
        module.__dict__.pop(_LAYER_FLAG, None)
        if _ours(module):
            del module.__dict__["forward"]
