"""GPU tests of the NF4/FP4 kernels (marker ``cuda``; skipped without a GPU).

References: the plain-torch/float64 dequantization of the same bytes and scales, and the Rust CPU
quantizer (itself pinned to bitsandbytes in test_quant_bnb.py).
"""

from __future__ import annotations

import pytest
import torch

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


def test_dequant_into_out_and_unaligned():
    w = torch.randn(77, 131, device="cuda")
    p, s = F.quantize_4bit(w, 64, "nf4", True)
    want = _want(p, s, torch.bfloat16)
    out = torch.empty(77 * 131, dtype=torch.bfloat16, device="cuda")
    assert F.dequantize_4bit(p, s, out=out) is out
    torch.testing.assert_close(out.view(77, 131).cpu(), want, rtol=0, atol=0)
    # Output buffer offset by one element (not 16-byte aligned): the scalar path must be used.
    big = torch.empty(77 * 131 + 1, dtype=torch.bfloat16, device="cuda")
    F.dequantize_4bit(p, s, out=big[1:])
    torch.testing.assert_close(big[1:].view(77, 131).cpu(), want, rtol=0, atol=0)


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
    core = F._core_or_none()
    w = torch.randn(999, 1001, device="cuda", dtype=torch.bfloat16)
    p, s = F.quantize_4bit(w, 64, "nf4", True)
    _, s_plain = F.quantize_4bit(w, 64, "nf4", False)
    absmax = s_plain.absmax.cpu()
    q8 = torch.empty(absmax.numel(), dtype=torch.uint8)
    nested = torch.empty(-(-absmax.numel() // 256), dtype=torch.float32)
    core.double_quant_cpu(
        absmax.data_ptr(), absmax.numel(), s.nested_offset, q8.data_ptr(), nested.data_ptr()
    )
    assert torch.equal(s.absmax.cpu(), q8)
    assert torch.equal(s.nested_absmax.cpu(), nested)


def test_quantize_dequantize_round_trip_error():
    w = torch.randn(512, 768, device="cuda", dtype=torch.bfloat16)
    p, s = F.quantize_4bit(w, 64, "nf4", True)
    back = F.dequantize_4bit(p, s)
    rel = ((back.float() - w.float()).norm() / w.float().norm()).item()
    assert rel < 0.12, rel


# Warp-chunk dequantize variants (RSLORA_FAST_NF4_DEQUANT, read by the launcher on every call).
# ":0" is one resident wave looping over chunks, ":3" three chunks per warp (the loop and, for
# warp4p, the next-chunk prefetch run at every size); plain names give one chunk per warp.
VARIANTS = ["warp4", "warp4:0", "warp4p:0", "warp4p:3", "warp8", "warp8:0", "warp8:3"]
# Odd sizes (only the tail path), sizes spanning several chunks plus a tail, several nested
# groups of 256 blocks, and one large enough that a resident wave loops (> 8.6M elements).
VARIANT_SHAPES = [(3, 5), (17, 33), (33, 65), (129, 257), (1000, 4099), (4096, 4099)]


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequant_variants_match_reference(monkeypatch, compress, out_dtype):
    gen = torch.Generator().manual_seed(100 + DTYPES.index(out_dtype) * 2 + compress)
    for i, shape in enumerate(VARIANT_SHAPES):
        quant_type = "nf4" if i % 2 == 0 else "fp4"
        for bs in (32, 64, 256, 4096) if shape[0] < 4096 else (32, 64):
            w = torch.randn(*shape, generator=gen) * 0.02
            p, s = F.quantize_4bit(w, bs, quant_type, compress)  # CPU path
            want = _want(p, s, out_dtype).view(torch.uint8)
            pc, sc = p.cuda(), s.to("cuda")
            for variant in VARIANTS:
                monkeypatch.setenv("RSLORA_FAST_NF4_DEQUANT", variant)
                got = F.dequantize_4bit(pc, sc, dtype=out_dtype)
                assert torch.equal(got.cpu().view(torch.uint8), want), (variant, shape, bs, quant_type)


@pytest.mark.parametrize("variant", ["warp4", "warp8:0"])
def test_dequant_variant_into_out_and_unaligned(monkeypatch, variant):
    monkeypatch.setenv("RSLORA_FAST_NF4_DEQUANT", variant)
    w = torch.randn(301, 1031, device="cuda")
    p, s = F.quantize_4bit(w, 64, "nf4", True)
    want = _want(p, s, torch.bfloat16)
    out = torch.full((301 * 1031,), float("nan"), dtype=torch.bfloat16, device="cuda")
    assert F.dequantize_4bit(p, s, out=out) is out
    torch.testing.assert_close(out.view(301, 1031).cpu(), want, rtol=0, atol=0)
    # An output offset by one element is not 16-byte aligned: the launcher falls back.
    big = torch.full((301 * 1031 + 1,), float("nan"), dtype=torch.bfloat16, device="cuda")
    F.dequantize_4bit(p, s, out=big[1:])
    torch.testing.assert_close(big[1:].view(301, 1031).cpu(), want, rtol=0, atol=0)
    assert torch.isnan(big[0].float())  # nothing written before the buffer


def test_dequant_variant_bad_name_raises(monkeypatch):
    monkeypatch.setenv("RSLORA_FAST_NF4_DEQUANT", "warp16")
    p, s = F.quantize_4bit(torch.randn(64, 64, device="cuda"), 64, "nf4", True)
    with pytest.raises(ValueError, match="RSLORA_FAST_NF4_DEQUANT"):
        F.dequantize_4bit(p, s)
