"""A layer run without recompute whose saved tensors go through the Rust save policy: autograd
hands each tensor it saves for backward to ``OffloadScheduler.pack_tensor`` (through
``torch.autograd.graph.saved_tensors_hooks``), which keeps it on the device or parks it in pinned
host memory; in backward the first tensor the layer reads starts the copies back of the earlier
layers the policy names, and each parked tensor comes back with its shape, strides and dtype.

Gradients are exactly those of the plain path: autograd's own saved tensors, moved bit for bit.
"""

from __future__ import annotations

import torch

from .function import Parked, stream_int

__all__ = ["SaveHooks"]

_COPYABLE = ("cuda", "cpu")


class _Packed:
    """A saved tensor parked on the host."""

    __slots__ = ("device", "parked")

    def __init__(self, parked: Parked, device: torch.device):
        self.parked = parked
        self.device = device


class SaveHooks:
    """``pack``/``unpack`` for one layer call planned ``"save"``."""

    def __init__(self, sched, layer: int, pass_: int, device: torch.device, weights: set[int]):
        self.sched = sched
        self.device = device  # the scheduler's device; tensors elsewhere (CPU RNG state) stay
        self.layer = layer
        self.pass_ = pass_
        self.weights = weights  # storages of the layer's weights: saved, but never activations

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, t: torch.Tensor):
        if t.untyped_storage().data_ptr() in self.weights:
            return t
        if t.device != self.device or t.is_sparse or t.numel() == 0 or t.device.type not in _COPYABLE:
            return _kept(t)
        src = t if _dense(t) else t.contiguous()
        handle = self.sched.pack_tensor(self.layer, src, stream_int(t.device))
        if handle is None:
            return _kept(t)
        return _Packed(Parked(self.sched, handle), t.device)

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        parked = packed.parked
        t = self.sched.fetch_layer(self.pass_, self.layer, parked.handle, stream_int(packed.device))
        parked.release()
        return t


def _kept(t: torch.Tensor) -> torch.Tensor:
    """A kept tensor without its autograd history: an op's saved output returned as is would hold
    its own node (a cycle the garbage collector cannot see, so an abandoned graph would leak)."""
    return t.detach() if t.grad_fn is not None else t


def _dense(t: torch.Tensor) -> bool:
    """Contiguous up to a permutation of its dimensions (what the scheduler copies as one range)."""
    if t.is_contiguous():
        return True
    dims = sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1)
    expected = 1
    for st, n in dims:
        if st != expected:
            return False
        expected *= n
    return True
