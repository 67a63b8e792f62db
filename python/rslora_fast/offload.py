"""Offloaded gradient checkpointing ("unsloth" mode): decoder-layer inputs wait in host memory.

Each wrapped decoder layer runs as a checkpoint that keeps nothing on the device: in forward the
layer runs without saving activations and its input is copied to a reusable host pool by the Rust
scheduler (``rslora_fast._core.OffloadScheduler``), on a copy stream of its own, while the next
layers compute. In backward, while layer ``i`` recomputes, the inputs of layers ``i-1 ..
i-lookahead`` are already being copied back; layer ``i`` then waits (on the device, not the host)
for its own input, recomputes with grad and backpropagates. The last layer's input stays on the
device (its copy could not be hidden); sequences shorter than ``min_tokens`` use plain
checkpointing (the copy would cost more than it saves). On a CPU the host transport (``memcpy``)
runs the same code path.

Use::

    handle = install_offloaded_checkpointing(model)   # a transformers decoder model
    ...train...
    uninstall_offloaded_checkpointing(handle)

Correctness rules kept here: the caching allocator may not reuse a tensor a copy still reads or
writes (we hold it until the compute stream has waited for that copy; see ``_HostCopy``); RNG state (dropout) and autocast state are
replayed on recompute as ``torch.utils.checkpoint`` does, so results equal plain checkpointing
bitwise; parameter gradients are returned by the autograd function itself, so LoRA weights get
gradients even when no layer input requires grad; every host buffer is released when its graph
goes away, including after an exception.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import _native

logger = logging.getLogger(__name__)

__all__ = [
    "OffloadedCheckpointing",
    "find_decoder_layers",
    "install_offloaded_checkpointing",
    "uninstall_offloaded_checkpointing",
]

_CACHE_KWARGS = ("past_key_values", "layer_past", "past_key_value")


def _scheduler_class():
    return _native.core().OffloadScheduler  # the extension, at first use


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the ``nn.ModuleList`` of decoder layers of a transformers decoder model.

    Looks at the usual places (``model.model.layers``, ``model.layers``, ``transformer.h``,
    ``gpt_neox.layers``, ...) through PEFT-style wrappers, then falls back to the longest
    ``ModuleList`` whose items are all of one class.

    Raises:
        ValueError: when no such list exists.
    """
    inner = getattr(model, "get_base_model", None)  # PEFT-style wrappers
    base = inner() if callable(inner) else model
    candidates = (
        "model.layers",
        "layers",
        "model.decoder.layers",
        "decoder.layers",
        "transformer.h",
        "transformer.layers",
        "gpt_neox.layers",
        "model.language_model.layers",
        "language_model.model.layers",
    )
    for path in candidates:
        obj: Any = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    best: nn.ModuleList | None = None
    for mod in base.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if len({type(m) for m in mod}) == 1 and (best is None or len(mod) > len(best)):
                best = mod
    if best is None:
        raise ValueError(f"{type(model).__name__}: no nn.ModuleList of decoder layers found")
    return best


# --------------------------------------------------------------------------------------------
# One offloaded layer input
# --------------------------------------------------------------------------------------------


def _release_quietly(sched, handle: int, stream: int, busy: list) -> None:
    # Runs from a finalizer (any thread, maybe at shutdown): never raise. ``busy`` holds the device
    # tensors a copy may still be reading (the source) or writing (a prefetch buffer nobody waited
    # for); the compute stream is ordered after that copy before they go back to the allocator.
    try:
        if any(t is not None for t in busy):
            sched.wait(handle, stream)
            busy[:] = [None] * len(busy)
        sched.release(handle)
    except Exception:  # noqa: BLE001 - already released or interpreter shutting down
        pass


class _HostCopy:
    """A layer input parked in the host pool; releases its block when it is freed.

    Stream safety without ``record_stream`` (whose host-side bookkeeping keeps a block busy until
    the host *observes* the copy's event, so a host running ahead of the GPU would see every
    offloaded input still allocated): a device tensor that a copy reads or writes is held in
    ``_busy`` until the compute stream has waited (on the device) for that copy; only then may the
    allocator reuse it, in stream order. The finalizer does the same for copies nobody waited for
    (an abandoned graph, an exception between prefetch and use).
    """

    __slots__ = ("__weakref__", "_busy", "_done", "device", "dst", "dtype", "handle", "owner", "sched", "shape",
                 "stream")  # fmt: skip

    def __init__(self, owner: OffloadedCheckpointing, x: torch.Tensor):
        self.owner = owner
        self.sched = owner._scheduler(x.device)
        self.shape = x.shape
        self.dtype = x.dtype
        self.device = x.device
        self.dst: torch.Tensor | None = None
        src = x if x.is_contiguous() else x.contiguous()
        self.stream = owner._stream_int(x.device)
        self.handle = self.sched.offload(src.data_ptr(), src.numel() * src.element_size(), self.stream)
        # [source being read, prefetch buffer being written]; shared with the finalizer. The host
        # transport copies synchronously, so nothing is busy there.
        self._busy: list = [src if x.is_cuda else None, None]
        self._done = weakref.finalize(
            self, _release_quietly, self.sched, self.handle, self.stream, self._busy
        )
        owner._register(self)
        warning = self.sched.take_warning()
        if warning:
            warnings.warn(warning, RuntimeWarning, stacklevel=2)

    def settle(self) -> None:
        """Order the compute stream after the copy out and let the source go (no host sync)."""
        if self._busy[0] is not None:
            self.sched.wait(self.handle, self.stream)
            self._busy[0] = None

    def prefetch(self) -> None:
        """Start the copy back into a fresh device buffer (no-op when already started)."""
        if self.dst is not None:
            return
        if not self._done.alive:
            raise RuntimeError(
                "an offloaded activation was used after its release (backward through an offloaded "
                "checkpoint twice, e.g. retain_graph=True, is not supported)"
            )
        self.settle()
        dst = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self.sched.prefetch(self.handle, dst.data_ptr(), self.owner._stream_int(self.device))
        self.dst = dst
        if dst.is_cuda:
            self._busy[1] = dst

    def fetch(self) -> torch.Tensor:
        """The input back on the device, ordered before later work on the current stream."""
        self.prefetch()
        self.sched.wait(self.handle, self.owner._stream_int(self.device))
        self._busy[1] = None
        return self.dst

    def release(self) -> None:
        """Give the host block back (idempotent); waits on the device for any copy still running."""
        self._done()
        self.dst = None


# --------------------------------------------------------------------------------------------
# The autograd function
# --------------------------------------------------------------------------------------------


@dataclass
class _Call:
    """Everything one checkpointed layer call needs to replay itself in backward."""

    owner: OffloadedCheckpointing
    fn: Any
    spec: Any
    flat: list
    grad_idx: list[int]
    params: list
    offload: bool
    x_requires_grad: bool
    index: int
    tokens: int
    before: int = 0
    pass_start: int = 0
    sched: Any = None
    host: _HostCopy | None = None
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


class _OffloadedCheckpoint(torch.autograd.Function):
    """Forward without saving activations; backward fetches the input, recomputes, backpropagates.

    Inputs: ``(call, x, *grad_args, *params)`` where ``grad_args`` are the other tensor arguments
    that require grad and ``params`` the layer's trainable parameters (so gradients reach them even
    when nothing else requires grad). Outputs: the tensor leaves of the layer's output.
    """

    @staticmethod
    def forward(ctx, call: _Call, x: torch.Tensor, *tensors: torch.Tensor):  # noqa: D417
        ctx.call = call
        ctx.set_materialize_grads(False)
        n_args = len(call.grad_idx)
        grad_args = tensors[:n_args]
        # Like torch.utils.checkpoint(preserve_rng_state=True): recompute draws the same numbers.
        call.rng_cpu = torch.get_rng_state()
        if x.is_cuda:
            idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
            call.rng_device = ([idx], [torch.cuda.get_rng_state(idx)])
        call.autocast = _autocast_state()
        if call.offload:  # started before the layer runs, so the copy overlaps its compute
            call.host = _HostCopy(call.owner, x)
            call.owner._settle_older(call.host)
        out = call.run(x, grad_args)
        leaves, call.out_spec = tree_flatten(out)
        call.out_tensor_idx = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
        call.out_leaves = [None if isinstance(t, torch.Tensor) else t for t in leaves]
        if call.offload:
            ctx.save_for_backward(*grad_args)
        else:
            call.owner._settle_older(None)  # last layer: every copy out may finish now
            ctx.save_for_backward(x, *grad_args)
        return tuple(leaves[i] for i in call.out_tensor_idx)

    @staticmethod
    def backward(ctx, *grad_outs):
        call: _Call = ctx.call
        saved = ctx.saved_tensors
        # Start the next inputs' copies first, so they overlap this layer's recompute.
        call.owner._prefetch_ahead(call)
        if call.offload:
            x = call.host.fetch()
            grad_args = saved
        else:
            x, grad_args = saved[0], saved[1:]
        x = x.detach().requires_grad_(call.x_requires_grad)
        grad_args = [t.detach().requires_grad_(True) for t in grad_args]
        devices, states = call.rng_device
        with torch.random.fork_rng(devices=devices, enabled=True, device_type="cuda"):
            torch.set_rng_state(call.rng_cpu)
            for d, s in zip(devices, states):
                torch.cuda.set_rng_state(s, d)
            with torch.enable_grad(), _ReplayAutocast(call.autocast):
                if call.owner._wants_measure(call):
                    with _SavedBytes(list(call.owner._frozen_and_trainable(call))) as counted:
                        out = call.run(x, grad_args)
                    call.owner._record_measure(call, counted.total)
                else:
                    out = call.run(x, grad_args)
        leaves, _ = tree_flatten(out)
        outs, grads = [], []
        for j, i in enumerate(call.out_tensor_idx):
            t, g = leaves[i], grad_outs[j]
            if g is not None and isinstance(t, torch.Tensor) and t.requires_grad:
                outs.append(t)
                grads.append(g)
        inputs = ([x] if call.x_requires_grad else []) + grad_args + call.params
        if outs and inputs:
            got = list(torch.autograd.grad(outs, inputs, grads, allow_unused=True))
        else:
            got = [None] * len(inputs)
        if call.host is not None:
            call.host.release()
        gx = got.pop(0) if call.x_requires_grad else None
        return (None, gx, *got)


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


class _SavedBytes:
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


# --------------------------------------------------------------------------------------------
# Installation
# --------------------------------------------------------------------------------------------


@dataclass
class _LayerState:
    layer: nn.Module
    index: int
    is_last: bool
    orig_forward: Any
    had_instance_forward: bool
    old_gc: Any
    params: list = field(default_factory=list)


class OffloadedCheckpointing:
    """The handle returned by :func:`install_offloaded_checkpointing`.

    Attributes:
        lookahead: inputs being copied back ahead of the layer that recomputes.
        min_tokens: below this many tokens per layer call, plain checkpointing is used.
        host_cap_bytes: cap on the host pool of each device (``None``: unbounded; the installer
            passes its default cap unless asked for ``float("inf")``).
        max_memory_gb: budget for activations kept on the device without recompute (``None``:
            every layer is checkpointed).
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        *,
        lookahead: int,
        min_tokens: int,
        host_cap_bytes: int | None,
        max_memory_gb: float | None,
        last_index: int,
    ):
        self.layers = layers
        self.lookahead = int(lookahead)
        self.min_tokens = int(min_tokens)
        self.host_cap_bytes = host_cap_bytes
        self.max_memory_gb = max_memory_gb
        self._budget = None if max_memory_gb is None else int(max_memory_gb * (1 << 30))
        self._kept_bytes = 0
        self._kept_layers = 0
        self._bytes_per_token: dict[int, float] = {}
        self._schedulers: dict[Any, Any] = {}
        self._copy_streams: dict[Any, Any] = {}
        self._records: dict[tuple[int, int], weakref.ref] = {}
        self._unsettled: list[weakref.ref] = []
        self._pass_start: int | None = None
        self._lock = threading.Lock()
        self._logged: set[str] = set()
        self._states: list[_LayerState] = []
        self._last_index = last_index
        self.installed = False

    # -- devices ---------------------------------------------------------------------------

    def _scheduler(self, device: torch.device):
        key = (device.type, device.index if device.type != "cpu" else None)
        sched = self._schedulers.get(key)
        if sched is None:
            with self._lock:
                sched = self._schedulers.get(key)
                if sched is None:
                    cls = _scheduler_class()
                    index = None
                    if device.type == "cuda":
                        index = device.index if device.index is not None else torch.cuda.current_device()
                    sched = cls(device=index, lookahead=self.lookahead, host_cap_bytes=self.host_cap_bytes)
                    self._schedulers[key] = sched
        return sched

    def _copy_stream(self, device: torch.device):
        s = self._copy_streams.get(device)
        if s is None:
            sched = self._scheduler(device)
            s = torch.cuda.ExternalStream(sched.copy_stream, device=device)
            self._copy_streams[device] = s
        return s

    @staticmethod
    def _stream_int(device: torch.device) -> int:
        if device.type == "cuda":
            return torch.cuda.current_stream(device).cuda_stream
        return 0

    def _register(self, host: _HostCopy) -> None:
        self._records[(id(host.sched), host.handle)] = weakref.ref(host)

    def _log_once(self, key: str, msg: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.info(msg)

    # -- the policy ------------------------------------------------------------------------

    def _prefetch_ahead(self, call: _Call) -> None:
        if self.lookahead <= 0 or call.sched is None:
            return
        for h in call.sched.plan_prefetch(call.before):
            if h < call.pass_start:  # another graph's input (two graphs alive): not ours to fetch
                continue
            ref = self._records.get((id(call.sched), h))
            host = ref() if ref is not None else None
            if host is not None:
                host.prefetch()

    def _settle_older(self, newest: _HostCopy | None) -> None:
        """Settle every copy out but ``newest`` (which overlaps the layer about to run).

        Each layer's input copy thus has its own layer and the next one to finish before the compute
        stream waits for it; the source's memory is then free in stream order.
        """
        for ref in self._unsettled:
            h = ref()
            if h is not None and h is not newest and h._done.alive:
                h.settle()
        # weak: an abandoned graph (exception) must still free its copies
        self._unsettled = [weakref.ref(newest)] if newest is not None else []

    def _forget_dead_records(self) -> None:
        dead = [k for k, r in self._records.items() if r() is None or not r()._done.alive]
        for k in dead:
            self._records.pop(k, None)

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

        # As transformers' own checkpointing does: a recompute would update a cache twice.
        kwargs = dict(kwargs)
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        if not getattr(layer, "_can_checkpoint_with_cache", False):
            for name in _CACHE_KWARGS:
                if kwargs.get(name) is not None:
                    kwargs[name] = None
                    self._log_once("cache", "offloaded checkpointing: caching disabled during training")

        tokens = x.numel() // max(1, x.shape[-1])
        if st.index == 0:
            self._kept_bytes = 0  # a new forward pass begins
            self._kept_layers = 0
            self._pass_start = None
            self._forget_dead_records()
        if self._keep_on_device(st, x, tokens):
            return st.orig_forward(x, *rest, **kwargs)

        flat, spec = tree_flatten((rest, kwargs))
        grad_idx = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.requires_grad]
        grad_args = [flat[i] for i in grad_idx]
        flat = [None if i in grad_idx else t for i, t in enumerate(flat)]
        params = [p for p in layer.parameters() if p.requires_grad]
        if not (params or grad_args or x.requires_grad):
            return st.orig_forward(x, *rest, **kwargs)  # nothing to differentiate: no graph
        offload = (not st.is_last) and tokens >= self.min_tokens and x.device.type in ("cuda", "cpu")
        if not st.is_last and tokens < self.min_tokens:
            self._log_once(
                "short",
                f"offloaded checkpointing: {tokens} tokens < min_tokens={self.min_tokens}; "
                "plain checkpointing for such calls (the copy would not pay)",
            )
        call = _Call(
            owner=self,
            fn=st.orig_forward,
            spec=spec,
            flat=flat,
            grad_idx=grad_idx,
            params=params,
            offload=offload,
            x_requires_grad=x.requires_grad,
            index=st.index,
            tokens=tokens,
        )
        if x.device.type in ("cuda", "cpu") and self.lookahead > 0:
            call.sched = self._scheduler(x.device)
            # Offloads made before this point belong to earlier layers (of this pass from pass_start).
            call.before = call.sched.next_handle()
            if self._pass_start is None:
                self._pass_start = call.before
            call.pass_start = self._pass_start
        outs = _OffloadedCheckpoint.apply(call, x, *grad_args, *params)
        if not isinstance(outs, tuple):
            outs = (outs,)
        leaves = list(call.out_leaves)
        for i, t in zip(call.out_tensor_idx, outs):
            leaves[i] = t
        return tree_unflatten(leaves, call.out_spec)

    # -- memory budget ---------------------------------------------------------------------

    def _keep_on_device(self, st: _LayerState, x: torch.Tensor, tokens: int) -> bool:
        """Budget mode: run this layer without checkpointing when its activations fit.

        A layer's saved bytes per token are measured during its first recompute (so the first
        step checkpoints every layer); afterwards layers are kept, in forward order, while the
        kept activations of this forward pass stay within the budget.
        """
        if self._budget is None:
            return False
        per_token = self._bytes_per_token.get(st.index)
        if per_token is None:
            return False
        need = int(per_token * tokens)
        keep = self._kept_bytes + need <= self._budget
        if keep:
            self._kept_bytes += need
            self._kept_layers += 1
        if st.is_last:
            s = self.budget_stats()
            self._log_once(
                "budget",
                f"offloaded checkpointing: memory budget {self.max_memory_gb:g} GiB keeps {s['kept_layers']} of "
                f"{s['layers']} decoder layers without recompute ({s['kept_bytes'] / 2**30:.2f} GiB of "
                f"activations at {tokens} tokens per call)",
            )
        return keep

    def _frozen_and_trainable(self, call: _Call):
        return self._states[call.index].layer.parameters()

    def _wants_measure(self, call: _Call) -> bool:
        return self._budget is not None and call.index not in self._bytes_per_token

    def _record_measure(self, call: _Call, saved_bytes: int) -> None:
        # The recompute saves what an un-checkpointed forward would keep, plus the input (kept
        # by the caller in that case too).
        self._bytes_per_token[call.index] = saved_bytes / max(1, call.tokens)

    # -- lifecycle -------------------------------------------------------------------------

    def budget_stats(self) -> dict:
        """What the memory budget kept in the latest forward pass.

        Returns:
            ``{"budget_bytes", "kept_layers", "kept_bytes", "layers"}``: the budget (``None`` without
            ``max_memory_gb``), the layers run without checkpointing and their measured activation bytes
            (0 in the first training step, which measures every layer), and the number of decoder layers.
        """
        return {
            "budget_bytes": self._budget,
            "kept_layers": self._kept_layers,
            "kept_bytes": self._kept_bytes,
            "layers": len(self._states),
        }

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
        n = 0
        for ref in list(self._records.values()):
            host = ref()
            if host is not None and host._done.alive:
                host.release()
                n += 1
        self._records.clear()
        self._unsettled = []
        for sched in list(self._schedulers.values()):
            n += sched.release_all()
        return n

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
        self._copy_streams.clear()
        self.installed = False


# Launchers' names for "processes on this host" (torchrun/accelerate, Slurm, Open MPI, MPICH/Intel MPI).
# SLURM_TASKS_PER_NODE is always set and may read "4(x2)" or "4,4" (this node's count comes first).
_LOCAL_PROCESS_VARS = (
    "LOCAL_WORLD_SIZE",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MPI_LOCALNRANKS",
)
# cgroup v2 and v1 memory limits at the root of this process's cgroup view: a container sees the
# host's RAM in sysconf, not its own limit. Without a cgroup namespace (Slurm, systemd slices) the
# process's own cgroup and its parents are read too (see _own_cgroup_limits).
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _own_cgroup_limits() -> list[str]:
    """``memory.max`` of this process's cgroup v2 and each parent (the ``0::<path>`` line)."""
    try:
        with open("/proc/self/cgroup") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        if line.startswith("0::"):
            parts = [p for p in line[3:].split("/") if p]
            for i in range(len(parts), 0, -1):
                out.append("/sys/fs/cgroup/" + "/".join(parts[:i]) + "/memory.max")
    return out


def _host_memory_bytes() -> int | None:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = None
    for path in (*_CGROUP_LIMITS, *_own_cgroup_limits()):
        try:
            with open(path) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) or a huge sentinel (v1) mean no limit
            limit = int(text)
            total = limit if total is None else min(total, limit)
    return total


def _local_processes() -> int:
    for var in _LOCAL_PROCESS_VARS:
        value = os.environ.get(var, "")
        head = value.split("(")[0].split(",")[0]  # Slurm may write "4(x2)" or "4,4"
        if head.isdigit() and int(head) > 0:
            return int(head)
    return 1


def default_host_cap_bytes() -> int | None:
    """Half of the host memory this process may use (the smaller of physical RAM and a cgroup
    limit), divided among this host's processes (torchrun, Slurm or MPI launcher variables);
    ``None`` when unknown."""
    total = _host_memory_bytes()
    return None if total is None else total // 2 // _local_processes()


def install_offloaded_checkpointing(
    model: nn.Module,
    *,
    lookahead: int = 1,
    min_tokens: int = 512,
    host_cap_bytes: int | float | None = None,
    max_memory_gb: float | None = None,
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
            recompute: layers whose saved activations fit (measured per layer on a short probe)
            run un-checkpointed, the rest are offloaded.

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
    if max_memory_gb is not None and max_memory_gb < 0:
        raise ValueError("max_memory_gb must be >= 0")
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
