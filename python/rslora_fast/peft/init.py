"""Adapter initialization: PEFT's schemes with a private generator, and LoftQ over NF4."""

from __future__ import annotations

import math

import torch

from ..quant.functional import NF4_CODE


def make_generator(seed: int | None) -> torch.Generator:
    """A private CPU generator: seeded with ``seed``, or nondeterministically when ``seed`` is None.

    Never touches the global RNG state.
    """
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def kaiming_uniform_a_sqrt5(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """``nn.Linear``'s default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = shape[1]."""
    bound = 1.0 / math.sqrt(shape[1])
    out = torch.empty(shape, dtype=torch.float32)
    out.uniform_(-bound, bound, generator=generator)
    return out


def gaussian(shape: tuple[int, int], std: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, std^2) samples in float32."""
    out = torch.empty(shape, dtype=torch.float32)
    out.normal_(0.0, std, generator=generator)
    return out


# ---------------------------------------------------------------------- NF4 round trip
def _nf4_roundtrip_torch(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Quantize to NF4 blockwise (absmax per ``blocksize`` consecutive elements) and dequantize.

    Pure torch, float32 statistics (no double quantization); nearest code, ties to the lower index.
    """
    flat = w.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    pad = (-n) % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = blocks / scale
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=flat.device)
    mids = (code[1:] + code[:-1]) / 2
    idx = torch.bucketize(normed, mids, right=False)  # x > mid picks the upper code
    deq = code[idx] * absmax
    return deq.reshape(-1)[:n].view_as(w).to(torch.float32)


def nf4_roundtrip(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """``dequant(quant_nf4(w))`` in float32 (float32 block scales, no double quantization).

    Uses ``rslora_fast.quant.functional`` (bitsandbytes-compatible) when it is importable, else the
    pure-torch blockwise NF4 quantizer of this module.
    """
    try:
        from ..quant.functional import dequantize_4bit, quantize_4bit  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - the quant package is optional here
        return _nf4_roundtrip_torch(w, blocksize)
    packed, state = quantize_4bit(
        w.detach().to(torch.float32).contiguous(),
        blocksize=blocksize,
        quant_type="nf4",
        compress_statistics=False,
    )
    return dequantize_4bit(packed, state, dtype=torch.float32).reshape(w.shape)


def loftq_init(
    weight: torch.Tensor, r: int, scaling: float, num_iter: int = 1, blocksize: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ: alternate NF4 quantization and a rank-``r`` SVD of the residual.

    Finds ``Q`` (NF4) and ``A [r, in]``, ``B [out, r]`` so that
    ``W ≈ dequant(Q) + scaling * B @ A``. Unlike PEFT, the LoRA scaling is divided out of the
    low-rank factors, so the initialization is right for any ``lora_alpha / r``.

    Args:
        weight: the full-precision weight ``[out, in]``.
        r: LoRA rank.
        scaling: the layer's LoRA scaling.
        num_iter: number of alternating steps (>= 1).
        blocksize: NF4 block size.

    Returns:
        ``(dequantized_q, A, B)``, all float32 on ``weight``'s device.
    """
    w = weight.detach().to(torch.float32)
    lowrank = torch.zeros_like(w)
    deq = w
    a = b = None
    for _ in range(num_iter):
        deq = nf4_roundtrip(w - lowrank, blocksize)
        u, s, vh = torch.linalg.svd((w - deq) / scaling, full_matrices=False)
        root = s[:r].sqrt()
        b = u[:, :r] * root
        a = root[:, None] * vh[:r]
        lowrank = scaling * (b @ a)
    return deq, a.contiguous(), b.contiguous()
