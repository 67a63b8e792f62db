"""Fused LoRA autograd for linear projections that share one input (q/k/v, gate/up, or one layer).

``lora_linears(x, [q_proj, k_proj, v_proj])`` returns ``(q, k, v)`` exactly as calling the three
layers would, but as ONE autograd node:

* forward: each output is a fresh tensor holding ``x @ W_i^T (+ b_i)`` (a 4-bit ``W_i`` is
  dequantized into the shared scratch right before its matmul and never kept), and the LoRA term
  ``s_i (x A_i^T) B_i^T`` is added into that same tensor by one ``addmm_``. Only ``x`` and the
  small ``x A_i^T`` are saved (through ``ctx.save_for_backward``, so checkpointing and offload
  hooks see them);
* backward: the input gradient is accumulated in ONE buffer (``dy_0 W_0``, then ``addmm_`` of every
  other base term and of every ``(s_i dy_i B_i) A_i``) instead of one add kernel per branch, and the
  fp32 adapter gradients are computed from the same small products.

The bf16/fp16 copies of the fp32 adapter weights come from a cache (:func:`cast_adapter`) that is
reused across forwards, recomputes and backward while the parameter is unchanged, so the ~2 tiny
cast launches per adapter per call disappear.

When a layer cannot be fused (see :func:`fusable`), or the call itself does not qualify (dtypes
differ, autocast would change the math dtype, hooks on the modules), the layers are simply called
one by one: correct, just not fused. :func:`fused_lora_disabled` forces that generic path (tests,
debugging).

Autocast: the fused path runs under autocast only when autocast would not change anything, i.e.
the autocast dtype equals the activations' dtype and every weight is already in it (HF Trainer
``bf16=True`` on a bf16 model). An fp32 model under bf16 autocast takes the generic path, whose
per-op casts define the result.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from ..quant.linear4bit import Linear4bit, _dequant_into_scratch

logger = logging.getLogger(__name__)

__all__ = [
    "cast_adapter",
    "clear_cast_cache",
    "fusable",
    "fused_enabled",
    "fused_lora_disabled",
    "lora_linears",
    "set_fused_enabled",
]

# ----------------------------------------------------------------------------------- the switch
_ENABLED = True


def fused_enabled() -> bool:
    """Whether :func:`lora_linears` and ``LoraLinear.forward`` may take the fused path."""
    return _ENABLED


def set_fused_enabled(flag: bool) -> bool:
    """Turn the fused LoRA path on or off process-wide; returns the previous setting."""
    global _ENABLED
    old, _ENABLED = _ENABLED, bool(flag)
    return old


@contextlib.contextmanager
def fused_lora_disabled() -> Iterator[None]:
    """Context manager: inside it every LoRA layer runs the generic (unfused) path."""
    old = set_fused_enabled(False)
    try:
        yield
    finally:
        set_fused_enabled(old)


# ----------------------------------------------------------------------------- adapter cast cache
# parameter -> ((version, data_ptr, dtype, device), cast copy). One entry per parameter (the latest
# dtype asked for), dropped with the parameter (weak keys by identity: tensors' == is elementwise).
_CASTS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_HOOKED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_INSTALL_LOCK = threading.Lock()
_OPTIMIZER_HOOK: Any = None


def clear_cast_cache() -> None:
    """Forget every cached low-precision adapter copy (they are re-made on demand).

    Only needed after writing adapter weights behind autograd's back (``p.data`` or raw pointers)
    outside any optimizer step and without a backward pass in between.
    """
    _CASTS.clear()


def _drop_cast(p: torch.Tensor) -> None:
    _CASTS.pop(p, None)


def _on_optimizer_step(_optimizer: Any, _args: Any, _kwargs: Any) -> None:
    _CASTS.clear()


def _install_invalidation(p: torch.Tensor) -> None:
    # The version counter misses writes made through ``.data`` or by kernels that do not bump it
    # (torch's fused AdamW, bitsandbytes' 8-bit optimizers), so the cache is also emptied after
    # every optimizer step and a parameter's entry dropped once backward has accumulated its
    # gradient (any update comes after that).
    global _OPTIMIZER_HOOK
    if _OPTIMIZER_HOOK is None:
        with _INSTALL_LOCK:
            if _OPTIMIZER_HOOK is None:
                _OPTIMIZER_HOOK = register_optimizer_step_post_hook(_on_optimizer_step)
    if p.requires_grad and p.is_leaf and p not in _HOOKED:
        _HOOKED[p] = p.register_post_accumulate_grad_hook(_drop_cast)


def cast_adapter(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``p`` in ``dtype`` (detached), reusing the copy made last time while ``p`` is unchanged.

    The cache key is the parameter object, its ``_version`` (in-place updates bump it), its storage
    pointer, the dtype and the device; on top of that the cache is emptied after each optimizer
    step and a parameter's copy dropped when backward accumulates its gradient, so writers that do
    not bump the version (fused AdamW, 8-bit optimizers) never leave a stale copy.

    Args:
        p: an adapter weight (normally a float32 ``nn.Parameter``).
        dtype: the activation dtype.

    Returns:
        ``p`` itself when it already has ``dtype``, else the cached (or a fresh) copy.
    """
    if p.dtype == dtype:
        return p
    key = (p._version, p.data_ptr(), dtype, p.device)
    hit = _CASTS.get(p)
    if hit is not None and hit[0] == key:
        return hit[1]
    # Made outside inference mode even when called from generate(): an inference tensor in the
    # cache could not be used by a later training forward.
    with torch.inference_mode(False), torch.no_grad():
        copy = p.detach().to(dtype)
    _CASTS[p] = (key, copy)
    _install_invalidation(p)
    return copy


# ------------------------------------------------------------------------------- fusability
_LORA_CLS: type | None = None


def _lora_class() -> type:
    global _LORA_CLS
    if _LORA_CLS is None:
        from ..peft.layer import LoraLinear  # lazy: peft.layer imports this module

        _LORA_CLS = LoraLinear
    return _LORA_CLS


class _Member:
    """One projection of a group: where its frozen weight lives and its adapter, if any."""

    __slots__ = ("a", "b", "bias", "compute_dtype", "out", "packed", "scaling", "state", "weight")

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The frozen weight ``[out, in]`` in ``dtype`` (4-bit: freshly dequantized into scratch)."""
        if self.weight is not None:
            return self.weight
        return _dequant_into_scratch(self.packed, self.state, dtype)


def _hook_reason(m: nn.Module, what: str) -> str | None:
    # The fused path never calls these modules, so hooks or a patched forward (accelerate's device
    # hooks, counting hooks in tests) would silently not run.
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
        return f"{what} has module hooks"
    if "forward" in m.__dict__:
        return f"{what} has a patched forward"
    return None


def _base_member(base: nn.Module, what: str) -> _Member | str:
    # Parameters and submodules are read from their dicts: nn.Module.__getattr__ is slow and this
    # runs for every projection call.
    m = _Member()
    params = base._parameters
    if isinstance(base, Linear4bit):
        if type(base).forward is not Linear4bit.forward:
            return f"{what} overrides Linear4bit.forward"
        state = base.quant_state
        if state is None:
            return f"{what} is an empty Linear4bit shell"
        m.weight, m.packed, m.state, m.compute_dtype = None, params["weight"], state, base.compute_dtype
    elif isinstance(base, nn.Linear):
        if type(base).forward is not nn.Linear.forward:
            return f"{what} is a {type(base).__name__} with its own forward"
        w = params["weight"]
        if w.requires_grad:
            return f"{what} weight is trainable"
        m.weight, m.packed, m.state, m.compute_dtype = w, None, None, w.dtype
    else:
        return f"{what} is a {type(base).__name__}, not nn.Linear or Linear4bit"
    bias = params.get("bias")
    if bias is not None and bias.requires_grad:
        return f"{what} bias is trainable"
    reason = _hook_reason(base, what)
    if reason is not None:
        return reason
    m.bias, m.out = bias, int(base.out_features)
    m.a = m.b = None
    m.scaling = 0.0
    return m


def _member(layer: nn.Module, own_hooks: bool) -> _Member | str:
    """The plan for ``layer`` in a fused group, or the reason it cannot join one."""
    lora_cls = _lora_class()
    if not isinstance(layer, lora_cls):
        return _base_member(layer, "layer")
    if type(layer).forward is not lora_cls.forward:
        return f"{type(layer).__name__} overrides LoraLinear.forward"
    if layer.lora_dropout_p != 0:
        return "LoRA dropout > 0"
    if layer.disabled:
        return "adapter disabled"
    if layer.merged:
        return "adapter merged"
    mods = layer._modules
    lin_a, lin_b = mods["lora_A"], mods["lora_B"]
    if lin_a._parameters.get("bias") is not None or lin_b._parameters.get("bias") is not None:
        return "adapter has a bias"
    if own_hooks:
        reason = _hook_reason(layer, "LoRA layer")
        if reason is not None:
            return reason
    m = _base_member(mods["base_layer"], "base layer")
    if isinstance(m, _Member):
        m.a, m.b, m.scaling = lin_a._parameters["weight"], lin_b._parameters["weight"], float(layer.scaling)
    return m


def fusable(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot join a fused group, or ``None`` when it can.

    Fusable: a ``LoraLinear`` with dropout 0, not disabled, not merged, over a frozen ``nn.Linear``
    or ``Linear4bit`` (weight and bias without grad); or such a frozen base on its own (a member
    without adapter). Modules carrying hooks or a patched ``forward`` are not fused, since the fused
    path would skip them. The per-call conditions (dtypes, devices, autocast) are checked by
    :func:`lora_linears` itself.
    """
    m = _member(layer, own_hooks=True)
    return m if isinstance(m, str) else None


def _call_reason(x: torch.Tensor, members: list[_Member]) -> str | None:
    """Per-call conditions: one math dtype (= ``x.dtype``) for every matmul, one device."""
    dt, dev = x.dtype, x.device
    if dt not in (torch.float32, torch.float16, torch.bfloat16):
        return f"input dtype {dt}"
    autocast = torch.is_autocast_enabled(dev.type)
    if autocast and torch.get_autocast_dtype(dev.type) != dt:
        return "autocast would change the math dtype"
    for m in members:
        if m.weight is not None:
            if m.weight.dtype != dt or m.weight.device != dev:
                return "base weight dtype/device differs from the input"
            if m.bias is not None and (m.bias.dtype != dt or m.bias.device != dev):
                return "base bias dtype/device differs from the input"
        else:
            # Linear4bit's own rule: compute_dtype, or the autocast dtype off the CPU (which equals
            # dt when we get here).
            if (m.compute_dtype != dt and not (autocast and dev.type != "cpu")) or m.packed.device != dev:
                return "4-bit compute dtype/device differs from the input"
            if m.bias is not None and m.bias.device != dev:
                return "base bias device differs from the input"
        if m.a is not None and (m.a.device != dev or m.b.device != dev):
            return "adapter on another device"
    return None


# ------------------------------------------------------------------------------- autograd
# (device type, input dtype, output dtype) -> whether addmm's out_dtype overload runs there (CUDA
# has it for bf16/fp16 -> fp32; CPU does not).
_OUT_DTYPE_OK: dict[tuple[str, torch.dtype, torch.dtype], bool] = {}


def _mm_scaled(a: torch.Tensor, b: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """``alpha * (a @ b)`` as a new ``dtype`` tensor, in one GEMM where the backend allows.

    The scale rides in the GEMM epilogue (``beta=0``: the uninitialized ``input`` is ignored) and an
    fp32 result for bf16/fp16 operands comes straight out of the fp32 accumulator, instead of a
    matmul followed by small scale and cast kernels.
    """
    shape = (a.shape[0], b.shape[1])
    if a.dtype == dtype:
        return torch.addmm(torch.empty(shape, dtype=dtype, device=a.device), a, b, beta=0, alpha=alpha)
    key = (a.device.type, a.dtype, dtype)
    if _OUT_DTYPE_OK.get(key, True):
        # The overload wants ``input`` in the operands' dtype and of the result's shape.
        ignored = torch.empty(shape, dtype=a.dtype, device=a.device)
        try:
            return torch.addmm(ignored, a, b, out_dtype=dtype, beta=0, alpha=alpha)
        except (NotImplementedError, TypeError, RuntimeError) as exc:
            # Only "this backend has no such overload" switches the fallback on for good; any other
            # error (out of memory, a CUDA fault) is real and must surface.
            # (NotImplementedError subclasses RuntimeError: test for it first)
            if not isinstance(exc, (NotImplementedError, TypeError)) and "out_dtype" not in str(exc):
                raise
            _OUT_DTYPE_OK[key] = False
            logger.info(
                "addmm(out_dtype=%s) unavailable on %s for %s: matmul + cast instead", dtype, *key[:2]
            )
    return torch.mul(torch.mm(a, b), alpha, out=torch.empty(shape, dtype=dtype, device=a.device))


class _LoraLinearsFunction(torch.autograd.Function):
    """Base + LoRA outputs of projections sharing ``x``; ``params`` are the adapters, in order."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, members: list[_Member], *params: torch.Tensor):  # noqa: D417
        dt = x.dtype
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        outs, downs, casts, versions = [], [], [], []
        k = 2  # index of the next adapter in needs_input_grad
        for m in members:
            w = m.dense(dt)
            # Allocated in its final shape and filled through a 2-D view: a view returned from a
            # custom Function could not be modified in place later (RoPE works in place on q/k).
            y = torch.empty((*lead, m.out), dtype=dt, device=x.device)
            y2 = y.view(-1, m.out)
            if m.bias is None:
                torch.mm(x2, w.t(), out=y2)
            else:
                torch.addmm(m.bias.to(dt), x2, w.t(), out=y2)
            if m.a is not None:
                a, b = cast_adapter(m.a, dt), cast_adapter(m.b, dt)
                down = torch.mm(x2, a.t())
                y2.addmm_(down, b.t(), alpha=m.scaling)
                downs.append(down if ctx.needs_input_grad[k + 1] else None)
                casts.append((a, b))
                versions.append((m.a._version, m.b._version))
                k += 2
            outs.append(y)
        need_a = any(ctx.needs_input_grad[2::2])
        ctx.save_for_backward(x if need_a else None, *downs)
        # Parameters and their casts (not activations) ride on ctx; the casts are what forward used.
        ctx.members = members
        ctx.casts = casts
        ctx.versions = versions
        ctx.x_shape = x.shape
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    @once_differentiable  # its GEMMs write into preallocated outputs: no double backward
    def backward(ctx: Any, *dys: torch.Tensor | None):
        x, *downs = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_x = need[0]
        x2 = None if x is None else x.reshape(-1, x.shape[-1])
        dx2 = None
        grads: list[torch.Tensor | None] = []
        j, k = 0, 2
        for m, dy in zip(ctx.members, dys):
            lora = m.a is not None
            if dy is None:
                if lora:
                    grads += [None, None]
                    j, k = j + 1, k + 2
                continue
            dt = dy.dtype
            dy2 = dy.reshape(-1, m.out)
            if need_x:
                w = m.dense(dt)  # 4-bit: dequantized again, into the scratch
                if dx2 is None:
                    dx2 = torch.mm(dy2, w)
                else:
                    dx2.addmm_(dy2, w)
            if not lora:
                continue
            a, b = ctx.casts[j]
            for p, cast, v in zip((m.a, m.b), (a, b), ctx.versions[j]):
                if cast is p and p._version != v:
                    raise RuntimeError(
                        "a LoRA weight used by the fused LoRA forward was modified in place before backward"
                    )
            need_a, need_b = need[k], need[k + 1]
            da = db = None
            if need_x or need_a:
                gs = _mm_scaled(dy2, b, m.scaling, dt)  # s * dy B, [tokens, r]
                if need_x:
                    dx2.addmm_(gs, a)
                if need_a:
                    da = _mm_scaled(gs.t(), x2, 1.0, m.a.dtype)
            if need_b:
                db = _mm_scaled(dy2.t(), downs[j], m.scaling, m.b.dtype)
            grads += [da, db]
            j, k = j + 1, k + 2
        dx = None if dx2 is None else dx2.view(ctx.x_shape)
        return (dx, None, *grads)


# ------------------------------------------------------------------------------- entry points
def _apply(x: torch.Tensor, members: list[_Member]) -> tuple[torch.Tensor, ...]:
    params: list[torch.Tensor] = []
    for m in members:
        if m.a is not None:
            params += [m.a, m.b]
    return _LoraLinearsFunction.apply(x, members, *params)


def _global_hooks() -> bool:
    mod = nn.modules.module
    return bool(
        mod._global_forward_hooks
        or mod._global_forward_pre_hooks
        or mod._global_backward_hooks
        or mod._global_backward_pre_hooks
    )


def lora_linears(x: torch.Tensor, layers: Sequence[nn.Module]) -> tuple[torch.Tensor, ...]:
    """Every layer of ``layers`` applied to the same ``x``, as one fused autograd node.

    Args:
        x: the shared input ``[..., in]``.
        layers: modules taking ``x``: ``LoraLinear`` over ``nn.Linear``/``Linear4bit``, or such a
            frozen base alone (e.g. ``[q_proj, k_proj, v_proj]``, ``[gate_proj, up_proj]``).

    Returns:
        Each layer's output ``[..., out_i]``, equal to ``tuple(layer(x) for layer in layers)``
        (which is what runs when the group cannot be fused; see :func:`fusable`).
    """
    if _ENABLED and layers and not _global_hooks():
        members = [_member(layer, own_hooks=True) for layer in layers]
        if not any(isinstance(m, str) for m in members) and _call_reason(x, members) is None:
            return _apply(x, members)
    return tuple(layer(x) for layer in layers)


def fused_single(x: torch.Tensor, layer: nn.Module) -> torch.Tensor | None:
    """``LoraLinear.forward``'s fused path: ``layer(x)`` as one node, or ``None`` if not fusable.

    The layer's own hooks already ran (it is being called), so only its base's are checked.
    """
    if not _ENABLED or _global_hooks():
        return None
    m = _member(layer, own_hooks=False)
    if isinstance(m, str) or _call_reason(x, [m]) is not None:
        return None
    return _apply(x, [m])[0]
