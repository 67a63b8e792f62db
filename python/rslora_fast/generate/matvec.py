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
* on CPU, and wherever the kernels do not run, the plain-torch reference below gives the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Projection:
    """One layer of a group: its frozen base and its adapter copies (``a``/``b`` None without LoRA)."""

    base: nn.Module
    bias: torch.Tensor | None
    a: torch.Tensor | None
    b: torch.Tensor | None
    scaling: float
    source_a: torch.Tensor | None
    source_b: torch.Tensor | None
    out_features: int


def _split_lora(layer: nn.Module) -> tuple[nn.Module, torch.Tensor | None, torch.Tensor | None, float]:
    """(base layer, A [r, K], B [N, r], scale) of a LoRA layer; a plain layer has no adapter."""
    mods = getattr(layer, "_modules", {})
    if "base_layer" in mods and "lora_A" in mods and not getattr(layer, "disabled", False):
        if getattr(layer, "merged", False):
            return mods["base_layer"], None, None, 0.0
        return mods["base_layer"], mods["lora_A"].weight, mods["lora_B"].weight, float(layer.scaling)
    return mods.get("base_layer", layer), None, None, 0.0


def _dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base weight ``[N, K]`` in ``dtype`` (a 4-bit layer is dequantized: reference path only)."""
    if hasattr(base, "dequantize") and getattr(base, "quant_state", None) is not None:
        return base.dequantize(dtype)
    return base.weight.to(dtype)


class ProjectionGroup:
    """Linear layers that read the same input in a decode step, planned once."""

    def __init__(self, projections: list[_Projection], dtype: torch.dtype) -> None:
        self.projections = projections
        self.dtype = dtype

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
                    bias=None if bias is None else bias.detach().to(dtype),
                    a=None if a is None else a.detach().to(dtype).clone(),
                    b=None if b is None else b.detach().to(dtype).clone(),
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

    @torch.no_grad()
    def refresh_adapters(self) -> None:
        """Copy the current adapter weights into the planned copies, in place."""
        dst = [t for p in self.projections if p.a is not None for t in (p.a, p.b)]
        src = [t for p in self.projections if p.a is not None for t in (p.source_a, p.source_b)]
        if dst:
            torch._foreach_copy_(dst, src)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return reference(x, self)


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
