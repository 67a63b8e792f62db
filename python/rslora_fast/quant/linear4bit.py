"""``Linear4bit``: a frozen NF4/FP4 linear layer that keeps its weight in 4 bits.

The weight lives once, as packed bytes plus a :class:`~rslora_fast.quant.functional.QuantState`.
Each forward (and each backward) dequantizes it into a scratch buffer shared by every
``Linear4bit`` of the same thread, device, CUDA stream, dtype and inference mode, hands that to
the matmul, and forgets it. Sharing is safe within one thread and one stream because the matmul
that reads the buffer is queued right after the dequantize that wrote it, and the next dequantize
is queued after that matmul. Two threads (or two streams) never share a buffer, so models can run
concurrently; buffers made under ``torch.inference_mode()`` are inference tensors and serve only
calls made under it, so generating under inference mode never breaks later training.

``state_dict`` uses bitsandbytes' key layout (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``,
``bias``), so checkpoints move between rslora_fast and transformers + bitsandbytes.

FSDP2 (:func:`rslora_fast.distributed.fully_shard_lora`) can only shard floating-point Parameters and
swaps a module's Parameters for gathered ones around forward/backward. For it,
:meth:`Linear4bit._expose_storage_as_params` carries the packed codes and the block scales as
frozen Parameters of a floating "carrier" dtype holding the same bytes (as bitsandbytes'
``quant_storage`` does for the codes), and :attr:`Linear4bit.quant_state` becomes a view rebuilt
from whatever Parameters the module holds when it is read.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..errors import QuantFormatError
from .functional import DequantPlan, QuantState, dequantize_4bit, quantize_4bit

__all__ = ["Linear4bit", "check_quant_args", "is_4bit_linear"]

_QUANT_TYPES = ("nf4", "fp4")
# Sentinel module prefix used to talk to QuantState's (de)serializers, whatever their separator
# convention; keys are re-rooted under the real state_dict prefix afterwards.
_SENTINEL = "__rslora_q__"
# Parameters holding the 4-bit storage once it is exposed (never cast, never trained).
_STORAGE_PARAMS = ("weight", "absmax", "nested_absmax")


def is_4bit_linear(module: nn.Module) -> bool:
    """True for a packed 4-bit linear layer (any class with ``is_4bit_linear = True``)."""
    return bool(getattr(type(module), "is_4bit_linear", False))


def check_quant_args(blocksize: int, quant_type: str) -> None:
    """Raise :class:`QuantFormatError` unless ``blocksize``/``quant_type`` are supported.

    Blocksizes are powers of two from 32 to 4096; quant types are ``"nf4"`` and ``"fp4"``.
    """
    if quant_type not in _QUANT_TYPES:
        raise QuantFormatError(f"unknown 4-bit quant type {quant_type!r}; expected one of {_QUANT_TYPES}")
    if (
        isinstance(blocksize, bool)
        or not isinstance(blocksize, int)
        or blocksize < 32
        or blocksize > 4096
        or blocksize & (blocksize - 1)
    ):
        raise QuantFormatError(f"blocksize {blocksize!r} not allowed; expected a power of two in 32..4096")


class _ThreadScratch:
    """One thread's scratch buffers: (device, stream, dtype, inference mode) -> flat buffer,
    each grown to the largest weight dequantized so far with that key."""

    __slots__ = ("__weakref__", "bufs")

    def __init__(self) -> None:
        self.bufs: dict[tuple, torch.Tensor] = {}


_LOCAL = threading.local()
# Linear4bit -> (weight Parameter, QuantState, its data_ptr, DequantPlan): the plan's cache, kept
# outside the module so deepcopy / pickling never copy it.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Every live thread's scratch, so clear_scratch() can release them all.
_ALL_SCRATCH: weakref.WeakSet[_ThreadScratch] = weakref.WeakSet()
_ALL_LOCK = threading.Lock()


def _thread_scratch() -> dict[tuple, torch.Tensor]:
    mine = getattr(_LOCAL, "scratch", None)
    if mine is None:
        mine = _LOCAL.scratch = _ThreadScratch()
        with _ALL_LOCK:
            _ALL_SCRATCH.add(mine)
    return mine.bufs


def clear_scratch() -> None:
    """Release every thread's dequantization scratch buffers (they are re-created on demand)."""
    with _ALL_LOCK:
        for scratch in list(_ALL_SCRATCH):
            scratch.bufs.clear()


def _packed_bytes(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """``packed`` as its ``ceil(n/2)`` uint8 code bytes (undoes a padded carrier-dtype view)."""
    nbytes = (state.numel + 1) // 2
    if packed.dtype == torch.uint8 and packed.numel() == nbytes:
        return packed
    return packed.reshape(-1).view(torch.uint8)[:nbytes].view(-1, 1)


def dequant_into_scratch(plan: DequantPlan, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight of ``plan`` in ``dtype``, written into this thread's scratch (one native
    call on a GPU); valid until the next dequantize on the same thread, stream and dtype."""
    stream = plan.stream()
    key = (plan.device, stream, dtype, torch.is_inference_mode_enabled())
    bufs = _thread_scratch()
    buf = bufs.get(key)
    if buf is None or buf.numel() < plan.numel:
        bufs.pop(key, None)  # first, so the caching allocator can reuse its memory
        buf = bufs[key] = torch.empty(plan.numel, device=plan.device, dtype=dtype)
    out = buf[: plan.numel].view(plan.shape)
    plan.run(out, stream)
    return out


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


class _Matmul4bit(torch.autograd.Function):
    """``y = x @ W.T + b`` with ``W`` dequantized on the fly, forward and backward.

    Backward keeps only the layer's :class:`DequantPlan` (the packed bytes and scales the module
    holds anyway); the dense weight is never saved, so activation memory does not grow by one
    dense weight per layer.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, plan: DequantPlan, bias: torch.Tensor | None) -> torch.Tensor:
        w = dequant_into_scratch(plan, x.dtype)
        ctx.plan = plan
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = dequant_into_scratch(ctx.plan, grad_out.dtype)
            grad_x = grad_out @ w
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias


class Linear4bit(nn.Module):
    """A linear layer whose frozen weight is stored 4-bit quantized (bitsandbytes-compatible).

    Attributes:
        in_features: input width.
        out_features: output width.
        weight: frozen ``nn.Parameter`` holding the packed uint8 codes, shape ``[ceil(in*out/2), 1]``
            (so ``weight.numel() * 2`` counts the logical parameters, as PEFT does); once
            :meth:`_expose_storage_as_params` ran (FSDP2), the same bytes viewed as a floating carrier
            dtype, padded to whole elements (``absmax`` / ``nested_absmax`` likewise).
        quant_state: the :class:`QuantState` (block scales, shape, original dtype, ...), or ``None``
            for an empty shell that has not been quantized or loaded yet.
        bias: a 16/32-bit ``nn.Parameter`` of shape ``[out_features]`` or ``None``.
        compute_dtype: dtype the weight is dequantized to and the matmul runs in.
        blocksize, quant_type, compress_statistics: quantization settings for
            :meth:`requantize_` (a loaded state keeps its own).

    Build one with :meth:`from_linear`, or construct an empty shell (e.g. on the ``meta`` device)
    and fill it with :meth:`requantize_` or ``load_state_dict``.
    """

    is_4bit_linear = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        compute_dtype: torch.dtype | None = None,
        blocksize: int = 64,
        quant_type: str = "nf4",
        compress_statistics: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Create an empty (not yet quantized) shell; ``dtype`` is the bias/compute dtype."""
        super().__init__()
        check_quant_args(blocksize, quant_type)
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"Linear4bit needs positive sizes, got in={in_features}, out={out_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.compress_statistics = bool(compress_statistics)
        self.compute_dtype = compute_dtype or dtype or torch.get_default_dtype()
        n = self.in_features * self.out_features
        self.weight = nn.Parameter(
            torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device), requires_grad=False
        )
        self.quant_state: QuantState | None = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=self.compute_dtype))
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ quant state
    @property
    def quant_state(self) -> QuantState | None:
        """The :class:`QuantState` of the stored weight (``None`` for an empty shell).

        Once :meth:`_expose_storage_as_params` ran, this is a fresh view on each read: the state's
        fixed fields (shape, blocksize, code tables, nested offset) with ``absmax`` /
        ``nested_absmax`` read from the Parameters the module holds right now (under FSDP2: the
        gathered ones inside forward and backward; outside, the local shards, left as DTensors).
        """
        template = self.__dict__.get("_qs_template")
        if template is None:
            return self.__dict__.get("_qs")
        return replace(
            template,
            absmax=self._storage_view("absmax"),
            nested_absmax=self._storage_view("nested_absmax") if template.nested else None,
        )

    @quant_state.setter
    def quant_state(self, state: QuantState | None) -> None:
        if state is not None and self.storage_exposed:
            # stays exposed: the new weight bytes and scales become the carrier Parameters
            self._register_storage(self._parameters["weight"], state, self.__dict__["_carrier"])
        else:
            if state is None and self.storage_exposed:  # emptied: drop the scale carriers too
                for name in ("absmax", "nested_absmax"):
                    self._parameters.pop(name, None)
            self.__dict__["_qs_template"] = None
            self.__dict__["_qs"] = state

    @property
    def storage_exposed(self) -> bool:
        """Whether codes and scales are carrier Parameters (see :meth:`_expose_storage_as_params`)."""
        return self.__dict__.get("_qs_template") is not None

    def _expose_storage_as_params(self, carrier: torch.dtype | None = None) -> None:
        """Hold the packed codes and the block scales as frozen floating Parameters, for FSDP2.

        FSDP2 shards only floating-point Parameters and replaces them by the gathered ones around
        forward and backward. Afterwards ``weight`` holds the code bytes, ``absmax`` the block
        scales (float32, or uint8 with double quantization) and, with double quantization,
        ``nested_absmax`` their float32 scales, each reinterpreted (not converted) as ``carrier``
        elements, zero-padded to whole elements: ``weight`` ``[ceil(bytes / size), 1]``, the others
        1-D. The 16/256-entry code tables and the nested offset stay in the state (replicated).
        Forward, backward, :meth:`dequantize`, ``quant_state`` and ``state_dict`` (bitsandbytes keys
        and dtypes) read through the carriers, so they behave as before. Idempotent.

        Args:
            carrier: a floating dtype; default ``compute_dtype``. Under an FSDP2
                ``MixedPrecisionPolicy(param_dtype=...)`` pass that dtype: FSDP2 then has nothing
                to cast (a cast would destroy the bytes).

        Raises:
            QuantFormatError: for an empty shell (nothing quantized or loaded yet).
            TypeError: if ``carrier`` is not a floating dtype, or the storage is already exposed
                with another carrier.
        """
        carrier = carrier or self.compute_dtype
        if not carrier.is_floating_point:
            raise TypeError(f"_expose_storage_as_params: carrier must be a floating dtype, got {carrier}")
        if self.storage_exposed:
            if carrier != self.__dict__["_carrier"]:
                raise TypeError(
                    f"storage already exposed as {self.__dict__['_carrier']}, cannot re-expose as {carrier}"
                )
            return
        state = self._require_state()
        self._register_storage(self._parameters["weight"], state, carrier)
        self.__dict__.pop("_qs", None)

    def _register_storage(self, packed: torch.Tensor, state: QuantState, carrier: torch.dtype) -> None:
        packed = _packed_bytes(packed.detach(), state)
        tensors = {"weight": packed, "absmax": state.absmax}
        if state.nested:
            tensors["nested_absmax"] = state.nested_absmax
        else:
            self._parameters.pop("nested_absmax", None)
        layout = {}
        for name, t in tensors.items():
            t = t.detach().contiguous()
            raw = t.reshape(-1).view(torch.uint8)
            size = torch.empty(0, dtype=carrier).element_size()
            if raw.numel() % size:
                raw = torch.cat([raw, raw.new_zeros(size - raw.numel() % size)])
            data = raw.view(carrier)
            setattr(
                self, name, nn.Parameter(data.view(-1, 1) if name == "weight" else data, requires_grad=False)
            )
            layout[name] = (t.dtype, t.numel() * t.element_size(), t.shape)
        self.__dict__["_carrier"] = carrier
        self.__dict__["_layout"] = layout
        # The template keeps no reference to the full scales: once FSDP2 swapped in its shards the
        # full tensors can be freed.
        empty = state.absmax.new_empty(0)
        self.__dict__["_qs_template"] = replace(
            state, absmax=empty, nested_absmax=empty.float() if state.nested else None
        )

    def _storage_view(self, name: str) -> torch.Tensor:
        """Carrier Parameter ``name`` read back in its own dtype and shape (a view, no copy).

        A sharded DTensor (FSDP2 outside forward) is returned as it is: its bytes are a slice.
        """
        param = self._parameters[name]
        dtype, nbytes, shape = self.__dict__["_layout"][name]
        if _is_dtensor(param):
            return param
        return param.reshape(-1).view(torch.uint8)[:nbytes].view(dtype).view(shape)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        quant_type: str = "nf4",
        compress_statistics: bool = True,
        device: torch.device | str | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> Linear4bit:
        """Quantize a dense ``nn.Linear`` into a new ``Linear4bit`` (on ``device``, default its own).

        The original dtype is recorded in the state; ``compute_dtype`` defaults to it.
        """
        w = linear.weight.detach()
        dev = torch.device(device) if device is not None else w.device
        compute_dtype = compute_dtype or w.dtype
        mod = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            blocksize=blocksize,
            quant_type=quant_type,
            compress_statistics=compress_statistics,
            device="meta",
        )
        mod.requantize_(w.to(dev))
        if linear.bias is not None:
            mod.bias = nn.Parameter(
                linear.bias.detach().to(dev, compute_dtype).clone(), requires_grad=linear.bias.requires_grad
            )
        return mod

    @torch.no_grad()
    def requantize_(self, dense: torch.Tensor) -> Linear4bit:
        """Replace the stored weight by ``dense`` ``[out, in]`` quantized in place (on its device)."""
        self._refuse_if_sharded("requantize_")
        if tuple(dense.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"requantize_: expected a weight of shape {(self.out_features, self.in_features)}, "
                f"got {tuple(dense.shape)}"
            )
        if not dense.is_floating_point():
            raise TypeError(f"requantize_: expected a floating weight, got {dense.dtype}")
        packed, state = quantize_4bit(
            dense.contiguous(),
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            compress_statistics=self.compress_statistics,
        )
        self._set_quantized(packed, state)
        return self

    def _set_quantized(self, packed: torch.Tensor, state: QuantState) -> None:
        shape = tuple(int(s) for s in state.shape)
        if shape != (self.out_features, self.in_features):
            raise QuantFormatError(
                f"quantized weight has shape {shape}, layer expects {(self.out_features, self.in_features)}"
            )
        n = self.out_features * self.in_features
        if packed.dtype != torch.uint8:
            # bitsandbytes may store the bytes viewed as another dtype (quant_storage); undo the view.
            packed = packed.contiguous().view(torch.uint8)
        packed = packed.reshape(-1, 1)
        if packed.shape[0] != (n + 1) // 2:
            raise QuantFormatError(
                f"packed weight has {packed.shape[0]} bytes, expected {(n + 1) // 2} for {shape}"
            )
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state
        self.blocksize = int(state.blocksize)
        self.quant_type = state.quant_type
        self.compress_statistics = state.nested_absmax is not None

    def _refuse_if_sharded(self, what: str) -> None:
        """Outside forward/backward an FSDP2-sharded layer holds only its slice of the bytes."""
        if _is_dtensor(self._parameters["weight"]):
            raise RuntimeError(
                f"Linear4bit.{what}: the 4-bit storage is an FSDP2 shard outside forward; {what} is not "
                "supported on a sharded model (save the adapter, then merge or export in one process)"
            )

    # ------------------------------------------------------------------ compute
    def _require_state(self) -> QuantState:
        if self.quant_state is None:
            raise QuantFormatError(
                "Linear4bit has no quantized weight yet (empty shell); load or requantize_ it first"
            )
        return self.quant_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` in ``compute_dtype``; the result is cast back to ``x``'s dtype."""
        state = self._require_state()
        in_dtype = x.dtype
        dt = self.compute_dtype
        if x.device.type != "cpu" and torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
        xc = x.to(dt)
        bias = None if self.bias is None else self.bias.to(dt)
        y = _Matmul4bit.apply(xc, self.dequant_plan(state), bias)
        return y.to(in_dtype) if in_dtype.is_floating_point else y

    def dequant_plan(self, state: QuantState | None = None) -> DequantPlan:
        """The :class:`DequantPlan` of the stored weight, built once and reused while the packed
        bytes, the state and the device stay the same (a new ``weight`` Parameter or
        ``quant_state``, as ``requantize_``, ``load_state_dict`` and ``.to()`` make, or a new
        storage under the Parameter, builds a new one). With the storage exposed (FSDP2 swaps
        the Parameters around every forward) it is built per call."""
        packed = self._parameters["weight"]
        qs = self.__dict__.get("_qs")
        hit = _PLANS.get(self)
        if (
            hit is not None
            and hit[0] is packed
            and hit[1] is qs
            and hit[2] == packed.data_ptr()
            and qs is not None
        ):
            return hit[3]
        state = state if state is not None else self._require_state()
        plan = DequantPlan(_packed_bytes(packed, state), state)
        if not self.storage_exposed:
            _PLANS[self] = (packed, qs, packed.data_ptr(), plan)
        return plan

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight ``[out, in]`` in ``dtype`` (default ``compute_dtype``), freshly allocated."""
        self._refuse_if_sharded("dequantize")
        state = self._require_state()
        return dequantize_4bit(_packed_bytes(self.weight, state), state, dtype=dtype or self.compute_dtype)

    # ------------------------------------------------------------------ devices
    def _apply(self, fn, recurse: bool = True):
        """Move the packed bytes and the state with ``fn`` but never cast them.

        ``model.to(torch.bfloat16)`` / ``.half()`` reach here too: those change ``compute_dtype``
        and the bias, while the uint8 codes and the fp32 scales keep their dtypes.
        """
        storage = {n: self._parameters[n] for n in _STORAGE_PARAMS if self._parameters.get(n) is not None}
        packed = storage["weight"]
        # Hide the storage from nn.Module._apply (which handles the bias); same keys keep order.
        for name in storage:
            self._parameters[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters.update(storage)
        with torch.no_grad():
            for name, param in storage.items():
                moved = fn(param.data)
                if moved.dtype != param.dtype:
                    moved = param.data.to(moved.device)
                if moved is not param.data:
                    self._parameters[name] = nn.Parameter(moved, requires_grad=False)
            probe = fn(torch.empty(0, dtype=self.compute_dtype, device=packed.device))
        new_device = self._parameters["weight"].device
        if new_device != packed.device:
            for key in ("_qs", "_qs_template"):  # the code tables (and placeholders) follow
                if self.__dict__.get(key) is not None:
                    self.__dict__[key] = self.__dict__[key].to(new_device)
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    # ------------------------------------------------------------------ (de)serialization
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        state = self._require_state()
        packed = self.weight if keep_vars else self.weight.detach()
        if self.storage_exposed:
            # bitsandbytes bytes and dtypes from the carriers; FSDP2's local shards stay DTensors
            packed = packed if _is_dtensor(packed) else _packed_bytes(packed, state)
            if not keep_vars:
                nested = state.nested_absmax.detach() if state.nested else None
                state = replace(state, absmax=state.absmax.detach(), nested_absmax=nested)
        for key, t in state.as_bnb_dict(_SENTINEL, packed).items():
            rest = key[len(_SENTINEL) :].lstrip(".")
            destination[prefix + rest] = t
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        self._refuse_if_sharded("load_state_dict")
        wkey = prefix + "weight"
        if wkey not in state_dict:
            missing_keys.append(wkey)
        else:
            parts = {k: v for k, v in state_dict.items() if k == wkey or k.startswith(wkey + ".")}
            w = parts[wkey]
            try:
                if len(parts) == 1 and w.is_floating_point():
                    # A dense nn.Linear checkpoint: quantize it as it arrives.
                    self.requantize_(
                        w.to(self.weight.device if self.weight.device.type != "meta" else w.device)
                    )
                else:
                    tensors = {f"{_SENTINEL}.{k[len(prefix) :]}": v for k, v in parts.items()}
                    packed, qstate = QuantState.from_bnb_dict(_SENTINEL, tensors)
                    dev = self.weight.device if self.weight.device.type != "meta" else packed.device
                    self._set_quantized(packed.to(dev), qstate.to(dev))
            except (QuantFormatError, ValueError, KeyError, TypeError) as exc:
                error_msgs.append(f"while loading 4-bit weight {wkey!r}: {exc}")
        bkey = prefix + "bias"
        if self.bias is not None:
            if bkey not in state_dict:
                missing_keys.append(bkey)
            else:
                b = state_dict[bkey]
                if tuple(b.shape) != (self.out_features,):
                    error_msgs.append(
                        f"size mismatch for {bkey}: got {tuple(b.shape)}, expected {(self.out_features,)}"
                    )
                else:
                    dev = self.bias.device if self.bias.device.type != "meta" else b.device
                    with torch.no_grad():
                        self.bias = nn.Parameter(
                            b.detach().to(dev, self.bias.dtype).clone(), requires_grad=self.bias.requires_grad
                        )
        if strict:
            for k in state_dict:
                if k.startswith(prefix) and not (k == wkey or k.startswith(wkey + ".") or k == bkey):
                    rest = k[len(prefix) :]
                    if "." not in rest:
                        unexpected_keys.append(k)

    def extra_repr(self) -> str:
        """Shape, quant type, blocksize and whether the block scales are double-quantized."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.compress_statistics}, "
            f"compute_dtype={self.compute_dtype}"
        )
