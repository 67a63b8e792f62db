"""Byte compatibility of rslora_fast's NF4/FP4 quantization with bitsandbytes (CPU, test-only dep).

Expected values come from bitsandbytes itself and from float64 math; the code under test is the
Rust CPU path behind ``rslora_fast.quant.functional`` (and its plain-torch reference).
"""

from __future__ import annotations

import json

import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from rslora_fast import _native  # noqa: E402
from rslora_fast.errors import QuantFormatError  # noqa: E402
from rslora_fast.quant import functional as F  # noqa: E402

SHAPES = [(7, 13), (64, 64), (33, 65), (130, 257), (1, 1), (5,), (3, 4096 + 5)]


def _core():
    core = _native.core_or_none()
    if core is None:
        pytest.skip("rslora_fast._core not built")
    return core


def _f64_dequant(packed, absmax_f32, code, blocksize, n):
    """Independent float64 dequantization from bytes and float32 scales."""
    b = packed.reshape(-1).to(torch.int64)
    nib = torch.stack([b >> 4, b & 15], 1).reshape(-1)[:n]
    idx = torch.arange(n) // blocksize
    return code.double()[nib] * absmax_f32.double()[idx]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 4096])
def test_bytes_equal_bitsandbytes(quant_type, compress, blocksize):
    _core()
    gen = torch.Generator().manual_seed(blocksize * 7 + compress * 3 + (quant_type == "fp4"))
    for i, shape in enumerate(SHAPES):
        dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
        w = (torch.randn(*shape, generator=gen) * 0.05).to(dtype)
        ref_p, ref_s = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                          compress_statistics=compress)  # fmt: skip
        p, s = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=compress)
        ctx = f"{shape} {dtype}"
        assert p.dtype == torch.uint8 and p.shape == ref_p.shape, ctx
        assert torch.equal(p, ref_p), ctx
        assert torch.equal(s.absmax, ref_s.absmax), ctx
        assert torch.equal(s.code, ref_s.code), ctx
        assert s.shape == ref_s.shape and s.dtype == ref_s.dtype
        if compress:
            assert torch.equal(s.nested_absmax, ref_s.state2.absmax), ctx
            assert torch.equal(s.nested_code, ref_s.state2.code), ctx
            assert s.nested_offset == ref_s.offset.item(), ctx
        # Dequantized values: float64 math on bitsandbytes' own scales, rounded to float32 once.
        n = w.numel()
        scales = (
            ref_s.absmax
            if not compress
            else bnbf.dequantize_blockwise(ref_s.absmax, ref_s.state2) + ref_s.offset
        )
        want = _f64_dequant(ref_p, scales.float(), ref_s.code, blocksize, n)
        got = F.dequantize_4bit(p, s, dtype=torch.float32).reshape(-1)
        torch.testing.assert_close(got.double(), want, rtol=2**-23, atol=0)
        # bitsandbytes' CPU dequantize agrees too, except where its AVX-512 path mis-indexes
        # scales for rows shorter than a block (seen in 0.50.2 for (64, 64) with blocksize >= 128).
        if len(shape) == 1 or shape[-1] % 16 or shape[-1] % blocksize == 0:
            ref_d = bnbf.dequantize_4bit(ref_p, ref_s)
            assert torch.equal(F.dequantize_4bit(p, s), ref_d), ctx


def test_reference_matches_rust_path():
    _core()
    gen = torch.Generator().manual_seed(1)
    for qt in ("nf4", "fp4"):
        w = torch.randn(301, 77, generator=gen)
        p1, s1 = F.quantize_4bit(w, 64, qt, True)
        p2, s2 = F.quantize_4bit_reference(w, 64, qt, True)
        assert torch.equal(p1, p2) and torch.equal(s1.absmax, s2.absmax)
        assert torch.equal(s1.nested_absmax, s2.nested_absmax) and s1.nested_offset == s2.nested_offset
        assert torch.equal(F.dequantize_4bit(p1, s1), F.dequantize_4bit_reference(p2, s2))


def test_dynamic_map_equals_bitsandbytes():
    core = _core()
    want = bnbf.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8).float()
    assert torch.equal(torch.tensor(core.dynamic_map(), dtype=torch.float32), want)
    assert torch.equal(F.dynamic_map(), want)
    assert want[0] == torch.tensor(-0.99296875) and want[127].item() == 0.0 and want[255].item() == 1.0


def test_tables_equal_bitsandbytes():
    for qt in ("nf4", "fp4"):
        assert torch.equal(F.get_4bit_code(qt), bnbf.get_4bit_type(qt, device="cpu"))


def test_zero_and_constant_blocks():
    _core()
    w = torch.zeros(3, 67)
    w[1, :5] = 1.0
    for compress in (False, True):
        rp, rs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=compress)
        p, s = F.quantize_4bit(w, 64, "nf4", compress)
        assert torch.equal(p, rp) and torch.equal(s.absmax, rs.absmax)


def test_quant_state_json_and_keys_like_bitsandbytes():
    _core()
    w = torch.randn(40, 24, dtype=torch.bfloat16)
    for compress, qt in ((True, "nf4"), (False, "fp4")):
        rp, rs = bnbf.quantize_4bit(w, blocksize=64, quant_type=qt, compress_statistics=compress)
        p, s = F.quantize_4bit(w, 64, qt, compress)
        ref = {f"m.weight.{k}": v for k, v in rs.as_dict(packed=True).items()}
        ours = s.as_bnb_dict("m", p)
        assert set(ours) == set(ref) | {"m.weight"}
        for k, v in ref.items():
            assert torch.equal(ours[k], v), k
        raw = bytes(ours[f"m.weight.quant_state.bitsandbytes__{qt}"].tolist())
        core = _native.core_or_none()
        assert core.quant_state_json(qt, 64, "bfloat16", [40, 24], s.nested_offset) == raw
        # And back: our loader reads bitsandbytes' tensors.
        tensors = dict(ref)
        tensors["m.weight"] = rp
        packed, st = F.QuantState.from_bnb_dict("m", tensors)
        assert torch.equal(packed, rp)
        assert torch.equal(F.dequantize_4bit(packed, st), bnbf.dequantize_4bit(rp, rs))


def test_bad_inputs_raise_clear_errors():
    core = _core()
    w = torch.randn(8, 8)
    with pytest.raises(QuantFormatError, match="48"):
        F.quantize_4bit(w, blocksize=48)
    with pytest.raises(QuantFormatError, match="int4"):
        F.quantize_4bit(w, quant_type="int4")
    p, a = torch.empty(32, dtype=torch.uint8), torch.empty(1)
    bufs = (p.data_ptr(), 32, a.data_ptr(), 1)
    with pytest.raises(QuantFormatError, match="48"):
        core.nf4_quantize_cpu(w.data_ptr(), 64, 48, "nf4", *bufs)
    with pytest.raises(QuantFormatError, match="int4"):
        core.nf4_quantize_cpu(w.data_ptr(), 64, 64, "int4", *bufs)
    with pytest.raises(ValueError, match="null"):
        core.nf4_quantize_cpu(0, 64, 64, "nf4", *bufs)
    for raw in (b"{not json", b"[]", json.dumps({"quant_type": "nf4"}).encode(),
                json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [2],
                            "nested_offset": 0.1}).encode()):  # fmt: skip
        with pytest.raises(QuantFormatError):
            core.parse_quant_state(raw)
    p, s = F.quantize_4bit(w)
    d = s.as_bnb_dict("x", p)
    d["x.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{broken"), dtype=torch.uint8)
    with pytest.raises(QuantFormatError):
        F.QuantState.from_bnb_dict("x", d)
    d = s.as_bnb_dict("x", p)
    del d["x.weight.nested_absmax"]
    with pytest.raises(QuantFormatError, match="nested_absmax"):
        F.QuantState.from_bnb_dict("x", d)
    with pytest.raises(ValueError, match="out"):
        F.dequantize_4bit(p, s, out=torch.empty(3))


def test_out_buffer_is_written():
    _core()
    w = torch.randn(33, 17, dtype=torch.bfloat16)
    p, s = F.quantize_4bit(w)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        out = torch.full((33 * 17,), float("nan"), dtype=dt)
        res = F.dequantize_4bit(p, s, out=out)
        assert res is out
        assert torch.equal(out.view(33, 17), F.dequantize_4bit_reference(p, s, dtype=dt))


def test_truncated_code_tables_are_rejected():
    from rslora_fast.errors import QuantFormatError
    from rslora_fast.quant.functional import QuantState, quantize_4bit

    packed, state = quantize_4bit(torch.randn(64, 48), blocksize=64, compress_statistics=True)
    good = state.as_bnb_dict("w", packed)
    for key, n in (("w.weight.nested_quant_map", 255), ("w.weight.quant_map", 15)):
        bad = dict(good)
        bad[key] = good[key][:n]
        with pytest.raises(QuantFormatError, match="entries"):
            QuantState.from_bnb_dict("w", bad)
