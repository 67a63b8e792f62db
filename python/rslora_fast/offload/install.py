"""Installing offloaded checkpointing on a model: each decoder layer's forward is wrapped so that
training calls run as an :class:`~rslora_fast.offload.function.OffloadedCheckpoint`.

Python marks layer boundaries (:meth:`OffloadScheduler.begin_layer` per layer call) and hands the
tensors over; what each layer does (offload its input, keep it, or run without recompute under
``max_memory_gb``) and the order inputs come back in backward are decided by the Rust scheduler,
one per device.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .. import _native
from ..models.layers import find_decoder_layers
from .function import LayerCall, OffloadedCheckpoint
from .host_memory import default_host_cap_bytes
from .saving import SaveHooks

logger = logging.getLogger("rslora_fast.offload")

__all__ = ["OffloadedCheckpointing", "install_offloaded_checkpointing", "uninstall_offloaded_checkpointing"]

_CACHE_KWARGS = ("past_key_values", "layer_past", "past_key_value")
_COPYABLE = ("cuda", "cpu")
SAVE_POLICIES = ("never", "auto", "always")
# max_memory_gb="auto": the device's free memory at the first measured step, minus this margin
# (the backward's transient buffers, the optimizer's first allocations, fragmentation).
AUTO_MARGIN_BYTES = 2 << 30
AUTO_MARGIN_FRACTION = 0.10


def _scheduler_class():
    return _native.core().OffloadScheduler  # the extension, at first use


@dataclass
class _LayerState:
    layer: nn.Module
    index: int
    is_last: bool
    orig_forward: Any
    had_instance_forward: bool
    old_gc: Any


class OffloadedCheckpointing:
    """The handle returned by :func:`install_offloaded_checkpointing`.

    Attributes:
        lookahead: inputs being copied back ahead of the layer that recomputes.
        min_tokens: below this many tokens per layer call, plain checkpointing is used.
        host_cap_bytes: cap on the host pool of each device (``None``: unbounded; the installer
            passes its default cap unless asked for ``float("inf")``).
        max_memory_gb: budget for activations kept on the device without recompute (``None``:
            every layer is checkpointed; ``"auto"``: the device's free memory minus a margin).
        save_policy: ``"never"``, ``"auto"`` or ``"always"``: when a layer skips its recompute by
            parking the tensors it saves in host memory (see :func:`install_offloaded_checkpointing`).
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        *,
        lookahead: int,
        min_tokens: int,
        host_cap_bytes: int | None,
        max_memory_gb: float | str | None,
        last_index: int,
        save_policy: str = "never",
    ):
        self.layers = layers
        self.lookahead = int(lookahead)
        self.min_tokens = int(min_tokens)
        self.host_cap_bytes = host_cap_bytes
        self.max_memory_gb = max_memory_gb
        self.save_policy = save_policy
        self.min_parked_bytes: int | None = None  # saved tensors below it stay (None: Rust's 64 KiB)
        self._auto_budget = max_memory_gb == "auto"
        if max_memory_gb is None:
            self._budget = None
        elif self._auto_budget:
            self._budget = 0  # measured layers first; set from free memory once they are
        else:
            self._budget = int(max_memory_gb * (1 << 30))
        self._schedulers: dict[Any, Any] = {}
        self._lock = threading.Lock()
        self._logged: set[str] = set()
        self._states: list[_LayerState] = []
        self._last_index = last_index
        self.installed = False

    def scheduler(self, device: torch.device):
        """The Rust scheduler of ``device`` (made on first use): it owns the schedule."""
        key = (device.type, device.index if device.type != "cpu" else None)
        sched = self._schedulers.get(key)
        if sched is None:
            with self._lock:
                sched = self._schedulers.get(key)
                if sched is None:
                    index = None
                    if device.type == "cuda":
                        index = device.index if device.index is not None else torch.cuda.current_device()
                    sched = _scheduler_class()(
                        device=index,
                        lookahead=self.lookahead,
                        host_cap_bytes=self.host_cap_bytes,
                        min_tokens=self.min_tokens,
                        last_layer=self._last_index,
                        budget_bytes=self._budget,
                        save=self.save_policy,
                        link_bytes_per_s=_link_bandwidth(device) if self.save_policy == "auto" else None,
                        min_parked_bytes=self.min_parked_bytes,
                    )
                    self._schedulers[key] = sched
        return sched

    def _log_once(self, key: str, msg: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.info(msg)

    # -- the wrapped forward ---------------------------------------------------------------

    def _forward(self, st: _LayerState, args: tuple, kwargs: dict):
        layer = st.layer
        if not (torch.is_grad_enabled() and layer.training):
            return st.orig_forward(*args, **kwargs)
        if args:
            x, rest = args[0], args[1:]
        elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
            kwargs = dict(kwargs)
            x, rest = kwargs.pop("hidden_states"), ()
        else:
            return st.orig_forward(*args, **kwargs)
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return st.orig_forward(*args, **kwargs)
        kwargs = self._without_cache(layer, kwargs)
        tokens = x.numel() // max(1, x.shape[-1])
        sched = self.scheduler(x.device)
        if st.index == 0 and self._auto_budget:
            self._set_auto_budget(sched, x.device)
        pass_, plan = sched.begin_layer(st.index, tokens, x.device.type in _COPYABLE)
        self._log_plan(st, plan, tokens, sched)
        if plan == "keep":
            return st.orig_forward(x, *rest, **kwargs)
        if plan == "save":
            weights = {p.untyped_storage().data_ptr() for p in st.layer.parameters()}
            with SaveHooks(sched, st.index, pass_, x.device, weights).hooks():
                return st.orig_forward(x, *rest, **kwargs)
        return self._checkpointed(st, sched, pass_, plan == "offload", x, rest, kwargs, tokens)

    def _set_auto_budget(self, sched, device: torch.device) -> None:
        """``max_memory_gb="auto"``: once every layer is measured, the budget is the device's free
        memory at the start of that step minus a margin (never on the CPU: no device budget)."""
        if device.type != "cuda" or any(sched.wants_measure(i) for i in range(len(self._states))):
            return
        free, total = torch.cuda.mem_get_info(device)
        margin = max(AUTO_MARGIN_BYTES, int(AUTO_MARGIN_FRACTION * total))
        self._budget = max(0, free - margin)
        sched.set_budget(self._budget)
        self._auto_budget = False

    def _without_cache(self, layer: nn.Module, kwargs: dict) -> dict:
        # As transformers' own checkpointing does: a recompute would update a cache twice.
        kwargs = dict(kwargs)
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        if not getattr(layer, "_can_checkpoint_with_cache", False):
            for name in _CACHE_KWARGS:
                if kwargs.get(name) is not None:
                    kwargs[name] = None
                    self._log_once("cache", "offloaded checkpointing: caching disabled during training")
        return kwargs

    def _checkpointed(self, st, sched, pass_: int, offload: bool, x, rest, kwargs, tokens: int):
        flat, spec = tree_flatten((rest, kwargs))
        grad_idx = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.requires_grad]
        grad_args = [flat[i] for i in grad_idx]
        flat = [None if i in grad_idx else t for i, t in enumerate(flat)]
        params = [p for p in st.layer.parameters() if p.requires_grad]
        if not (params or grad_args or x.requires_grad):
            return st.orig_forward(x, *rest, **kwargs)  # nothing to differentiate: no graph
        measure = None
        if sched.wants_measure(st.index):

            def measure(saved: int, seconds: float, _s=sched, _i=st.index, _t=tokens) -> None:
                _s.record_layer_cost(_i, saved, seconds, _t)

        call = LayerCall(
            fn=st.orig_forward,
            spec=spec,
            flat=flat,
            grad_idx=grad_idx,
            params=params,
            layer=st.index,
            tokens=tokens,
            sched=sched,
            pass_=pass_,
            offload=offload,
            x_requires_grad=x.requires_grad,
            device=x.device,
            all_params=list(st.layer.parameters()),
            measure=measure,
        )
        outs = OffloadedCheckpoint.apply(call, x, *grad_args, *params)
        if not isinstance(outs, tuple):
            outs = (outs,)
        leaves = list(call.out_leaves)
        for i, t in zip(call.out_tensor_idx, outs):
            leaves[i] = t
        return tree_unflatten(leaves, call.out_spec)

    def _log_plan(self, st: _LayerState, plan: str, tokens: int, sched) -> None:
        if plan == "short":
            self._log_once(
                "short",
                f"offloaded checkpointing: {tokens} tokens < min_tokens={self.min_tokens}; "
                "plain checkpointing for such calls (the copy would not pay)",
            )
        if st.is_last and not sched.wants_measure(st.index):
            self._log_once("plan", self._plan_line(sched.budget_stats(), tokens))

    def _plan_line(self, s: dict, tokens: int) -> str:
        """The one line per model: what is kept, parked, recomputed, and the PCIe bytes per step."""
        budget = "" if self._budget is None else f"memory budget {self._budget / 2**30:.3g} GiB "
        return (
            f"offloaded checkpointing: {budget}keeps {s['kept_layers']} of {len(self._states)} decoder "
            f"layers without recompute; {s['saved_layers']} run without recompute with their saved tensors "
            f"kept ({s['tensors_kept']}) or parked in host memory ({s['tensors_parked']}); "
            f"{s['recomputed_layers']} recomputed from their input; {s['kept_bytes'] / 2**30:.3g} GiB of "
            f"activations kept on the device; expected PCIe traffic {2 * s['parked_bytes'] / 2**30:.3g} GiB "
            f"per step (out and back) at {tokens} tokens per call (save policy {self.save_policy!r})"
        )

    # -- state and lifecycle ---------------------------------------------------------------

    def budget_stats(self) -> dict:
        """What the memory budget kept in the latest forward pass.

        Returns:
            ``{"budget_bytes", "kept_layers", "kept_bytes", "layers", ...}``: the budget (``None`` without
            ``max_memory_gb``), the layers run without checkpointing and the activation bytes kept on the
            device (0 in the first training step, which measures every layer), the number of decoder
            layers, and the save policy's counts (``saved_layers``, ``recomputed_layers``,
            ``tensors_kept``, ``tensors_parked``, ``parked_bytes``: bytes sent to host memory).
        """
        out: dict[str, Any] = {"budget_bytes": self._budget, "layers": len(self._states)}
        for kept in [s.budget_stats() for s in list(self._schedulers.values())]:
            for k, v in kept.items():
                if k != "budget_bytes":
                    out[k] = out.get(k, 0) + v
        for k in ("kept_layers", "kept_bytes", "saved_layers", "recomputed_layers", "parked_bytes"):
            out.setdefault(k, 0)
        return out

    def stats(self) -> dict:
        """Host-pool counters summed over devices (see ``OffloadScheduler.stats``)."""
        total: dict[str, Any] = {}
        for sched in list(self._schedulers.values()):
            for k, v in sched.stats().items():
                if isinstance(v, int) and not isinstance(v, bool):
                    total[k] = total.get(k, 0) + v
                else:
                    total.setdefault(k, v)
        return total

    def release_all(self) -> int:
        """Release every live host buffer (error recovery); returns how many there were."""
        return sum(sched.release_all() for sched in list(self._schedulers.values()))

    def uninstall(self) -> None:
        """Restore the layers' original forward and free the host pools."""
        if not self.installed:
            return
        for st in self._states:
            if st.had_instance_forward:
                st.layer.forward = st.orig_forward
            else:
                st.layer.__dict__.pop("forward", None)
            if st.old_gc is not None:
                st.layer.gradient_checkpointing = st.old_gc
            st.layer.__dict__.pop("_rslora_offload", None)
        self._states.clear()
        self.release_all()
        for sched in self._schedulers.values():
            sched.trim()
        self._schedulers.clear()
        self.installed = False


def _link_bandwidth(device: torch.device, nbytes: int = 64 << 20) -> float | None:
    """Measured device-to-pinned-host bandwidth in bytes per second (``None`` off CUDA)."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    stream = torch.cuda.current_stream(device)
    dst.copy_(src, non_blocking=True)  # warm
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    end.record(stream)
    end.synchronize()
    return 3 * nbytes / (start.elapsed_time(end) / 1e3)


def install_offloaded_checkpointing(
    model: nn.Module,
    *,
    lookahead: int = 1,
    min_tokens: int = 512,
    host_cap_bytes: int | float | None = None,
    max_memory_gb: float | str | None = None,
    save_policy: str = "never",
) -> OffloadedCheckpointing:
    """Run every decoder layer of ``model`` as an offloaded checkpoint (the "unsloth" mode).

    Call it on a transformers decoder model (or a PEFT wrapper of one) instead of, or after,
    ``model.gradient_checkpointing_enable()``: each layer's own checkpointing flag is switched off
    while installed so the two never nest. Only training-mode forwards with grad enabled are
    affected; evaluation and generation run the layers unchanged.

    Args:
        model: the model whose decoder layers (see :func:`find_decoder_layers`) are wrapped.
        lookahead: how many earlier layers' inputs are copied back ahead of the layer that
            recomputes in backward (0: each input is fetched just before its recompute).
        min_tokens: calls with fewer tokens (batch x sequence) use plain checkpointing, logged once.
        host_cap_bytes: cap on the host memory each device's pool may reserve. Before growing past
            it the pool frees its idle blocks of other sizes (lengths that changed); if that is not
            enough it raises ``MemoryError`` with the numbers. Default (``None``): half of the
            memory this process may use (physical RAM or its cgroup limit, whichever is smaller)
            shared by the processes of this host (``LOCAL_WORLD_SIZE``, Slurm or MPI variables), so
            a run whose sequence lengths vary cannot grow the pinned pool until the OS kills it.
            ``float("inf")``: no cap.
        max_memory_gb: optional budget (GiB) for activations kept on the device without any
            recompute: layers whose saved activations fit (measured per layer in the first step)
            run un-checkpointed, those whose recompute costs the most per byte first; with
            ``save_policy`` the rest of the budget is spent tensor by tensor in the layers that
            skip their recompute. ``"auto"``: the
            device's free memory once every layer is measured, minus the larger of 2 GiB and 10%
            of the device's memory (on the CPU: no budget).
        save_policy: when a layer skips its recompute by parking the tensors autograd saves for it
            in pinned host memory (brought back ahead of its backward) instead of recomputing from
            its input: ``"never"`` (default: today's checkpointing), ``"auto"`` (when the bytes the
            budget cannot hold cross the measured device-to-host link within the layer's measured
            forward time, so the copies hide behind compute), ``"always"`` (every measured layer but
            the last). Layers are measured in the first step, which checkpoints them all.

    Returns:
        A handle with ``stats()``, ``release_all()`` and ``uninstall()``.

    Raises:
        ValueError: if the model has no list of decoder layers, or is already installed.
    """
    layers = find_decoder_layers(model)
    if lookahead < 0 or min_tokens < 0:
        raise ValueError("lookahead and min_tokens must be >= 0")
    if host_cap_bytes is not None and not host_cap_bytes > 0:
        raise ValueError(
            f"host_cap_bytes must be positive (or float('inf') for no cap), got {host_cap_bytes}"
        )
    if host_cap_bytes is None:
        host_cap_bytes = default_host_cap_bytes()
    elif host_cap_bytes == float("inf"):
        host_cap_bytes = None  # explicitly unbounded
    else:
        host_cap_bytes = int(host_cap_bytes)
    if max_memory_gb is not None and max_memory_gb != "auto":
        if isinstance(max_memory_gb, str) or not max_memory_gb >= 0:
            raise ValueError(f'max_memory_gb must be a number >= 0 or "auto", got {max_memory_gb!r}')
    if save_policy not in SAVE_POLICIES:
        raise ValueError(f"save_policy must be one of {list(SAVE_POLICIES)}, got {save_policy!r}")
    if any("_rslora_offload" in layer.__dict__ for layer in layers):
        raise ValueError("offloaded checkpointing is already installed on this model")
    config = getattr(model, "config", None)
    n_run = getattr(config, "num_hidden_layers", None) or len(layers)
    last_index = min(len(layers), n_run) - 1
    handle = OffloadedCheckpointing(
        layers,
        lookahead=lookahead,
        min_tokens=min_tokens,
        host_cap_bytes=host_cap_bytes,
        max_memory_gb=max_memory_gb,
        last_index=last_index,
        save_policy=save_policy,
    )
    for i, layer in enumerate(layers):
        had = "forward" in layer.__dict__
        st = _LayerState(
            layer=layer,
            index=i,
            is_last=i >= last_index,
            orig_forward=layer.forward,
            had_instance_forward=had,
            old_gc=getattr(layer, "gradient_checkpointing", None),
        )
        if st.old_gc is not None:
            layer.gradient_checkpointing = False

        def forward(*args, _st=st, **kwargs):
            return handle._forward(_st, args, kwargs)

        layer.forward = forward
        layer._rslora_offload = handle
        handle._states.append(st)
    handle.installed = True
    return handle


def uninstall_offloaded_checkpointing(handle: OffloadedCheckpointing) -> None:
    """Undo :func:`install_offloaded_checkpointing` (restores forwards, frees the host pools)."""
    handle.uninstall()
