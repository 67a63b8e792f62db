//! Blockwise 4-bit quantization and dequantization on the CPU (rayon over chunks of blocks),
//! and the double quantization of the block scales.
//!
//! The arithmetic copies bitsandbytes' exactly (byte equality is the contract): full blocks
//! multiply by the float32 reciprocal of the block absmax (clamped to 1e-38), a partial last
//! block divides by its clamped absmax (and stores the clamped value), values are clamped to
//! [-1, 1] and encoded against the float32 midpoints of the table.

use rayon::prelude::*;

use super::codebook::{dynamic_lut, dynamic_map, encode8, QuantType};
use crate::{Error, Result};

/// Block size of the nested (double) quantization of the scales.
pub const NESTED_BLOCKSIZE: usize = 256;

/// Smallest absmax used as a divisor (bitsandbytes clamps with `min=1e-38`).
const TINY: f32 = 1e-38;

/// Check a blocksize: a power of two in 32..=4096.
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if (32..=4096).contains(&blocksize) && blocksize.is_power_of_two() {
        Ok(())
    } else {
        Err(Error::QuantFormat(format!(
            "blocksize {blocksize} not allowed; expected a power of two in 32..4096"
        )))
    }
}

/// Number of blocks of `n` elements.
pub fn num_blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

/// Bytes of the packed codes of `n` elements.
pub fn packed_len(n: usize) -> usize {
    n.div_ceil(2)
}

/// Largest |x| of a block, NaN when the block holds a NaN (`f32::max` would skip it and turn a
/// NaN weight into a finite one; bitsandbytes keeps it, so the block dequantizes to NaN).
fn block_absmax(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| {
        if m.is_nan() || v.is_nan() {
            f32::NAN
        } else {
            m.max(v.abs())
        }
    })
}

/// `am` clamped to [`TINY`] as a divisor; NaN stays NaN (`f32::max` would return `TINY`).
fn at_least_tiny(am: f32) -> f32 {
    if am.is_nan() {
        am
    } else {
        am.max(TINY)
    }
}

/// Blocks handed to one rayon task: enough work to amortize scheduling (>= 64K elements).
fn blocks_per_task(blocksize: usize) -> usize {
    (65536 / blocksize).max(1)
}

/// Quantize `src` (contiguous, row-major) blockwise into `packed` (`ceil(n/2)` bytes, first
/// element in the high nibble) and `absmax` (`ceil(n/blocksize)` float32 scales).
pub fn quantize_4bit(
    src: &[f32],
    blocksize: usize,
    qt: QuantType,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    let n = src.len();
    check_4bit_lens(n, blocksize, packed.len(), absmax.len())?;
    if n == 0 {
        return Ok(());
    }
    let enc = qt.encoder();
    let zero = qt.zero_code();
    let bpt = blocks_per_task(blocksize);
    // blocksize is even, so each block owns blocksize/2 whole bytes (the last one fewer).
    packed
        .par_chunks_mut(bpt * blocksize / 2)
        .zip(absmax.par_chunks_mut(bpt))
        .enumerate()
        .for_each(|(t, (bytes, scales))| {
            let base = t * bpt * blocksize;
            for (b, scale) in scales.iter_mut().enumerate() {
                let start = base + b * blocksize;
                let end = (start + blocksize).min(n);
                let x = &src[start..end];
                let am = block_absmax(x);
                let full = end - start == blocksize;
                let out = &mut bytes[b * blocksize / 2..];
                if full {
                    *scale = am;
                    let inv = 1.0f32 / at_least_tiny(am);
                    for (k, pair) in x.chunks_exact(2).enumerate() {
                        let hi = enc.encode((pair[0] * inv).clamp(-1.0, 1.0));
                        let lo = enc.encode((pair[1] * inv).clamp(-1.0, 1.0));
                        out[k] = (hi << 4) | lo;
                    }
                } else {
                    let am = at_least_tiny(am);
                    *scale = am;
                    for (k, pair) in x.chunks(2).enumerate() {
                        let hi = enc.encode((pair[0] / am).clamp(-1.0, 1.0));
                        let lo = match pair.get(1) {
                            Some(v) => enc.encode((v / am).clamp(-1.0, 1.0)),
                            None => zero,
                        };
                        out[k] = (hi << 4) | lo;
                    }
                }
            }
        });
    Ok(())
}

/// Dequantize `n` elements from `packed` and per-block `absmax` into `out` (float32).
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    qt: QuantType,
    out: &mut [f32],
) -> Result<()> {
    let n = out.len();
    check_4bit_lens(n, blocksize, packed.len(), absmax.len())?;
    let code = qt.code();
    let bpt = blocks_per_task(blocksize);
    out.par_chunks_mut(bpt * blocksize)
        .enumerate()
        .for_each(|(t, chunk)| {
            for (b, blk) in chunk.chunks_mut(blocksize).enumerate() {
                let g = t * bpt + b;
                let s = absmax[g];
                let bytes = &packed[g * blocksize / 2..];
                for (k, pair) in blk.chunks_mut(2).enumerate() {
                    let byte = bytes[k];
                    pair[0] = code[(byte >> 4) as usize] * s;
                    if let Some(v) = pair.get_mut(1) {
                        *v = code[(byte & 0xF) as usize] * s;
                    }
                }
            }
        });
    Ok(())
}

/// Double-quantized block scales: 8-bit codes of `absmax - offset` (dynamic map), one float32
/// scale per 256 of them, and the offset.
#[derive(Clone, Debug, PartialEq)]
pub struct NestedScales {
    /// One code per block scale.
    pub codes: Vec<u8>,
    /// One float32 absmax per 256 codes.
    pub nested_absmax: Vec<f32>,
    /// The mean subtracted before quantizing.
    pub offset: f32,
}

/// Mean of the scales as float32. bitsandbytes uses torch's float32 `mean()`; we sum in float64
/// and round once, which agrees with it except possibly in the last bit (callers that need
/// bit-exactness with torch pass torch's mean to [`double_quant_with_offset`]).
pub fn mean_f32(x: &[f32]) -> f32 {
    if x.is_empty() {
        return 0.0;
    }
    (x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64) as f32
}

/// Double quantization with the offset computed by [`mean_f32`].
pub fn double_quant(absmax: &[f32]) -> NestedScales {
    let mut s = NestedScales {
        codes: vec![0; absmax.len()],
        nested_absmax: vec![0.0; absmax.len().div_ceil(NESTED_BLOCKSIZE)],
        offset: mean_f32(absmax),
    };
    double_quant_into(absmax, s.offset, &mut s.codes, &mut s.nested_absmax)
        .expect("buffers sized above");
    s
}

/// Double quantization around a given `offset` (e.g. torch's float32 mean).
pub fn double_quant_with_offset(absmax: &[f32], offset: f32) -> NestedScales {
    let mut s = NestedScales {
        codes: vec![0; absmax.len()],
        nested_absmax: vec![0.0; absmax.len().div_ceil(NESTED_BLOCKSIZE)],
        offset,
    };
    double_quant_into(absmax, offset, &mut s.codes, &mut s.nested_absmax)
        .expect("buffers sized above");
    s
}

/// Quantize `absmax - offset` blockwise (256) with the signed 8-bit dynamic map into caller
/// buffers, exactly like bitsandbytes' CPU blockwise quantizer (see
/// [`super::codebook::dynamic_lut`]). An all-zero block gets scale 0 and code 0.
pub fn double_quant_into(
    absmax: &[f32],
    offset: f32,
    codes: &mut [u8],
    nested_absmax: &mut [f32],
) -> Result<()> {
    check_double_lens(absmax.len(), ("codes", codes.len()), nested_absmax.len())?;
    let lut = dynamic_lut();
    codes
        .par_chunks_mut(NESTED_BLOCKSIZE)
        .zip(nested_absmax.par_iter_mut())
        .enumerate()
        .for_each(|(b, (out, scale))| {
            let src = &absmax[b * NESTED_BLOCKSIZE..b * NESTED_BLOCKSIZE + out.len()];
            let am = src.iter().fold(0.0f32, |m, &v| m.max((v - offset).abs()));
            *scale = am;
            if am == 0.0 {
                out.fill(0);
                return;
            }
            let inv = 1.0f32 / am;
            for (o, &v) in out.iter_mut().zip(src) {
                *o = encode8(lut, (v - offset) * inv);
            }
        });
    Ok(())
}

/// Undo double quantization: `scale[b] = map[code[b]] * nested_absmax[b / 256] + offset`
/// (float32 multiply, then float32 add, as bitsandbytes does).
pub fn dequant_scales(
    codes: &[u8],
    nested_absmax: &[f32],
    offset: f32,
    out: &mut [f32],
) -> Result<()> {
    check_double_lens(codes.len(), ("out", out.len()), nested_absmax.len())?;
    let map = dynamic_map();
    for (i, (o, &c)) in out.iter_mut().zip(codes).enumerate() {
        *o = map[c as usize] * nested_absmax[i / NESTED_BLOCKSIZE] + offset;
    }
    Ok(())
}

/// Check the blocksize and the buffers of `n` 4-bit elements: `packed` bytes and `absmax` scales.
fn check_4bit_lens(n: usize, blocksize: usize, packed: usize, absmax: usize) -> Result<()> {
    check_blocksize(blocksize)?;
    check_len("packed", packed, packed_len(n))?;
    check_len("absmax", absmax, num_blocks(n, blocksize))
}

/// Check the buffers of `n` double-quantized scales: one element of buffer `name` per scale and
/// `nested_absmax` one per [`NESTED_BLOCKSIZE`] of them.
fn check_double_lens(n: usize, (name, len): (&str, usize), nested_absmax: usize) -> Result<()> {
    check_len(name, len, n)?;
    check_len("nested_absmax", nested_absmax, n.div_ceil(NESTED_BLOCKSIZE))
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{what} buffer has {got} elements, expected {want}"
        )))
    }
}
