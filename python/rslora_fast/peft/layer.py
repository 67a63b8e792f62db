"""The LoRA linear layer and the full-copy wrapper used for ``modules_to_save``."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import lora_linear as _lora_linear
from ..quant.linear4bit import is_4bit_linear


def _empty_linear(in_features: int, out_features: int, device: torch.device) -> nn.Linear:
    """An ``nn.Linear`` (no bias, float32) created without running its initializer.

    Avoids consuming the global RNG: the caller fills the weight.
    """
    return torch.nn.utils.skip_init(
        nn.Linear, in_features, out_features, bias=False, device=device, dtype=torch.float32
    )


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    ``y = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling`` with ``scaling = lora_alpha / r``
    (or ``lora_alpha / sqrt(r)`` when ``use_rslora``). The adapter weights are float32 parameters;
    in ``forward`` they are cast to the activation dtype so the matmuls run in that dtype (bf16 /
    fp16 on a 16-bit base) while gradients accumulate in float32. With ``lora_dropout == 0`` no
    dropout code runs at all.

    Args:
        base_layer: an ``nn.Linear`` or a 4-bit linear layer (class attribute ``is_4bit_linear``).
        r: rank.
        lora_alpha: scaling numerator.
        lora_dropout: dropout probability on the LoRA branch.
        use_rslora: rank-stabilized scaling.

    The adapter weights are left uninitialized; see :meth:`set_adapter_weights`.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = int(r)
        self.lora_alpha = lora_alpha
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        device = self._base_device()
        self.lora_A = _empty_linear(self.in_features, self.r, device)
        self.lora_B = _empty_linear(self.r, self.out_features, device)
        self.lora_dropout_p = float(lora_dropout)
        self.lora_dropout = nn.Dropout(p=self.lora_dropout_p) if self.lora_dropout_p > 0 else None
        self.merged = False
        self.disabled = False

    # ---------------------------------------------------------------- attributes of the base
    def _base_device(self) -> torch.device:
        w = getattr(self.base_layer, "weight", None)
        return w.device if isinstance(w, torch.Tensor) else torch.device("cpu")

    @property
    def in_features(self) -> int:
        """Input width of the base layer."""
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        """Output width of the base layer."""
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (frozen)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias, if any."""
        return getattr(self.base_layer, "bias", None)

    @property
    def is_4bit(self) -> bool:
        """Whether the base layer is a packed 4-bit linear."""
        return is_4bit_linear(self.base_layer)

    # ---------------------------------------------------------------- math
    def fused_lora_parts(self) -> _lora_linear.LoraParts | str:
        """What the fused op of :mod:`rslora_fast.ops.lora_linear` needs, or why it cannot run this
        layer (the :class:`~rslora_fast.ops.lora_linear.FusableLora` protocol)."""
        if type(self).forward is not LoraLinear.forward:
            return f"{type(self).__name__} overrides LoraLinear.forward"
        if self.disabled:
            return "adapter disabled"
        if self.merged:
            return "adapter merged"
        lin_a, lin_b = self._modules["lora_A"], self._modules["lora_B"]
        if lin_a._parameters.get("bias") is not None or lin_b._parameters.get("bias") is not None:
            return "adapter has a bias"
        return _lora_linear.LoraParts(
            self._modules["base_layer"],
            lin_a._parameters["weight"],
            lin_b._parameters["weight"],
            self.scaling,
            self.lora_dropout_p,
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus the scaled low-rank update (skipped when disabled or merged).

        Takes the fused single-node path of :mod:`rslora_fast.ops.lora_linear` when it applies
        (dropout 0, frozen ``nn.Linear``/``Linear4bit`` base, one math dtype), else the generic one.
        """
        if not args and not kwargs:
            y = _lora_linear.fused_single(x, self)
            if y is not None:
                return y
        return self._generic_forward(x, *args, **kwargs)

    def _generic_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            self._refuse_training_while_merged_for_inference()
            return result
        if self.disabled:
            return result
        h = x if self.lora_dropout is None else self.lora_dropout(x)
        a = self.lora_A.weight
        b = self.lora_B.weight
        if a.dtype != h.dtype:
            a = a.to(h.dtype)
            b = b.to(h.dtype)
        down = F.linear(h, a)
        if down.dtype == result.dtype and result.is_contiguous():
            # One GEMM adds the scaled update into the base output (C + s * down @ B^T, accumulated
            # in fp32 in cuBLAS's epilogue): no separate full-size scale and add kernels, forward or
            # backward.
            out2d = torch.addmm(
                result.reshape(-1, result.shape[-1]),
                down.reshape(-1, down.shape[-1]),
                b.t(),
                alpha=self.scaling,
            )
            return out2d.view(result.shape)
        update = F.linear(down, b) * self.scaling
        if update.dtype != result.dtype:
            update = update.to(result.dtype)
        return result + update

    @torch.no_grad()
    def set_adapter_weights(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Copy ``A [r, in]`` and ``B [out, r]`` into the adapter (cast to float32, moved to its device)."""
        if self.lora_A.weight.is_meta:
            return
        self.lora_A.weight.copy_(a.to(self.lora_A.weight.device, torch.float32))
        self.lora_B.weight.copy_(b.to(self.lora_B.weight.device, torch.float32))

    def get_delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in float32, shape ``[out, in]``."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scaling * B @ A`` into the base weight.

        Dense bases are updated in place in their dtype; 4-bit bases are dequantized, updated and
        requantized (lossy).

        Raises:
            TypeError: for a 4-bit base without ``dequantize()`` / ``requantize_()``.
        """
        if self.merged:
            return
        delta = self.get_delta_weight()
        if self.is_4bit:
            base = self.base_layer
            if not (
                callable(getattr(base, "dequantize", None)) and callable(getattr(base, "requantize_", None))
            ):
                raise TypeError(
                    f"cannot merge into {type(base).__name__}: a 4-bit base layer needs dequantize() and "
                    "requantize_(dense) methods"
                )
            dense = base.dequantize()
            base.requantize_((dense.float() + delta.to(dense.device)).to(dense.dtype))
        else:
            w = self.base_layer.weight
            w.add_(delta.to(w.device, w.dtype))
        self.merged = True

    @torch.no_grad()
    def merge_for_inference(self) -> int:
        """Fold ``scaling * B @ A`` into a dense base for generation, keeping the base's weight in
        host memory so :meth:`unmerge` restores it bit for bit. Returns the bytes kept (0 when
        already merged).

        Raises:
            ValueError: for a 4-bit base (requantizing would change the base for good).
        """
        if self.merged:
            return 0
        if self.is_4bit:
            raise ValueError(
                "merge_for_inference: a 4-bit base would be requantized with the update, which changes "
                "it for good; generate with the adapter unmerged instead"
            )
        kept = self.base_layer.weight.detach().to("cpu", copy=True)
        self.merge()
        self.__dict__["_unmerged_weight"] = kept
        return kept.numel() * kept.element_size()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight that :meth:`merge_for_inference` kept (nothing to do when the
        adapter is not merged).

        Raises:
            RuntimeError: the adapter was merged by :meth:`merge` (an export), whose original weight
                was not kept.
        """
        kept = self.__dict__.pop("_unmerged_weight", None)
        if kept is None:
            if self.merged:
                raise RuntimeError(
                    "unmerge: this adapter was merged by merge(); its original base weight was not kept"
                )
            return
        self.base_layer.weight.copy_(kept)
        self.merged = False

    def _refuse_training_while_merged_for_inference(self) -> None:
        """A training forward over an adapter merged for generation would give the adapter no
        gradient (silently); say what to call instead."""
        if self.training and torch.is_grad_enabled() and "_unmerged_weight" in self.__dict__:
            raise RuntimeError(
                "the LoRA adapters are merged into the base for generation "
                "(FastLanguageModel.for_inference(model, merge_lora=True)); call "
                "FastLanguageModel.for_training(model) before training"
            )

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, dropout={self.lora_dropout_p}"


class Delegating(nn.Module):
    """A module standing in for the one ``_delegate()`` returns: calling it calls that module, and
    attributes it lacks are read from there. The names in ``_own_attrs`` (its own submodules and
    the state ``_delegate`` reads) are never looked up there, so a missing one (a half-built or old
    pickled module) raises AttributeError instead of recursing."""

    _own_attrs: tuple[str, ...] = ()

    def _delegate(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the module this one stands in for."""
        return self._delegate()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in self._own_attrs or name in ("_modules", "_parameters", "_buffers"):
                raise
            return getattr(self._delegate(), name)


class ModulesToSaveWrapper(Delegating):
    """Keeps the original module and a trainable full copy; the copy is used unless disabled.

    Args:
        module: the module to train in full (e.g. ``lm_head``).
    """

    _own_attrs = ("original_module", "modules_to_save", "disabled", "active_module")

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = copy.deepcopy(module)
        self.disabled = False

    @property
    def active_module(self) -> nn.Module:
        """The module the forward pass uses."""
        return self.original_module if self.disabled else self.modules_to_save

    def _delegate(self) -> nn.Module:
        return self.active_module
