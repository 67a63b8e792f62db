"""Training forward of a transformers causal LM whose loss never materializes the logits.

``fused_loss_forward(model, ...)`` runs the decoder (``model.model``) and computes the loss with
:func:`rslora_fast.ops.fused_ce.fused_linear_cross_entropy` on the frozen ``lm_head``. It applies when
training with ``labels`` and the head is a plain, frozen, bias-free ``nn.Linear`` with no logit
post-processing other than soft-capping (Gemma 2's ``final_logit_softcapping``, applied inside the
fused loss as ``cap * tanh(logits / cap)``); otherwise (e.g. Cohere's logit scaling) callers use the
model's own forward. The output
has ``logits=None`` (they are never computed), which is what training loops and HF ``Trainer`` need.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops.fused_ce import IGNORE_INDEX, fused_linear_cross_entropy

# kwargs that change what the head must produce: take the model's own path
_UNSUPPORTED_KWARGS = ("logits_to_keep", "num_logits_to_keep", "return_dict")
# config attributes that post-process logits in ways the fused loss does not (cohere and granite scaling, ...)
_LOGIT_POSTPROCESS = ("logit_scale", "output_multiplier_scale", "logits_scaling")
_SOFTCAP = "final_logit_softcapping"  # gemma 2 (and gemma 3 when set): done inside the fused loss


def _head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def fused_loss_supported(model: nn.Module, labels: Any, kwargs: dict) -> str | None:
    """``None`` when the fused loss can replace the model's forward, else the reason it cannot."""
    if labels is None or not model.training:
        return "not training with labels"
    if kwargs.get("return_dict") is False:
        return "return_dict=False asks for a tuple"
    if any(kwargs.get(k) not in (None, 0) for k in ("logits_to_keep", "num_logits_to_keep")):
        return "logits_to_keep given"
    head = _head(model)
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad:
        return "output head is not a frozen bias-free nn.Linear"
    config = getattr(model, "config", None)
    if any(getattr(config, a, None) not in (None, 1, 1.0) for a in _LOGIT_POSTPROCESS):
        return "model post-processes its logits"
    cap = getattr(config, _SOFTCAP, None)
    if cap is not None and not (isinstance(cap, (int, float)) and cap > 0):
        return f"{_SOFTCAP}={cap!r} is not a positive number"
    if not isinstance(getattr(model, "model", None), nn.Module):
        return "no inner decoder at model.model"
    return None


def fused_loss_forward(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    num_items_in_batch: Any = None,
    shift_labels: torch.Tensor | None = None,
    **kwargs: Any,
):
    """Decoder forward + fused chunked loss; returns a ``CausalLMOutputWithPast`` with ``logits=None``.

    Matches transformers' ``ForCausalLMLoss``: labels are shifted left by one (or ``shift_labels``
    used as given), ``-100`` is ignored, the mean is over non-ignored tokens unless
    ``num_items_in_batch`` is given (then sum / num_items_in_batch).
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    for k in _UNSUPPORTED_KWARGS:
        kwargs.pop(k, None)
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    head = _head(model)
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    w = head.weight
    if h.dtype != w.dtype and not torch.is_autocast_enabled(h.device.type):
        w = w.to(h.dtype)  # compute the head in the activation dtype
    loss = fused_linear_cross_entropy(
        h,
        w,
        shift_labels.reshape(-1).to(h.device),
        num_items_in_batch=num_items_in_batch,
        softcap=getattr(getattr(model, "config", None), _SOFTCAP, None),
    )
    return CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=getattr(out, "past_key_values", None),
        hidden_states=getattr(out, "hidden_states", None),
        attentions=getattr(out, "attentions", None),
    )
