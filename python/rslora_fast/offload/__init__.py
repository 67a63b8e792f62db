"""Offloaded gradient checkpointing ("unsloth" mode): decoder-layer inputs wait in host memory.

Each wrapped decoder layer runs as a checkpoint that keeps nothing on the device: in forward the
layer runs without saving activations and its input is copied to a reusable host pool on a copy
stream of its own while the next layers compute. In backward, while layer ``i`` recomputes, the
inputs of layers ``i-1 .. i-lookahead`` are already being copied back; layer ``i`` then waits (on
the device, not the host) for its own input, recomputes with grad and backpropagates. The last
layer's input stays on the device (its copy could not be hidden); layer calls shorter than
``min_tokens`` use plain checkpointing (the copy would cost more than it saves). On a CPU the host
transport (``memcpy``) runs the same code path.

The Rust scheduler (``rslora_fast._core.OffloadScheduler``) owns the schedule: it decides per layer
call whether the layer is recomputed from an offloaded input, kept whole, or saved without
recompute (its saved tensors kept or parked one by one), which tensors come back when, and holds
every tensor a copy touches until the compute stream has waited for that copy. The files here:

* ``install``: wraps the decoder layers' forwards and marks layer boundaries for the scheduler.
* ``function``: the autograd function (forward without saving; backward fetch, replay, grad), with
  RNG and autocast replay so results equal plain checkpointing bitwise.
* ``saving``: a layer the policy runs without recompute; autograd's saved tensors go through the
  scheduler, which keeps each on the device or parks it in host memory (the save policy).
* ``host_memory``: the default cap on the pinned host pool.

Use::

    handle = install_offloaded_checkpointing(model)   # a transformers decoder model
    ...train...
    uninstall_offloaded_checkpointing(handle)
"""

from __future__ import annotations

from ..models.layers import find_decoder_layers
from .host_memory import default_host_cap_bytes
from .install import (
    OffloadedCheckpointing,
    install_offloaded_checkpointing,
    uninstall_offloaded_checkpointing,
)

__all__ = [
    "OffloadedCheckpointing",
    "default_host_cap_bytes",
    "find_decoder_layers",
    "install_offloaded_checkpointing",
    "uninstall_offloaded_checkpointing",
]
