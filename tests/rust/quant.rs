//! Tests of `rslora_fast::quant`: tables, packing order, odd sizes, partial blocks, round-trip
//! error, double quantization and the quant_state JSON. Expected values come from the format
//! definition (docs/formats.md, "NF4 / FP4") and float64 math, never from the code under test.

use rslora_fast::quant::codebook::{dynamic_lut, encode8};
use rslora_fast::quant::*;
use rslora_fast::Error;

/// Small deterministic generator (xorshift) so tests need no extra crates.
fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
        })
        .collect()
}

fn nearest(code: &[f32; 16], x: f32) -> usize {
    let mut best = 0;
    for i in 1..16 {
        if ((code[i] - x).abs() as f64) < ((code[best] - x).abs() as f64) {
            best = i;
        }
    }
    best
}

fn quant(x: &[f32], bs: usize, qt: QuantType) -> (Vec<u8>, Vec<f32>) {
    let mut p = vec![0u8; packed_len(x.len())];
    let mut a = vec![0f32; num_blocks(x.len(), bs)];
    quantize_4bit(x, bs, qt, &mut p, &mut a).unwrap();
    (p, a)
}

#[test]
fn tables_match_the_format() {
    assert_eq!(NF4[0], -1.0);
    assert_eq!(NF4[7], 0.0);
    assert_eq!(NF4[15], 1.0);
    assert!(NF4.windows(2).all(|w| w[0] < w[1]));
    let mags = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0];
    for (i, m) in mags.iter().enumerate() {
        assert_eq!(FP4[i], (m / 12.0) as f32);
        assert_eq!(FP4[i + 8], -(m / 12.0) as f32);
    }
    assert_eq!(QuantType::Nf4.zero_code(), 7);
    assert_eq!(QuantType::Fp4.zero_code(), 0);
}

#[test]
fn nf4_midpoints_ties_go_low() {
    let enc = QuantType::Nf4.encoder();
    for i in 0..15 {
        let t = enc.midpoints[i];
        assert_eq!(
            enc.encode(t) as usize,
            i,
            "tie at midpoint {i} goes to the lower code"
        );
        let above = f32::from_bits(
            t.to_bits()
                .wrapping_add(if t >= 0.0 { 1 } else { u32::MAX }),
        );
        assert!(above > t);
        assert_eq!(enc.encode(above) as usize, i + 1);
    }
}

#[test]
fn encoding_is_nearest_away_from_ties() {
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        let code = qt.code();
        for x in rand_vec(20_000, 3, 1.0) {
            let got = qt.encoder().encode(x) as usize;
            let want = nearest(code, x);
            assert_eq!(code[got], code[want], "{qt:?} x={x}");
        }
    }
}

#[test]
fn packing_high_nibble_first_and_odd_padding() {
    // One block: absmax 1, values exactly on codes.
    let x = [1.0f32, -1.0, 0.0];
    let (p, a) = quant(&x, 64, QuantType::Nf4);
    assert_eq!(a, vec![1.0]);
    assert_eq!(p, vec![0xF0, 0x77]); // codes 15,0 | 7, pad 7
    let (p, _) = quant(&x, 64, QuantType::Fp4);
    assert_eq!(p, vec![(3 << 4) | 11, 0x00]); // +1 is code 3, -1 code 11, pad 0
}

#[test]
fn partial_blocks_and_scales() {
    for &(n, bs) in &[
        (1usize, 32usize),
        (33, 32),
        (100, 64),
        (4097, 4096),
        (777, 128),
    ] {
        let x = rand_vec(n, n as u64, 3.0);
        let (p, a) = quant(&x, bs, QuantType::Nf4);
        assert_eq!(p.len(), n.div_ceil(2));
        assert_eq!(a.len(), n.div_ceil(bs));
        for (b, &s) in a.iter().enumerate() {
            let blk = &x[b * bs..((b + 1) * bs).min(n)];
            let want = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(s, want);
        }
        // Every code decodes to the nearest table value of x/absmax (float64 check).
        for (i, &v) in x.iter().enumerate() {
            let byte = p[i / 2];
            let c = if i % 2 == 0 { byte >> 4 } else { byte & 15 } as usize;
            let s = a[i / bs] as f64;
            let err = (NF4[c] as f64 - v as f64 / s).abs();
            let best = NF4
                .iter()
                .map(|&q| (q as f64 - v as f64 / s).abs())
                .fold(9.0, f64::min);
            assert!(err <= best + 1e-6, "i={i}");
        }
    }
}

#[test]
fn zero_blocks() {
    let mut x = vec![0f32; 64 + 3];
    x[64] = 1.0;
    let (_, a) = quant(&x, 64, QuantType::Nf4);
    assert_eq!(a[0], 0.0); // a full zero block keeps scale 0
    let x = vec![0f32; 64 + 3];
    let (p, a) = quant(&x, 64, QuantType::Nf4);
    assert_eq!(a[1], 1e-38f32); // a partial one stores the clamp floor
    assert!(p.iter().all(|&b| b == 0x77));
}

#[test]
fn bad_blocksize_is_named() {
    let x = [1.0f32; 96];
    let mut p = vec![0u8; 48];
    let mut a = vec![0f32; 2];
    for bs in [0usize, 16, 48, 8192] {
        let err = quantize_4bit(&x, bs, QuantType::Nf4, &mut p, &mut a).unwrap_err();
        assert!(matches!(err, Error::QuantFormat(_)));
        assert!(err.to_string().contains(&bs.to_string()), "{err}");
    }
    assert!(matches!(
        QuantType::parse("int4"),
        Err(Error::QuantFormat(_))
    ));
}

#[test]
fn round_trip_error_bound() {
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        for bs in [32, 64, 256, 4096] {
            let n = 10_001;
            let x = rand_vec(n, bs as u64, 0.1);
            let (p, a) = quant(&x, bs, qt);
            let mut y = vec![0f32; n];
            dequantize_4bit(&p, &a, bs, qt, &mut y).unwrap();
            let code = qt.code();
            // The largest gap between neighbouring codes bounds the error per unit of scale.
            let mut s: Vec<f32> = code.to_vec();
            s.sort_by(f32::total_cmp);
            let gap = s
                .windows(2)
                .map(|w| (w[1] - w[0]) as f64)
                .fold(0.0, f64::max);
            for i in 0..n {
                let bound = a[i / bs] as f64 * gap / 2.0 + 1e-7;
                assert!(
                    ((x[i] - y[i]) as f64).abs() <= bound,
                    "{qt:?} bs={bs} i={i}"
                );
            }
        }
    }
}

#[test]
fn dynamic_map_definition() {
    let m = dynamic_map();
    assert_eq!(m.len(), 256);
    assert!(m.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(m[0], -0.99296875);
    assert_eq!(m[127], 0.0);
    assert_eq!(m[255], 1.0);
    // Smallest positive: mean of 0.1 and 1.0, times 1e-6.
    assert!((m[128] as f64 - 0.55e-6).abs() < 1e-12);
    // Symmetric apart from the extra 1.0.
    for i in 0..127 {
        assert_eq!(m[i], -m[254 - i]);
    }
}

#[test]
fn lut_encoder_close_to_nearest() {
    let m = dynamic_map();
    let lut = dynamic_lut();
    for v in rand_vec(50_000, 9, 1.0) {
        let c = encode8(lut, v) as usize;
        let best = m.iter().map(|&q| (q - v).abs()).fold(9.0f32, f32::min);
        // The LUT resolution is 2/65535: it may pick a neighbour within that distance.
        assert!((m[c] - v).abs() <= best + 2.0 / 65535.0, "v={v}");
    }
}

#[test]
fn double_quant_round_trip() {
    let absmax: Vec<f32> = rand_vec(1000, 5, 1.0)
        .iter()
        .map(|v| v.abs() + 0.01)
        .collect();
    let s = double_quant(&absmax);
    let mean = absmax.iter().map(|&v| v as f64).sum::<f64>() / 1000.0;
    assert!((s.offset as f64 - mean).abs() < 1e-6);
    assert_eq!(s.nested_absmax.len(), 4);
    for b in 0..4 {
        let blk = &absmax[b * 256..((b + 1) * 256).min(1000)];
        let want = blk.iter().fold(0f32, |m, &v| m.max((v - s.offset).abs()));
        assert_eq!(s.nested_absmax[b], want);
    }
    let mut back = vec![0f32; 1000];
    dequant_scales(&s.codes, &s.nested_absmax, s.offset, &mut back).unwrap();
    for i in 0..1000 {
        // The dynamic map's spacing is at most ~0.0141 near 1: error <= 1% of the block scale.
        let tol = s.nested_absmax[i / 256] as f64 * 0.0075;
        assert!(((back[i] - absmax[i]) as f64).abs() <= tol, "i={i}");
    }
    // A constant input: every value equals the offset, so the nested scale is 0 and codes are 0.
    let s = double_quant(&[0.5f32; 10]);
    assert_eq!(s.offset, 0.5);
    assert_eq!(s.nested_absmax, vec![0.0]);
    assert!(s.codes.iter().all(|&c| c == 0));
}

#[test]
fn json_round_trip_and_exact_bytes() {
    let st = QuantState {
        quant_type: QuantType::Nf4,
        blocksize: 64,
        dtype: "bfloat16".into(),
        shape: vec![8, 9],
        nested: Some((256, 399.0 / 256.0)), // 1.55859375
    };
    let raw = st.to_json();
    assert_eq!(
        String::from_utf8(raw.clone()).unwrap(),
        "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [8, 9], \
         \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 1.55859375}"
    );
    assert_eq!(QuantState::from_json(&raw).unwrap(), st);
    let plain = QuantState {
        nested: None,
        quant_type: QuantType::Fp4,
        ..st.clone()
    };
    assert_eq!(
        String::from_utf8(plain.to_json()).unwrap(),
        "{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [8, 9]}"
    );
    assert_eq!(QuantState::from_json(&plain.to_json()).unwrap(), plain);
}

#[test]
fn python_repr_of_floats() {
    // Values as Python's repr() prints them.
    for (x, want) in [
        (0.0516902282834053f64, "0.0516902282834053"),
        (1.5, "1.5"),
        (1e-5, "1e-05"),
        (0.0001, "0.0001"),
        (1.2345e-7, "1.2345e-07"),
        (100.0, "100.0"),
        (1e16, "1e+16"),
        (-0.25, "-0.25"),
    ] {
        assert_eq!(python_float_repr(x), want);
    }
}

#[test]
fn corrupt_json_is_quant_format_error() {
    for raw in [
        &b"not json"[..],
        b"[1, 2]",
        b"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\"}",
        b"{\"quant_type\": \"int4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [2]}",
        b"{\"quant_type\": \"nf4\", \"blocksize\": 48, \"dtype\": \"bfloat16\", \"shape\": [2]}",
        b"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"int8\", \"shape\": [2]}",
        b"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float16\", \"shape\": [-2]}",
        b"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float16\", \"shape\": [2], \"nested_offset\": 0.1}",
        b"\xff\xfe",
    ] {
        let err = QuantState::from_json(raw).unwrap_err();
        assert!(matches!(err, Error::QuantFormat(_)), "{err}");
    }
}

#[test]
fn quantized_tensor_end_to_end() {
    let x = rand_vec(37 * 11, 42, 0.02);
    let q = QuantizedTensor::quantize(&x, &[37, 11], "float16", 64, QuantType::Nf4, true).unwrap();
    assert_eq!(q.packed.len(), 204);
    assert!(q.state.nested.is_some());
    let y = q.dequantize().unwrap();
    let err = x
        .iter()
        .zip(&y)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err < 0.02 * 0.2, "max err {err}");
    assert_eq!(bnb_key_suffixes(QuantType::Nf4, true).len(), 5);
    assert!(QuantizedTensor::quantize(&x, &[5, 5], "float16", 64, QuantType::Nf4, true).is_err());
}

#[test]
fn json_escapes_the_dtype_string() {
    let st = QuantState {
        quant_type: QuantType::Nf4,
        blocksize: 64,
        dtype: "float16\", \"blocksize\": 4096, \"x\": \"\\".into(),
        shape: vec![2],
        nested: None,
    };
    let v: serde_json::Value = serde_json::from_slice(&st.to_json()).expect("valid JSON");
    assert_eq!(v["dtype"], serde_json::Value::String(st.dtype.clone()));
    assert_eq!(v["blocksize"], 64, "the dtype text cannot inject keys");
    assert!(v.get("x").is_none());
}

#[test]
fn nan_and_inf_are_kept_as_bitsandbytes_keeps_them() {
    // Oracle: bitsandbytes 0.50 CPU quantize_4bit on the same input (blocksize 64, nf4):
    // a block holding NaN gets a NaN scale and every code 15; a block holding +inf gets an inf
    // scale, code 7 (zero) for finite values and 15 for the inf (inf * 0 is NaN).
    let mut x = vec![0.5f32; 128];
    x[3] = f32::NAN;
    x[70] = f32::INFINITY;
    let (p, a) = quant(&x, 64, QuantType::Nf4);
    assert!(a[0].is_nan(), "f32::max would skip the NaN: {}", a[0]);
    assert_eq!(a[1], f32::INFINITY);
    assert!(p[..32].iter().all(|&b| b == 0xFF), "{:?}", &p[..4]);
    assert_eq!(p[35], 0xF7, "index 70 is a high nibble");
    assert_eq!(p[34], 0x77);
    let mut out = vec![0.0f32; 128];
    dequantize_4bit(&p, &a, 64, QuantType::Nf4, &mut out).unwrap();
    assert!(out[..64].iter().all(|v| v.is_nan()));
    assert_eq!(out[70], f32::INFINITY);
}
