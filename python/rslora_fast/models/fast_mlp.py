"""Fused gated MLP: ``down(swiglu(gate(x), up(x)))`` for the llama family and phi-3, ``down(geglu(...))``
for the gemmas.

transformers computes ``act_fn(gate_proj(x)) * up_proj(x)`` as separate kernels (SiLU, multiply, and
more in backward); :func:`rslora_fast.ops.swiglu` does it in one pass each way. The projections stay
whatever they are (``nn.Linear``, ``Linear4bit``, LoRA-wrapped); gate and up run as one fused LoRA
node (:func:`rslora_fast.ops.lora_linear.lora_linears`) when they qualify. Phi-3's ``gate_up_proj``
is one projection (one adapter, as in HF peft) whose output halves are gate and up. Installed per MLP instance by
``get_peft_model`` (through :func:`rslora_fast.models.fast_decoder.install_fast_decoder`) and removed
by ``unload`` / ``merge_and_unload``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..ops.geglu import geglu
from ..ops.lora_linear import lora_linears
from ..ops.swiglu import swiglu

SWIGLU_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Phi3MLP")
GEGLU_MLP_CLASSES = ("GemmaMLP", "Gemma2MLP", "Gemma3MLP")
# the config attribute naming the activation: gemma 2/3 renamed it
_ACT_ATTR = {"Gemma2MLP": "hidden_activation", "Gemma3MLP": "hidden_activation"}
_FUSED_GATE_UP = ("Phi3MLP",)  # gate_up_proj: [gate | up] along the output features
_SILU = ("silu", "swish")
# transformers' activation names -> torch.nn.functional.gelu(approximate=...), exactly those two
_GELU = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


# Above this many tokens in one call the MLP runs in tiles of this many tokens: its three
# [tokens, intermediate] tensors (gate, up, their product) and their gradients are the largest
# activations of a long sequence (Llama-3-8B: about 0.08 GiB each per 1k tokens), and a token-wise
# MLP can be computed, and differentiated, tile by tile. Costs one more MLP forward per tile in
# backward (the tile is recomputed), paid only at lengths where memory, not speed, is the limit.
TILE_TOKENS = 16384


def _activation(module: nn.Module) -> str | None:
    name = type(module).__name__
    return getattr(getattr(module, "config", None), _ACT_ATTR.get(name, "hidden_act"), None)


def _untiled(self, x):
    name = type(self).__name__
    if name in _FUSED_GATE_UP:
        (gate_up,) = lora_linears(x, [self.gate_up_proj])
        gate, up = gate_up.chunk(2, dim=-1)
    else:
        # gate and up share x: one autograd node, one input-gradient buffer (falls back to calling
        # the two projections when they cannot be fused).
        gate, up = lora_linears(x, [self.gate_proj, self.up_proj])
    if name in GEGLU_MLP_CLASSES:
        return self.down_proj(geglu(gate, up, _GELU[_activation(self)]))
    return self.down_proj(swiglu(gate, up))


def _fused_forward(self, x):
    tokens = x.numel() // max(1, x.shape[-1])
    if tokens <= TILE_TOKENS or not _tileable(self):
        return _untiled(self, x)
    params = [p for p in self.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (x.requires_grad or params):
        return _TiledMLP.apply(self, x, *params)
    with torch.no_grad():  # nothing here needs a gradient
        return _tiles(self, x, lambda xc: _untiled(self, xc))


def _tileable(self) -> bool:
    """Tiles give the same result only when the MLP is deterministic (no dropout anywhere)."""
    return not any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.modules())


def _tiles(self, x, fn):
    flat = x.reshape(-1, x.shape[-1])
    out = None
    for s in range(0, flat.shape[0], TILE_TOKENS):
        y = fn(flat[s : s + TILE_TOKENS])
        if out is None:
            out = y.new_empty(flat.shape[0], y.shape[-1])
        out[s : s + y.shape[0]] = y
    return out.view(*x.shape[:-1], out.shape[-1])


class _TiledMLP(torch.autograd.Function):
    """The MLP over token tiles: forward keeps only its input; backward recomputes each tile and
    differentiates it at once, so one tile's intermediate tensors exist at a time. The trainable
    parameters are inputs of the node and their gradients are summed over the tiles here and
    returned to autograd once (DDP's reducer, ``torch.autograd.grad`` and post-accumulate hooks
    then see one gradient per parameter, as with the untiled MLP)."""

    @staticmethod
    def forward(ctx, mlp, x, *params):  # noqa: D417
        ctx.mlp = mlp
        ctx.autocast = [
            (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) for dev in ("cuda", "cpu")
        ]
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            return _tiles(mlp, x, lambda xc: _untiled(mlp, xc))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, *params = ctx.saved_tensors
        mlp = ctx.mlp
        want_x = ctx.needs_input_grad[1]
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[2:]) if need]
        flat = x.reshape(-1, x.shape[-1])
        dflat = dy.reshape(-1, dy.shape[-1])
        dx = torch.empty_like(flat) if want_x else None
        sums: list[torch.Tensor | None] = [None] * len(wanted)
        for s in range(0, flat.shape[0], TILE_TOKENS):
            xc = flat[s : s + TILE_TOKENS].detach().requires_grad_(want_x)
            # the forward's autocast state for the recompute only; differentiate outside it, as
            # torch.utils.checkpoint does (backward formulas must not be autocast)
            with contextlib.ExitStack() as stack, torch.enable_grad():
                for dev, enabled, dtype in ctx.autocast:
                    stack.enter_context(torch.autocast(dev, dtype=dtype, enabled=enabled))
                yc = _untiled(mlp, xc)
            inputs = ([xc] if want_x else []) + wanted
            grads = torch.autograd.grad(yc, inputs, dflat[s : s + TILE_TOKENS], allow_unused=True)
            if want_x:
                dx[s : s + xc.shape[0]] = grads[0]
                grads = grads[1:]
            for i, g in enumerate(grads):
                if g is not None:  # a fresh buffer for the running sum (autograd may alias its own)
                    sums[i] = g.clone() if sums[i] is None else sums[i].add_(g)
        it = iter(sums)
        pgrads = tuple(next(it) if need else None for need in ctx.needs_input_grad[2:])
        return (None, None if dx is None else dx.view_as(x), *pgrads)


def _why_not(module: nn.Module) -> str | None:
    name = type(module).__name__
    act = _activation(module)
    if name in GEGLU_MLP_CLASSES:
        if act not in _GELU:
            return f"{name} activation {act!r} is not gelu or gelu_pytorch_tanh"
    elif name not in SWIGLU_MLP_CLASSES:
        return f"{name} is not a supported gated MLP"
    elif act not in _SILU:
        return f"{name} activation is not SiLU"
    projections = (
        ("gate_up_proj", "down_proj") if name in _FUSED_GATE_UP else ("gate_proj", "up_proj", "down_proj")
    )
    if not all(isinstance(getattr(module, p, None), nn.Module) for p in projections):
        return f"{name} lacks {'/'.join(projections)} projections"
    return None
