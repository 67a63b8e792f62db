"""Fused LoRA autograd for linear projections that share one input (q/k/v, gate/up, or one layer).

``lora_linears(x, [q_proj, k_proj, v_proj])`` returns ``(q, k, v)`` exactly as calling the three
layers would, but as ONE autograd node whose LoRA work is grouped:

* forward: ONE GEMM gives every member's ``x A_i^T`` at once (``x [A_1; A_2; ...]^T``, the
  adapters' A stacked in one buffer); each output is a fresh tensor holding ``x W_i^T (+ b_i)``
  (a 4-bit ``W_i`` dequantized into the shared scratch right before its matmul, never kept) and
  its LoRA term ``s_i (x A_i^T) B_i^T`` is added into it by one ``addmm_`` (the GEMM epilogue).
  Only ``x`` and the small stacked ``x A^T`` are saved (through ``ctx.save_for_backward``, so
  checkpointing and offload hooks see them);
* backward: the input gradient is accumulated in ONE buffer (``dy_0 W_0``, then ``addmm_`` of
  every other base term, then ONE ``addmm_`` of ``[s_1 dy_1 B_1 | s_2 dy_2 B_2 | ...] [A_1; A_2;
  ...]``), and the fp32 gradients of all A's come from ONE GEMM; each B needs its own (its own
  ``dy_i``).

The low-precision copies of the fp32 adapter weights live in persistent buffers per group (a
:class:`_Copies`), refreshed by ONE batched copy (``torch._foreach_copy_``) after every optimizer
step, and re-copied before use when a parameter's version counter moved (an in-place change
outside the optimizer: ``load_adapter``, ``set_adapter_weights``, user code under ``no_grad``) or
backward produced its gradient since (a write through ``.data`` that bumps no version).

Each group's members are planned once (:class:`_GroupPlan`: where each frozen weight lives, its
4-bit dequantize plan, the adapter copies) and revalidated per call by comparing a tuple of ids.
``ops`` knows nothing of ``peft``: a LoRA layer joins by implementing :class:`FusableLora`.

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
import functools
import logging
import math
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..quant.linear4bit import Linear4bit, dequant_into_scratch

logger = logging.getLogger(__name__)

__all__ = [
    "FusableLora",
    "LoraParts",
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


# ------------------------------------------------------------------------------- the protocol
class LoraParts(NamedTuple):
    """What the fused op needs from a LoRA layer: ``y = base(x) + scaling * B(A(dropout(x)))``."""

    base: nn.Module  # the frozen nn.Linear or Linear4bit
    a: torch.Tensor  # A [r, in] (a Parameter, normally float32)
    b: torch.Tensor  # B [out, r]
    scaling: float
    dropout: float  # probability; > 0 keeps the layer on the generic path


@runtime_checkable
class FusableLora(Protocol):
    """A LoRA layer the fused op can run: it hands over its parts, or says why it cannot.

    ``fused_lora_parts()`` returns :class:`LoraParts`, or a short reason (adapter disabled,
    merged, a bias on the adapter, a subclass with its own forward) as a string.
    """

    def fused_lora_parts(self) -> LoraParts | str: ...


# ----------------------------------------------------------------------------- adapter copies
class _Copies:
    """A group's low-precision adapter copies: all A's stacked in one ``[sum r, in]`` buffer
    (``a_cat``, one GEMM reads them together) and one buffer per B.

    ``versions`` are the parameters' version counters when the copies were last made; ``stale``
    is set when backward produced their gradients (a later ``.data`` write bumps no version);
    ``gen`` counts in-place refreshes, so a backward can tell that the buffers its forward read
    were overwritten.
    """

    __slots__ = ("__weakref__", "a_cat", "bs", "device", "dsts", "dtype", "gen", "srcs", "stale", "versions")

    def __init__(self, members: list[_Member], dtype: torch.dtype, device: torch.device) -> None:
        lora = [m for m in members if m.a is not None]
        n_in = lora[0].a.shape[1]
        self.dtype, self.device = dtype, device
        # Made (views included) outside inference and grad mode, as every later write happens:
        # usable by training even when made under generate().
        with torch.inference_mode(False), torch.no_grad():
            self.a_cat = torch.empty((lora[-1].hi, n_in), dtype=dtype, device=device)
            self.bs = [torch.empty(m.b.shape, dtype=dtype, device=device) for m in lora]
            self.dsts = [self.a_cat[m.lo : m.hi] for m in lora] + self.bs
        self.srcs = [m.a for m in lora] + [m.b for m in lora]
        self.gen = 0
        self.refresh()
        _REGISTRY.add(self)

    def refresh(self) -> None:
        """Copy every parameter into its buffer (one batched copy)."""
        with torch.inference_mode(False), torch.no_grad():
            torch._foreach_copy_(self.dsts, self.srcs)
        self.mark_fresh()

    def mark_fresh(self) -> None:
        self.versions = [p._version for p in self.srcs]
        self.stale = False
        self.gen += 1

    def current(self) -> bool:
        """Whether the buffers still equal the parameters (no write seen since the last copy)."""
        return not self.stale and self.versions == [p._version for p in self.srcs]


class _Registry:
    """Every live :class:`_Copies` (weakly, by id) and a generation bumped when one comes or goes;
    the optimizer-step hook refreshes those whose parameters the stepping optimizer holds, from
    lists planned once per optimizer and generation."""

    def __init__(self) -> None:
        self.live: dict[int, weakref.ref] = {}
        self.gen = 0
        self.lock = threading.RLock()
        self.by_optimizer: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.hook: Any = None

    def add(self, copies: _Copies) -> None:
        with self.lock:
            self.live[id(copies)] = weakref.ref(copies, functools.partial(_Registry._gone, self, id(copies)))
            self.gen += 1
            if self.hook is None:
                self.hook = register_optimizer_step_post_hook(self.after_step)

    def _gone(self, key: int, _ref: weakref.ref) -> None:
        with self.lock:
            self.live.pop(key, None)
            self.gen += 1

    def plan(self, optimizer: Any) -> tuple[list[weakref.ref], list[torch.Tensor], list[torch.Tensor]]:
        """(copy sets, destination buffers, source parameters) that ``optimizer`` updates."""
        groups = optimizer.param_groups
        nparams = sum(len(g["params"]) for g in groups)
        hit = self.by_optimizer.get(optimizer)
        if hit is not None and hit[0] == self.gen and hit[1] == nparams:
            return hit[2]
        ids = {id(p) for g in groups for p in g["params"]}
        refs, dsts, srcs = [], [], []
        for ref in self.live.values():
            copies = ref()
            if copies is not None and any(id(p) in ids for p in copies.srcs):
                refs.append(ref)
                dsts += copies.dsts
                srcs += copies.srcs
        planned = (refs, dsts, srcs)
        try:
            self.by_optimizer[optimizer] = (self.gen, nparams, planned)
        except TypeError:  # an optimizer that cannot be weakly referenced: planned every step
            pass
        return planned

    def after_step(self, optimizer: Any, _args: Any, _kwargs: Any) -> None:
        # Fused AdamW and 8-bit optimizers update without bumping version counters, so the copies
        # of every parameter the optimizer holds are refreshed, in one batched copy.
        with self.lock:
            refs, dsts, srcs = self.plan(optimizer)
            if not dsts:
                return
            with torch.inference_mode(False), torch.no_grad():
                torch._foreach_copy_(dsts, srcs)
            for ref in refs:
                copies = ref()
                if copies is not None:
                    copies.mark_fresh()


_REGISTRY = _Registry()


def clear_cast_cache() -> None:
    """Forget every planned group and its adapter copies (they are re-made on demand).

    Only needed after writing adapter weights behind autograd's back (``p.data`` or raw pointers)
    outside any optimizer step and without a backward pass in between.
    """
    _PLANS.clear()


# ------------------------------------------------------------------------------- planning
class _Member:
    """One projection of a group: where its frozen weight lives and its adapter, if any."""

    __slots__ = ("a", "b", "bias", "hi", "lo", "out", "q4", "scaling", "weight")

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The frozen weight ``[out, in]`` in ``dtype`` (4-bit: freshly dequantized into scratch)."""
        if self.q4 is None:
            return self.weight
        return dequant_into_scratch(self.q4.dequant_plan(), dtype)


def _hook_reason(m: nn.Module, what: str) -> str | None:
    # The fused path never calls these modules, so hooks or a patched forward (accelerate's device
    # hooks, counting hooks in tests) would silently not run.
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
        return f"{what} has module hooks"
    if "forward" in m.__dict__:
        return f"{what} has a patched forward"
    return None


def _layer_key(layer: nn.Module, own_hooks: bool) -> tuple | str:
    """The plan key of ``layer`` (ids, data pointers and settings of everything the fused op reads),
    or the reason it cannot join a fused group. Parameters are read from their dicts:
    nn.Module.__getattr__ is slow and this runs for every projection call."""
    parts_of = getattr(type(layer), "fused_lora_parts", None)
    if parts_of is None:
        base, a, b, s, what = layer, None, None, 0.0, "layer"
    else:
        parts = parts_of(layer)
        if isinstance(parts, str):
            return parts
        if parts.dropout != 0:
            return "LoRA dropout > 0"
        if own_hooks:
            reason = _hook_reason(layer, "LoRA layer")
            if reason is not None:
                return reason
        base, a, b, s, what = parts.base, parts.a, parts.b, float(parts.scaling), "base layer"
    params = base._parameters
    if isinstance(base, Linear4bit):
        if type(base).forward is not Linear4bit.forward:
            return f"{what} overrides Linear4bit.forward"
        if base.__dict__.get("_qs") is None and base.__dict__.get("_qs_template") is None:
            return f"{what} is an empty Linear4bit shell"
    elif isinstance(base, nn.Linear):
        if type(base).forward is not nn.Linear.forward:
            return f"{what} is a {type(base).__name__} with its own forward"
        if params["weight"].requires_grad:
            return f"{what} weight is trainable"
    else:
        return f"{what} is a {type(base).__name__}, not nn.Linear or Linear4bit"
    bias = params.get("bias")
    if bias is not None and bias.requires_grad:
        return f"{what} bias is trainable"
    reason = _hook_reason(base, what)
    if reason is not None:
        return reason
    w = params["weight"]  # 4-bit: the packed bytes (a new Parameter after requantize_ or .to())
    # The data pointers change when .to() moves or casts a tensor in place of the same Parameter.
    return (
        id(base), id(w), w.data_ptr(), id(base.__dict__.get("compute_dtype")), s,
        id(bias), 0 if bias is None else bias.data_ptr(),
        id(a), 0 if a is None else a.data_ptr(), id(b), 0 if b is None else b.data_ptr(),
    )  # fmt: skip


def _new_member(key: tuple, base: nn.Module, a: torch.Tensor | None, b: torch.Tensor | None) -> _Member:
    m = _Member()
    params = base._parameters
    m.q4 = base if isinstance(base, Linear4bit) else None
    m.weight = None if m.q4 is not None else params["weight"]
    m.bias, m.out = params.get("bias"), int(base.out_features)
    m.a, m.b, m.scaling = a, b, key[4]
    m.lo = m.hi = 0
    return m


class _GroupPlan:
    """A group's members, planned once; reused while every layer's key stays the same."""

    __slots__ = ("copies", "keys", "lora", "members", "ok_for")

    def __init__(self, layers: Sequence[nn.Module], keys: list[tuple]) -> None:
        self.keys = keys
        self.members = []
        r_total = 0
        for layer, key in zip(layers, keys):
            parts_of = getattr(type(layer), "fused_lora_parts", None)
            if parts_of is None:
                m = _new_member(key, layer, None, None)
            else:
                parts = parts_of(layer)
                m = _new_member(key, parts.base, parts.a, parts.b)
                m.lo, m.hi = r_total, r_total + int(parts.a.shape[0])
                r_total = m.hi
            self.members.append(m)
        self.lora = [m for m in self.members if m.a is not None]
        self.copies: _Copies | None = None
        self.ok_for: tuple | None = None  # the (dtype, device, autocast) the call checks passed for

    def copies_for(self, dtype: torch.dtype, device: torch.device) -> _Copies:
        """The adapter copies in ``dtype`` on ``device``, equal to the parameters right now."""
        c = self.copies
        if c is None or c.dtype is not dtype or c.device != device:
            c = self.copies = _Copies(self.members, dtype, device)
        elif not c.current():
            c.refresh()
        return c


# first layer of a group -> {ids of the group's layers: _GroupPlan}; dropped with the layer. A layer
# leads its own group (LoraLinear.forward) and at most one shared one (q/k/v, gate/up).
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PLANS_PER_LAYER = 4


def _plan(layers: Sequence[nn.Module], own_hooks: bool) -> _GroupPlan | str:
    keys = []
    for layer in layers:
        key = _layer_key(layer, own_hooks)
        if isinstance(key, str):
            return key
        keys.append(key)
    per_first = _PLANS.get(layers[0])
    if per_first is None:
        per_first = _PLANS[layers[0]] = {}
    ids = tuple(map(id, layers))
    plan = per_first.get(ids)
    if plan is None or plan.keys != keys:
        if plan is None and len(per_first) >= _PLANS_PER_LAYER:
            per_first.clear()  # groups that no longer exist (a member replaced) must not pin it
        plan = per_first[ids] = _GroupPlan(layers, keys)
    return plan


def fusable(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot join a fused group, or ``None`` when it can.

    Fusable: a :class:`FusableLora` layer (``peft``'s ``LoraLinear``) with dropout 0, not
    disabled, not merged, over a frozen ``nn.Linear`` or ``Linear4bit`` (weight and bias without
    grad); or such a frozen base on its own (a member without adapter). Modules carrying hooks or
    a patched ``forward`` are not fused, since the fused path would skip them. The per-call
    conditions (dtypes, devices, autocast) are checked by :func:`lora_linears` itself.
    """
    key = _layer_key(layer, own_hooks=True)
    return key if isinstance(key, str) else None


def _call_reason(x: torch.Tensor, members: list[_Member]) -> str | None:
    """Per-call conditions: one math dtype (= ``x.dtype``) for every matmul, one device."""
    dt, dev = x.dtype, x.device
    if dt not in (torch.float32, torch.float16, torch.bfloat16):
        return f"input dtype {dt}"
    autocast = torch.is_autocast_enabled(dev.type)
    if autocast and torch.get_autocast_dtype(dev.type) != dt:
        return "autocast would change the math dtype"
    for m in members:
        if m.q4 is None:
            if m.weight.dtype != dt or m.weight.device != dev:
                return "base weight dtype/device differs from the input"
            if m.bias is not None and (m.bias.dtype != dt or m.bias.device != dev):
                return "base bias dtype/device differs from the input"
        else:
            # Linear4bit's own rule: compute_dtype, or the autocast dtype off the CPU (which equals
            # dt when we get here).
            q4 = m.q4
            if (q4.compute_dtype != dt and not (autocast and dev.type != "cpu")) or q4.weight.device != dev:
                return "4-bit compute dtype/device differs from the input"
            if m.bias is not None and m.bias.device != dev:
                return "base bias device differs from the input"
        if m.a is not None and (m.a.device != dev or m.b.device != dev):
            return "adapter on another device"
    return None


def _call_ok(x: torch.Tensor, plan: _GroupPlan) -> bool:
    """:func:`_call_reason` once per plan and (dtype, device, autocast state)."""
    dev = x.device
    autocast = torch.is_autocast_enabled(dev.type)
    ctx = (x.dtype, dev, autocast, torch.get_autocast_dtype(dev.type) if autocast else None)
    if plan.ok_for == ctx:
        return True
    if _call_reason(x, plan.members) is not None:
        return False
    plan.ok_for = ctx
    return True


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
    """Base + LoRA outputs of projections sharing ``x``; ``params`` are the adapters (A_1, B_1, ...)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, plan: _GroupPlan, *params: torch.Tensor):  # noqa: D417
        dt = x.dtype
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        copies = plan.copies_for(dt, x.device) if plan.lora else None
        down = None if copies is None else torch.mm(x2, copies.a_cat.t())  # [tokens, sum r]: one GEMM
        outs = []
        j = 0
        for m in plan.members:
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
                y2.addmm_(down[:, m.lo : m.hi], copies.bs[j].t(), alpha=m.scaling)
                j += 1
            outs.append(y)
        need = ctx.needs_input_grad
        ctx.save_for_backward(x if any(need[2::2]) else None, down if any(need[3::2]) else None)
        # The plan and the copies (parameters, not activations) ride on ctx.
        ctx.plan, ctx.copies = plan, copies
        if copies is not None:
            ctx.gen, ctx.versions = copies.gen, copies.versions
        ctx.x_shape = x.shape
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    @once_differentiable  # its GEMMs write into preallocated outputs: no double backward
    def backward(ctx: Any, *dys: torch.Tensor | None):
        x, down = ctx.saved_tensors
        need = ctx.needs_input_grad
        copies = ctx.copies
        if copies is not None:
            _check_unchanged(ctx, copies)
        dx2 = _base_input_grad(ctx.plan.members, dys) if need[0] else None
        grads: list[torch.Tensor | None] = [None] * (len(need) - 2)
        if copies is not None:
            dx2 = _lora_grads(ctx, x, down, dys, dx2, grads)
            copies.stale = True  # a .data write after this backward must be seen by the next use
        dx = None if dx2 is None else dx2.view(ctx.x_shape)
        return (dx, None, *grads)


def _check_unchanged(ctx: Any, copies: _Copies) -> None:
    # The forward read these buffers: backward must use the same values. A same-dtype model reads
    # the parameters' values, so an in-place change of one is refused as autograd would.
    same_dtype = copies.dtype == copies.srcs[0].dtype
    if copies.gen != ctx.gen or (same_dtype and [p._version for p in copies.srcs] != ctx.versions):
        raise RuntimeError(
            "a LoRA weight used by the fused LoRA forward was modified in place before backward "
            "(an optimizer step or an in-place write between this forward and its backward)"
        )


def _base_input_grad(members: list[_Member], dys: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """``sum_i dy_i W_i`` accumulated in one buffer (``[tokens, in]``)."""
    dx2 = None
    for m, dy in zip(members, dys):
        if dy is None:
            continue
        w = m.dense(dy.dtype)  # 4-bit: dequantized again, into the scratch
        dy2 = dy.reshape(-1, m.out)
        if dx2 is None:
            dx2 = torch.mm(dy2, w)
        else:
            dx2.addmm_(dy2, w)
    return dx2


def _lora_grads(
    ctx: Any,
    x: torch.Tensor | None,
    down: torch.Tensor | None,
    dys: Sequence[torch.Tensor | None],
    dx2: torch.Tensor | None,
    grads: list[torch.Tensor | None],
) -> torch.Tensor | None:
    """Adapter gradients into ``grads`` (A_j at 2j, B_j at 2j+1); returns ``dx2`` plus the LoRA
    input gradient. ``gs = [s_1 dy_1 B_1 | s_2 dy_2 B_2 | ...]`` is built once; ``gs A_cat`` and
    ``gs^T x`` are then one GEMM each for the whole group."""
    need = ctx.needs_input_grad
    plan, copies = ctx.plan, ctx.copies
    need_x, need_a = need[0], any(need[2::2])
    gs = None
    if need_x or need_a:
        dt = next(dy.dtype for dy in dys if dy is not None)
        rows = math.prod(ctx.x_shape[:-1])
        gs = torch.empty((rows, copies.a_cat.shape[0]), dtype=dt, device=copies.a_cat.device)
    lora_dys = [dy for m, dy in zip(plan.members, dys) if m.a is not None]
    for j, (m, dy) in enumerate(zip(plan.lora, lora_dys)):
        if dy is None:
            if gs is not None:
                gs[:, m.lo : m.hi].zero_()
            continue
        dy2 = dy.reshape(-1, m.out)
        if gs is not None:
            gs[:, m.lo : m.hi].addmm_(dy2, copies.bs[j], beta=0, alpha=m.scaling)  # s * dy B
        if need[3 + 2 * j]:
            grads[2 * j + 1] = _mm_scaled(dy2.t(), down[:, m.lo : m.hi], m.scaling, m.b.dtype)
    if gs is None:
        return dx2
    if need_x:
        dx2 = torch.mm(gs, copies.a_cat) if dx2 is None else dx2.addmm_(gs, copies.a_cat)
    if need_a:
        x2 = x.reshape(-1, x.shape[-1])
        da = _mm_scaled(gs.t(), x2, 1.0, plan.lora[0].a.dtype)  # [sum r, in], fp32
        for j, m in enumerate(plan.lora):
            if need[2 + 2 * j]:
                grads[2 * j] = da[m.lo : m.hi]
    return dx2


# ------------------------------------------------------------------------------- entry points
def _apply(x: torch.Tensor, plan: _GroupPlan) -> tuple[torch.Tensor, ...]:
    params: list[torch.Tensor] = []
    for m in plan.lora:
        params += [m.a, m.b]
    return _LoraLinearsFunction.apply(x, plan, *params)


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
        layers: modules taking ``x``: :class:`FusableLora` layers (``LoraLinear``) over
            ``nn.Linear``/``Linear4bit``, or such a frozen base alone (e.g.
            ``[q_proj, k_proj, v_proj]``, ``[gate_proj, up_proj]``).

    Returns:
        Each layer's output ``[..., out_i]``, equal to ``tuple(layer(x) for layer in layers)``
        (which is what runs when the group cannot be fused; see :func:`fusable`).
    """
    if _ENABLED and layers and not _global_hooks():
        plan = _plan(layers, own_hooks=True)
        if not isinstance(plan, str) and _call_ok(x, plan):
            return _apply(x, plan)
    return tuple(layer(x) for layer in layers)


def fused_single(x: torch.Tensor, layer: nn.Module) -> torch.Tensor | None:
    """A :class:`FusableLora` layer's fused forward: ``layer(x)`` as one node, or ``None`` if not
    fusable. The layer's own hooks already ran (it is being called), so only its base's are checked.
    """
    if not _ENABLED or _global_hooks():
        return None
    plan = _plan((layer,), own_hooks=False)
    if isinstance(plan, str) or not _call_ok(x, plan):
        return None
    return _apply(x, plan)[0]
