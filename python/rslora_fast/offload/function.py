"""The autograd function of one offloaded checkpoint: forward saves nothing of the layer but its
input (parked in host memory by the Rust scheduler, or kept on the device), backward fetches the
input, replays the layer with the forward's RNG and autocast state, and backpropagates.

The schedule (what is offloaded, what comes back when, when memory may be reused) is decided by
``rslora_fast._core.OffloadScheduler``; this module only tells it where layer boundaries are and
hands it tensors.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["LayerCall", "OffloadedCheckpoint", "Parked", "stream_int"]


def stream_int(device: torch.device) -> int:
    """The current stream of ``device`` as the integer the scheduler takes (0 on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return 0


def _release_quietly(sched, handle: int) -> None:
    # A finalizer (any thread, maybe at shutdown): never raise. The scheduler orders the compute
    # stream after any copy still touching device memory before letting that memory go.
    try:
        sched.release(handle)
    except Exception:  # noqa: BLE001 - already released or interpreter shutting down
        pass


class Parked:
    """A tensor in the scheduler's host pool, tied to the autograd graph that needs it: the block
    is released after its backward, or when the graph goes away (an abandoned graph, an
    exception)."""

    __slots__ = ("__weakref__", "_release", "handle", "sched")

    def __init__(self, sched, handle: int):
        self.sched = sched
        self.handle = handle
        self._release = weakref.finalize(self, _release_quietly, sched, handle)

    def release(self) -> None:
        self._release()


@dataclass
class LayerCall:
    """Everything one checkpointed layer call needs to replay itself in backward."""

    fn: Any
    spec: Any
    flat: list
    grad_idx: list[int]
    params: list
    layer: int
    tokens: int
    sched: Any
    pass_: int
    offload: bool
    x_requires_grad: bool
    device: torch.device
    all_params: list  # every layer weight, trainable or not (not activations, for SavedBytes)
    measure: Any = None  # callable(saved_bytes, seconds) on the layer's first recompute, else None
    timer: Any = None  # the forward's start and end (CUDA events; None off CUDA)
    parked: Parked | None = None
    out_spec: Any = None
    out_leaves: list = field(default_factory=list)
    out_tensor_idx: list[int] = field(default_factory=list)
    rng_cpu: torch.Tensor | None = None
    rng_device: tuple[list[int], list[torch.Tensor]] = ([], [])
    autocast: list = field(default_factory=list)

    def run(self, x: torch.Tensor, grad_args) -> Any:
        flat = list(self.flat)
        for i, t in zip(self.grad_idx, grad_args):
            flat[i] = t
        rest, kwargs = tree_unflatten(flat, self.spec)
        return self.fn(x, *rest, **kwargs)


_AUTOCAST_TYPES = ("cuda", "cpu")


def _autocast_state() -> list:
    out = []
    for dt in _AUTOCAST_TYPES:
        if torch.is_autocast_enabled(dt):
            out.append((dt, torch.get_autocast_dtype(dt), torch.is_autocast_cache_enabled()))
    return out


class OffloadedCheckpoint(torch.autograd.Function):
    """Forward without saving activations; backward fetches the input, recomputes, backpropagates.

    Inputs: ``(call, x, *grad_args, *params)`` where ``grad_args`` are the other tensor arguments
    that require grad and ``params`` the layer's trainable parameters (so gradients reach them even
    when nothing else requires grad). Outputs: the tensor leaves of the layer's output.
    """

    @staticmethod
    def forward(ctx, call: LayerCall, x: torch.Tensor, *tensors: torch.Tensor):  # noqa: D417
        ctx.call = call
        ctx.set_materialize_grads(False)
        grad_args = tensors[: len(call.grad_idx)]
        # Like torch.utils.checkpoint(preserve_rng_state=True): recompute draws the same numbers.
        call.rng_cpu = torch.get_rng_state()
        if x.is_cuda:
            idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
            call.rng_device = ([idx], [torch.cuda.get_rng_state(idx)])
        call.autocast = _autocast_state()
        if call.offload:  # started before the layer runs, so the copy overlaps its compute
            src = x.contiguous()
            call.parked = Parked(call.sched, call.sched.offload_layer(call.layer, src, stream_int(x.device)))
        if call.measure is None:
            out = call.run(x, grad_args)
        else:
            start = _mark(x.device)
            out = call.run(x, grad_args)
            call.timer = (start, _mark(x.device))
        leaves, call.out_spec = tree_flatten(out)
        call.out_tensor_idx = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
        call.out_leaves = [None if isinstance(t, torch.Tensor) else t for t in leaves]
        if call.offload:
            ctx.save_for_backward(*grad_args)
        else:
            ctx.save_for_backward(x, *grad_args)
        return tuple(leaves[i] for i in call.out_tensor_idx)

    @staticmethod
    def backward(ctx, *grad_outs):
        call: LayerCall = ctx.call
        x, grad_args = _inputs_back(call, ctx.saved_tensors)
        x = x.detach().requires_grad_(call.x_requires_grad)
        grad_args = [t.detach().requires_grad_(True) for t in grad_args]
        out = _replay(call, x, grad_args)
        got = _grads(call, out, grad_outs, x, grad_args)
        if call.parked is not None:
            call.parked.release()
        gx = got.pop(0) if call.x_requires_grad else None
        return (None, gx, *got)


def _inputs_back(call: LayerCall, saved: tuple) -> tuple[torch.Tensor, tuple]:
    """The layer's input and other grad arguments; the scheduler first starts the copies back of
    the earlier layers its policy names, so they overlap this layer's recompute."""
    handle = call.parked.handle if call.parked is not None else None
    x = None
    if call.sched is not None:
        x = call.sched.fetch_layer(call.pass_, call.layer, handle, stream_int(call.device))
    if call.offload:
        return x, saved
    return saved[0], saved[1:]


def _replay(call: LayerCall, x: torch.Tensor, grad_args: list) -> Any:
    devices, states = call.rng_device
    with torch.random.fork_rng(devices=devices, enabled=True, device_type="cuda"):
        torch.set_rng_state(call.rng_cpu)
        for d, s in zip(devices, states):
            torch.cuda.set_rng_state(s, d)
        with torch.enable_grad(), _ReplayAutocast(call.autocast):
            if call.measure is None:
                return call.run(x, grad_args)
            with SavedBytes(call.all_params) as counted:
                out = call.run(x, grad_args)
            call.measure(counted.total, _seconds(*call.timer))
            return out


def _grads(call: LayerCall, out: Any, grad_outs: tuple, x: torch.Tensor, grad_args: list) -> list:
    leaves, _ = tree_flatten(out)
    outs, grads = [], []
    for j, i in enumerate(call.out_tensor_idx):
        t, g = leaves[i], grad_outs[j]
        if g is not None and isinstance(t, torch.Tensor) and t.requires_grad:
            outs.append(t)
            grads.append(g)
    inputs = ([x] if call.x_requires_grad else []) + grad_args + call.params
    if outs and inputs:
        return list(torch.autograd.grad(outs, inputs, grads, allow_unused=True))
    return [None] * len(inputs)


def _mark(device: torch.device):
    """A CUDA event on the compute stream; off CUDA nothing: a host timer would measure the load
    of the machine as much as the layer, and no decision off CUDA needs the time."""
    if device.type != "cuda":
        return None
    ev = torch.cuda.Event(enable_timing=True)
    ev.record(torch.cuda.current_stream(device))
    return ev


def _seconds(start, end) -> float:
    """GPU seconds between two marks (0 off CUDA); the forward finished long ago, so the sync
    costs nothing."""
    if start is None:
        return 0.0
    end.synchronize()
    return start.elapsed_time(end) / 1e3


class _ReplayAutocast:
    """Re-enter the autocast regions that were active in forward (none: a no-op)."""

    def __init__(self, state: list):
        self.ctxs = [torch.autocast(dt, dtype=dtype, cache_enabled=cache) for dt, dtype, cache in state]

    def __enter__(self):
        for c in self.ctxs:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.ctxs):
            c.__exit__(*exc)
        return False


class SavedBytes:
    """Count the bytes autograd saves for backward inside the block (budget-mode measurement)."""

    def __init__(self, exclude: list):
        self.total = 0
        # Weights are saved too but are not activations: they stay whatever the policy.
        self._seen: set = {p.untyped_storage().data_ptr() for p in exclude}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in self._seen:  # one storage counts once, whole (that is what stays alive)
            self._seen.add(key)
            self.total += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False
