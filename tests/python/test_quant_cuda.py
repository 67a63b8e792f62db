"""GPU tests of the NF4/FP4 kernels (marker ``cuda``; skipped without a GPU).

References: the plain-torch/float64 dequantization of the same bytes and scales, and the Rust CPU
quantizer (itself pinned to bitsandbytes in test_quant_bnb.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rslora_fast
from rslora_fast import _native
from rslora_fast.quant import functional as F

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

SHAPES = [(1, 1), (3, 5), (17, 33), (64, 64), (129, 257), (1000, 4099), (4096, 1024)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _want(packed, state, dtype):
    """float64 dequantization of the CPU copies (scales rebuilt in float32 like bitsandbytes)."""
    st = state.to("cpu")
    n = st.numel
    b = packed.cpu().reshape(-1).to(torch.int64)
    nib = torch.stack([b >> 4, b & 15], 1).reshape(-1)[:n]
    scales = st.block_scales()  # float32 multiply, then float32 add
    vals = F.get_4bit_code(st.quant_type).double()[nib] * scales.double()[torch.arange(n) // st.blocksize]
    return vals.float().to(dtype).reshape(st.shape)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequant_kernel_matches_reference(quant_type, compress, out_dtype):
    gen = torch.Generator().manual_seed(DTYPES.index(out_dtype) * 4 + 2 * compress + (quant_type == "fp4"))
    for shape in SHAPES:
        for bs in (32, 64, 256, 4096):
            w = torch.randn(*shape, generator=gen) * 0.02
            p, s = F.quantize_4bit(w, bs, quant_type, compress)  # CPU path
            pc, sc = p.cuda(), s.to("cuda")
            got = F.dequantize_4bit(pc, sc, dtype=out_dtype)
            assert got.is_cuda and got.dtype == out_dtype and got.shape == w.shape
            torch.testing.assert_close(got.cpu(), _want(p, s, out_dtype), rtol=0, atol=0)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_quantize_bytes_equal_cpu(quant_type, dtype):
    gen = torch.Generator().manual_seed(7)
    for shape in SHAPES:
        for bs in (32, 64, 128, 4096):
            w = (torch.randn(*shape, generator=gen) * 0.03).to(dtype)
            if shape == (64, 64):
                w[0, :64] = 0  # an all-zero block
            p_cpu, s_cpu = F.quantize_4bit(w, bs, quant_type, False)
            p_gpu, s_gpu = F.quantize_4bit(w.cuda(), bs, quant_type, False)
            assert p_gpu.is_cuda
            assert torch.equal(p_gpu.cpu(), p_cpu), (shape, bs)
            assert torch.equal(s_gpu.absmax.cpu(), s_cpu.absmax), (shape, bs)


def test_gpu_double_quant_equals_cpu_given_same_offset():
    core = _native.core_or_none()
    w = torch.randn(999, 1001, device="cuda", dtype=torch.bfloat16)
    p, s = F.quantize_4bit(w, 64, "nf4", True)
    _, s_plain = F.quantize_4bit(w, 64, "nf4", False)
    absmax = s_plain.absmax.cpu()
    q8 = torch.empty(absmax.numel(), dtype=torch.uint8)
    nested = torch.empty(-(-absmax.numel() // 256), dtype=torch.float32)
    core.double_quant_cpu(
        absmax.data_ptr(), absmax.numel(), s.nested_offset, q8.data_ptr(), q8.numel(),
        nested.data_ptr(), nested.numel(),
    )  # fmt: skip
    assert torch.equal(s.absmax.cpu(), q8)
    assert torch.equal(s.nested_absmax.cpu(), nested)


def test_quantize_dequantize_round_trip_error():
    w = torch.randn(512, 768, device="cuda", dtype=torch.bfloat16)
    p, s = F.quantize_4bit(w, 64, "nf4", True)
    back = F.dequantize_4bit(p, s)
    rel = ((back.float() - w.float()).norm() / w.float().norm()).item()
    assert rel < 0.12, rel


# Sizes around the warp chunks of the dequantize kernel (1024 elements for 16-bit outputs, 512 for
# fp32): only the tail (unit and element loops), several chunks plus a tail, several nested groups
# of 256 blocks, and a tensor larger than one resident wave of blocks (for the capped-grid test).
CHUNK_SHAPES = [(3, 5), (17, 33), (33, 65), (129, 257), (1000, 4099), (4096, 4099)]


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequant_bytes_equal_reference_around_chunks(compress, out_dtype):
    gen = torch.Generator().manual_seed(100 + DTYPES.index(out_dtype) * 2 + compress)
    for i, shape in enumerate(CHUNK_SHAPES):
        quant_type = "nf4" if i % 2 == 0 else "fp4"
        for bs in (32, 64, 256, 4096) if shape[0] < 4096 else (32, 64):
            w = torch.randn(*shape, generator=gen) * 0.02
            p, s = F.quantize_4bit(w, bs, quant_type, compress)  # CPU path
            want = _want(p, s, out_dtype).view(torch.uint8)
            got = F.dequantize_4bit(p.cuda(), s.to("cuda"), dtype=out_dtype)
            assert torch.equal(got.cpu().view(torch.uint8), want), (shape, bs, quant_type)


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequant_into_out_and_unaligned(out_dtype):
    w = torch.randn(301, 1031, device="cuda")
    p, s = F.quantize_4bit(w, 64, "nf4", True)
    want = _want(p, s, out_dtype).view(torch.uint8)
    n = 301 * 1031
    out = torch.full((n,), float("nan"), dtype=out_dtype, device="cuda")
    assert F.dequantize_4bit(p, s, out=out) is out
    assert torch.equal(out.view(301, 1031).cpu().view(torch.uint8), want)
    # An output offset by one element is not 16-byte aligned: the kernel goes element by element.
    big = torch.full((n + 1,), float("nan"), dtype=out_dtype, device="cuda")
    F.dequantize_4bit(p, s, out=big[1:])
    assert torch.equal(big[1:].view(301, 1031).cpu().view(torch.uint8), want)
    assert torch.isnan(big[0].float())  # nothing written before the buffer
    # Packed codes at an odd address (no word loads) with an aligned output: same fallback.
    pbig = torch.empty(p.numel() + 1, dtype=torch.uint8, device="cuda")
    pbig[1:].copy_(p.view(-1))
    got = F.dequantize_4bit(pbig[1:], s, dtype=out_dtype)
    assert torch.equal(got.cpu().view(torch.uint8), want)


_CAPPED_GRID = """
import torch
from rslora_fast.quant import functional as F
gen = torch.Generator().manual_seed(5)
for dtype in (torch.bfloat16, torch.float32):
    for compress in (True, False):
        w = torch.randn(4097, 4099, generator=gen) * 0.02  # odd: a tail after the chunks
        p, s = F.quantize_4bit(w, 64, "nf4", compress)
        want = F.dequantize_4bit_reference(p, s, dtype=dtype)  # plain torch, float32 products
        got = F.dequantize_4bit(p.cuda(), s.to("cuda"), dtype=dtype)
        assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8)), (dtype, compress)
print("ok")
"""


def test_dequant_capped_grid_loops_over_chunks():
    """With the grid capped at one resident wave (RSLORA_FAST_MAX_WAVES=1, read once per process,
    hence the subprocess) each warp dequantizes several chunks in turn: 16.8M elements are about
    two waves of chunks on an H200 (132 SMs x 8 blocks x 8 warps x 1024 = 8.7M for bf16)."""
    # The child imports the same build as this process.
    root = os.path.dirname(os.path.dirname(os.path.abspath(rslora_fast.__file__)))
    path = os.pathsep.join(d for d in (root, os.environ.get("PYTHONPATH")) if d)
    env = dict(os.environ, RSLORA_FAST_MAX_WAVES="1", PYTHONPATH=path)
    res = subprocess.run(
        [sys.executable, "-c", _CAPPED_GRID], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
