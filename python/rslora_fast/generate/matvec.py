"""Projections of a decode step: a group of linear layers sharing one input, run without autograd.

``ProjectionGroup.from_modules([q_proj, k_proj, v_proj])`` plans the group once; calling it with
``x`` of shape ``[B, K]`` (B small: the decode batch) returns one ``[B, N_i]`` output per layer,
``x W_i^T (+ b_i) + s_i (x A_i^T) B_i^T``: the frozen base weight (16-bit or NF4/FP4 4-bit) plus the
unmerged LoRA term, so training can continue after generation.

Contract used by the engine:

* the call allocates nothing but its outputs (through torch) and never synchronizes with the host,
  so it may be captured in a CUDA graph;
* the adapters are read from low-precision copies made at planning time; :meth:`refresh_adapters`
  copies the current fp32 adapter weights into them in place (the graph keeps their addresses);
* on CPU, and wherever the kernels do not run, the plain-torch reference below gives the result;
* planning records the device addresses of the base weights (and keeps those tensors alive): plan
  again after moving, reloading or requantizing the model.

On CUDA (float16/bfloat16) the 4-bit members run as ONE launch of ``kernels/decode_matvec.cu``
(packed weights read as stored, nested scales decoded in the kernel, bias and the LoRA
up-projection in its epilogue); 16-bit members run as a torch matmul. The LoRA down-projections of
all members are one launch of the same file's ``x A_all^T`` kernel (a torch matmul where the
kernels do not run) into a slice of the output buffer, and the 16-bit members' LoRA up-projections
one more launch after their matmuls, so a call allocates one buffer and launches
(4-bit ? 1 : 0) + (LoRA ? 1 : 0) + 16-bit members (+ 1 for their LoRA terms) kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .._device import dtype_name, stream_of, use_kernels
from .._native import core
from ..quant.functional import dynamic_map
from ..quant.linear4bit import _is_dtensor, _packed_bytes

# Model dtypes the decode kernel is compiled for.
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# Layers one kernel launch serves (MAX_MEMBERS in src/kernels/decode_matvec.rs).
MAX_MEMBERS = 4


@dataclass
class _Projection:
    """One layer of a group: its frozen base and its adapter copies (``a``/``b`` None without LoRA).

    ``a`` is a view of the group's concatenated ``lora_a`` (rows ``a_row .. a_row + rank``).
    """

    base: nn.Module
    bias: torch.Tensor | None
    a: torch.Tensor | None
    b: torch.Tensor | None
    scaling: float
    source_a: torch.Tensor | None
    source_b: torch.Tensor | None
    out_features: int
    a_row: int = 0


@dataclass
class _KernelPlan:
    """Launch arguments prepared once: the 4-bit members' dicts for ``_core.decode_matvec_4bit``
    (with the tensors whose addresses they hold), and which projections run as 16-bit matmuls."""

    quantized: list[int]
    dense: list[int]
    members: list[dict]
    device: torch.device
    in_features: int
    keep: list[torch.Tensor] = field(default_factory=list)
    # The 16-bit members' LoRA terms as ``_core.decode_lora_b`` tuples (one launch for them all),
    # or None: no 16-bit member has LoRA, or more than one launch serves.
    dense_lora: list[tuple[int, int, int, float, int]] | None = None


def _split_lora(layer: nn.Module) -> tuple[nn.Module, torch.Tensor | None, torch.Tensor | None, float]:
    """(base layer, A [r, K], B [N, r], scale) of a LoRA layer; a plain layer has no adapter."""
    mods = getattr(layer, "_modules", {})
    if "base_layer" in mods and "lora_A" in mods and not getattr(layer, "disabled", False):
        if getattr(layer, "merged", False):
            return mods["base_layer"], None, None, 0.0
        return mods["base_layer"], mods["lora_A"].weight, mods["lora_B"].weight, float(layer.scaling)
    return mods.get("base_layer", layer), None, None, 0.0


def _is_4bit(base: nn.Module) -> bool:
    return hasattr(base, "dequantize") and getattr(base, "quant_state", None) is not None


def _dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base weight ``[N, K]`` in ``dtype`` (a 4-bit layer is dequantized: reference path only)."""
    if _is_4bit(base):
        return base.dequantize(dtype)
    return base.weight.to(dtype)


class ProjectionGroup:
    """Linear layers that read the same input in a decode step, planned once."""

    def __init__(self, projections: list[_Projection], dtype: torch.dtype) -> None:
        self.projections = projections
        self.dtype = dtype
        # [sum of ranks, K]: every member's A rows (each projection's ``a`` becomes a view of
        # its rows), so x A^T of the whole group is one matmul.
        self.lora_a = _gather_lora_a(projections)
        self._plan = _plan_kernels(projections, dtype)

    @classmethod
    def from_modules(cls, layers: Sequence[nn.Module], dtype: torch.dtype) -> ProjectionGroup:
        """Plan ``layers`` (``nn.Linear``, a 4-bit linear, or a LoRA layer over either)."""
        projections = []
        for layer in layers:
            base, a, b, scaling = _split_lora(layer)
            bias = getattr(base, "bias", None)
            projections.append(
                _Projection(
                    base=base,
                    bias=None if bias is None else bias.detach().to(dtype).contiguous(),
                    a=None if a is None else a.detach().to(dtype).clone(),
                    b=None if b is None else b.detach().to(dtype).contiguous().clone(),
                    scaling=scaling,
                    source_a=a,
                    source_b=b,
                    out_features=int(base.out_features),
                )
            )
        return cls(projections, dtype)

    @property
    def out_features(self) -> tuple[int, ...]:
        return tuple(p.out_features for p in self.projections)

    @property
    def uses_kernel(self) -> bool:
        """Whether planning found the group runnable by the decode kernel path on CUDA."""
        return self._plan is not None

    @torch.no_grad()
    def refresh_adapters(self) -> None:
        """Copy the current adapter weights into the planned copies, in place."""
        dst = [t for p in self.projections if p.a is not None for t in (p.a, p.b)]
        src = [t for p in self.projections if p.a is not None for t in (p.source_a, p.source_b)]
        if dst:
            torch._foreach_copy_(dst, src)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        plan = self._plan
        if plan is not None and x.device == plan.device and x.dtype == self.dtype:
            if not plan.quantized or use_kernels(x):
                return _run_fast(x, self, plan)
        return reference(x, self)


def _gather_lora_a(projections: list[_Projection]) -> torch.Tensor | None:
    """One ``[sum r, K]`` matrix of the projections' A copies; each ``a`` becomes a view of it."""
    present = [p for p in projections if p.a is not None]
    if not present:
        return None
    lora_a = torch.cat([p.a for p in present], dim=0).contiguous()
    row = 0
    for p in present:
        rank = p.a.shape[0]
        p.a, p.a_row = lora_a[row : row + rank], row
        row += rank
    return lora_a


def _plan_kernels(projections: list[_Projection], dtype: torch.dtype) -> _KernelPlan | None:
    """The fast CUDA path's launch arguments, or None when the group cannot take it (CPU, a
    float32 model, layers on several devices or of several widths, sharded or strided storage)."""
    if dtype not in KERNEL_DTYPES or not projections:
        return None
    bases = [p.base for p in projections]
    devices = {(b.weight.device) for b in bases}
    widths = {int(b.in_features) for b in bases}
    if len(devices) != 1 or len(widths) != 1:
        return None
    device = devices.pop()
    if device.type != "cuda" or any(_is_dtensor(b.weight) for b in bases):
        return None
    quantized = [i for i, b in enumerate(bases) if _is_4bit(b)]
    if len(quantized) > MAX_MEMBERS:
        return None
    # 16-bit members are torch matmuls in the model dtype; every LoRA copy lives on the device.
    if any(bases[i].weight.dtype != dtype for i in range(len(bases)) if i not in quantized):
        return None
    adapters = [t for p in projections for t in (p.a, p.b, p.bias) if t is not None]
    if any(t.device != device for t in adapters):
        return None
    plan = _KernelPlan(
        quantized=quantized,
        dense=[i for i in range(len(bases)) if i not in quantized],
        members=[],
        device=device,
        in_features=widths.pop(),
    )
    for i in quantized:
        member = _member(projections[i], plan)
        if member is None:
            return None
        plan.members.append(member)
    dense = [projections[i] for i in plan.dense]
    if any(p.a is not None for p in dense) and len(dense) <= MAX_MEMBERS:
        plan.dense_lora = [
            (p.out_features, p.b.data_ptr(), p.a.shape[0], p.scaling, p.a_row)
            if p.a is not None
            else (p.out_features, 0, 0, 0.0, 0)
            for p in dense
        ]
    return plan


def _member(p: _Projection, plan: _KernelPlan) -> dict | None:
    """The kernel's description of one 4-bit layer (None when its packed bytes are not one
    contiguous uint8 run: then the group stays on the reference path)."""
    state = p.base.quant_state
    if tuple(state.shape) != (p.out_features, plan.in_features):
        return None
    packed = _packed_bytes(p.base.weight.detach(), state)
    if packed.dtype != torch.uint8 or not packed.is_contiguous():
        return None

    def small(t: torch.Tensor, dt: torch.dtype) -> int:
        # Scales are 1/64 of the weight or less: a contiguous copy (rare) costs little.
        t = t.detach().to(plan.device, dt).contiguous()
        plan.keep.append(t)
        return t.data_ptr()

    plan.keep += [packed]
    m = {"n": p.out_features, "packed": packed.data_ptr(), "blocksize": int(state.blocksize)}
    m["quant_type"] = state.quant_type
    if state.nested:
        code = state.nested_code if state.nested_code is not None else dynamic_map(plan.device)
        m.update(absmax=0, absmax_q=small(state.absmax, torch.uint8))
        m.update(
            nested_absmax=small(state.nested_absmax, torch.float32), nested_code=small(code, torch.float32)
        )
        m["offset"] = float(state.nested_offset)
    else:
        m.update(absmax=small(state.absmax, torch.float32), absmax_q=0, nested_absmax=0, nested_code=0)
        m["offset"] = 0.0
    m["bias"] = 0 if p.bias is None else p.bias.data_ptr()
    has_lora = p.a is not None
    m["lora_b"] = p.b.data_ptr() if has_lora else 0
    m["rank"] = p.a.shape[0] if has_lora else 0
    m["scaling"] = p.scaling if has_lora else 0.0
    m["xa_col"] = p.a_row
    return m


def _run_fast(x: torch.Tensor, group: ProjectionGroup, plan: _KernelPlan) -> tuple[torch.Tensor, ...]:
    """One output buffer; x A_all^T into its tail; the 4-bit members in one launch; 16-bit ones by
    torch matmuls with their LoRA term added in place."""
    k = plan.in_features
    if x.shape[-1] != k:
        raise ValueError(f"ProjectionGroup: input width {x.shape[-1]}, the layers take {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    batch = x2.shape[0]
    projs = group.projections
    order = plan.quantized + plan.dense
    rank = 0 if group.lora_a is None else group.lora_a.shape[0]
    width = sum(projs[i].out_features for i in order)
    flat = torch.empty(batch * (width + rank), dtype=x.dtype, device=x.device)
    outs: dict[int, torch.Tensor] = {}
    off = 0
    for i in order:
        n = projs[i].out_features
        outs[i] = flat[off : off + batch * n].view(batch, n)
        off += batch * n
    xa = flat[off:].view(batch, rank)
    if rank and batch:
        if use_kernels(x2):
            index, stream = stream_of(x2)
            core().decode_lora_a(
                x2.data_ptr(), group.lora_a.data_ptr(), xa.data_ptr(), rank, rank, batch, k,
                dtype_name(x2, "ProjectionGroup"), index, stream,
            )  # fmt: skip
        else:
            torch.mm(x2, group.lora_a.t(), out=xa)
    if plan.quantized and batch:
        index, stream = stream_of(x2)
        core().decode_matvec_4bit(
            plan.members, x2.data_ptr(), flat.data_ptr(), xa.data_ptr() if rank else 0, rank,
            batch, k, dtype_name(x2, "ProjectionGroup"), index, stream,
        )  # fmt: skip
    one_lora_launch = plan.dense_lora is not None and batch > 0 and use_kernels(x2)
    for i in plan.dense:
        p = projs[i]
        w = p.base.weight
        if p.bias is None:
            torch.mm(x2, w.t(), out=outs[i])
        else:
            torch.addmm(p.bias, x2, w.t(), out=outs[i])
        if p.a is not None and not one_lora_launch:
            outs[i].addmm_(xa[:, p.a_row : p.a_row + p.a.shape[0]], p.b.t(), alpha=p.scaling)
    if one_lora_launch:
        index, stream = stream_of(x2)
        core().decode_lora_b(
            plan.dense_lora, outs[plan.dense[0]].data_ptr(), xa.data_ptr(), rank, batch,
            dtype_name(x2, "ProjectionGroup"), index, stream,
        )  # fmt: skip
    return tuple(outs[i].view(*lead, projs[i].out_features) for i in range(len(projs)))


def reference(x: torch.Tensor, group: ProjectionGroup) -> tuple[torch.Tensor, ...]:
    """Plain torch: dequantize, matmul, add the LoRA term (the oracle and the CPU path)."""
    outs = []
    for p in group.projections:
        y = x @ _dense_weight(p.base, group.dtype).t()
        if p.bias is not None:
            y = y + p.bias
        if p.a is not None:
            y = y + p.scaling * ((x @ p.a.t()) @ p.b.t())
        outs.append(y)
    return tuple(outs)
