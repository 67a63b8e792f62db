"""Gradient-checkpointing modes for ``get_peft_model(use_gradient_checkpointing=...)``.

Modes:

* ``False`` (or ``None``): no checkpointing (turned off if the model had it on).
* ``True``: every decoder layer is checkpointed: only its inputs are kept in forward and the layer is
  recomputed in backward.
* ``"unsloth"``: checkpointing with activation offload (:mod:`rslora_fast.offload`): each decoder
  layer's input is copied to pinned host memory on a side stream while the layer computes, and
  brought back (prefetched one layer ahead) just in time for its recompute in backward. The last
  layer's input stays on the GPU; layer calls with fewer than 512 tokens (batch x sequence) use plain
  checkpointing, since the copy would not pay.
  With ``max_memory_gb`` the layers whose activations fit in that budget are not recomputed at all;
  with ``save_policy`` (``"auto"``/``"always"``) a layer may also skip its recompute by parking the
  tensors it saves in host memory (decided by the Rust scheduler from measured costs; see
  docs/checkpointing.md).

Both reentrant and non-reentrant ``torch.utils.checkpoint`` are supported. Non-reentrant is the
default. With reentrant checkpointing a checkpointed block whose inputs do not require grad would
give the LoRA weights no gradient, so the output of the input embeddings is made to require grad.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

ACCEPTED_MODES = (False, True, "unsloth")


def validate_mode(mode: Any) -> bool | str:
    """Normalize and check a ``use_gradient_checkpointing`` value.

    Args:
        mode: ``False``, ``None``, ``True`` or ``"unsloth"``.

    Returns:
        ``False``, ``True`` or ``"unsloth"``.

    Raises:
        ValueError: for anything else, listing the accepted modes.
    """
    if mode is None or mode is False:
        return False
    if mode is True:
        return True
    if isinstance(mode, str) and mode == "unsloth":
        return "unsloth"
    raise ValueError(f"use_gradient_checkpointing must be one of {list(ACCEPTED_MODES)}, got {mode!r}")


def validate_save_policy(policy: Any) -> str:
    """``policy`` if it is one of the offload save policies, else a ValueError naming them."""
    from .offload.install import SAVE_POLICIES

    if policy not in SAVE_POLICIES:
        raise ValueError(f"save_policy must be one of {list(SAVE_POLICIES)}, got {policy!r}")
    return policy


def _make_inputs_require_grad(model: nn.Module) -> None:
    if callable(getattr(model, "enable_input_require_grads", None)):
        model.enable_input_require_grads()
        return
    emb = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    if emb is None:
        raise ValueError(
            "reentrant gradient checkpointing needs the model's input embeddings "
            "(get_input_embeddings()) to make the checkpointed inputs require grad; use use_reentrant=False"
        )

    def hook(_module, _inputs, output):
        output.requires_grad_(True)

    model._rslora_input_grad_hook = emb.register_forward_hook(hook)


def _undo_inputs_require_grad(model: nn.Module) -> None:
    if callable(getattr(model, "disable_input_require_grads", None)) and hasattr(
        model, "_require_grads_hook"
    ):
        model.disable_input_require_grads()
    handle = model.__dict__.pop("_rslora_input_grad_hook", None)
    if handle is not None:
        handle.remove()


def apply_gradient_checkpointing(
    model: nn.Module,
    mode: Any,
    max_seq_length: int = 2048,
    *,
    use_reentrant: bool = False,
    max_memory_gb: float | str | None = None,
    save_policy: str = "never",
) -> bool | str:
    """Install (or remove) gradient checkpointing on a transformers model.

    Args:
        model: the unwrapped transformers model (a ``PreTrainedModel`` that supports checkpointing).
        mode: ``False``/``None``, ``True`` or ``"unsloth"`` (see the module docstring).
        max_seq_length: the training sequence length; recorded for ``for_training``. The offloaded
            mode decides per call from the actual token count (plain checkpointing below 512).
        use_reentrant: use reentrant ``torch.utils.checkpoint``; the input embeddings' output is then
            made to require grad so LoRA weights inside checkpointed layers still get gradients.
        max_memory_gb: ``"unsloth"`` only: GPU memory budget for activations kept without recompute
            (GiB, or ``"auto"``: the free memory minus a margin).
        save_policy: ``"unsloth"`` only: ``"never"``, ``"auto"`` or ``"always"``; when a layer skips
            its recompute by parking its saved tensors in host memory.

    Returns:
        The normalized mode.

    Raises:
        ValueError: for an unknown mode. A model without per-layer checkpointing support gets a
            warning and no checkpointing (the return value is then ``False``).
    """
    mode = validate_mode(mode)
    validate_save_policy(save_policy)
    _uninstall_offload(model)
    if mode is False:
        if getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
        _undo_inputs_require_grad(model)
        return False
    if not (
        callable(getattr(model, "gradient_checkpointing_enable", None))
        and getattr(model, "supports_gradient_checkpointing", False)
    ):
        warnings.warn(
            f"use_gradient_checkpointing={mode!r}: {type(model).__name__} does not support per-layer "
            "gradient checkpointing (a transformers PreTrainedModel with supports_gradient_checkpointing is "
            "needed); training without checkpointing",
            stacklevel=2,
        )
        return False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": bool(use_reentrant)})
    if use_reentrant:
        _make_inputs_require_grad(model)
    if mode == "unsloth":
        # Installed after gradient_checkpointing_enable: it takes over the layers' own flags, so the
        # two checkpoints never nest.
        from .offload import install_offloaded_checkpointing

        try:
            handle = install_offloaded_checkpointing(
                model, max_memory_gb=max_memory_gb, save_policy=save_policy
            )
        except ValueError as exc:  # no decoder-layer list found: plain checkpointing still works
            warnings.warn(
                f'use_gradient_checkpointing="unsloth": {exc}; using plain checkpointing', stacklevel=2
            )
        else:
            model.__dict__["_rslora_offload"] = handle
    return mode


def offload_handle(model: nn.Module):
    """The offloaded-checkpointing handle installed on ``model`` (``stats()``, ``release_all()``), or None."""
    return model.__dict__.get("_rslora_offload")


def _uninstall_offload(model: nn.Module) -> None:
    handle = model.__dict__.pop("_rslora_offload", None)
    if handle is not None:
        handle.uninstall()
