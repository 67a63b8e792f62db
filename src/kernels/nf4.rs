//! Launchers for `kernels/nf4.cu`: NF4/FP4 dequantize (plain or double-quantized scales) into a
//! caller-provided buffer, and quantize (same bytes as the CPU path in `crate::quant`).

use std::ffi::c_void;

use super::{all_aligned16, check_ptrs, elementwise_grid, DType};
use crate::cuda::{self, LaunchConfig, RawStream};
use crate::quant::{check_blocksize, QuantType};
use crate::{Error, Result};

const THREADS: u32 = 256;
fn dequant_kernel(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "nf4_dequant_f32",
        DType::F16 => "nf4_dequant_f16",
        DType::BF16 => "nf4_dequant_bf16",
    }
}

/// Which dequantize kernel runs: the per-unit kernel (default) or a warp-chunk variant, picked by
/// `RSLORA_FAST_NF4_DEQUANT` for side-by-side measurement (read on every call so one process can
/// time each): `unit` (default), `warp4`, `warp4p` or `warp8`, optionally `:C` for C chunks per
/// warp (default 1; 0 = one resident wave of blocks looping over the tensor). Once measured the
/// winner becomes the only path and this switch goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DequantVariant {
    /// One store unit per thread per step, scales rebuilt per unit (`nf4_dequant_<dtype>`).
    Unit,
    /// Warp chunks of 32 * `units` store units, scales fetched once per warp
    /// (`nf4_dequant_warp{4,4p,8}_<dtype>`); `pipelined` requests chunk i + 1 before storing
    /// chunk i; `chunks_per_warp` sizes the grid (0 = one resident wave).
    Warp {
        units: u32,
        pipelined: bool,
        chunks_per_warp: u32,
    },
}

impl DequantVariant {
    /// Parse a `RSLORA_FAST_NF4_DEQUANT` value (empty = [`DequantVariant::Unit`]).
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        let (kind, chunks) = match s.split_once(':') {
            Some((k, c)) => (k, Some(c)),
            None => (s, None),
        };
        let chunks_per_warp = match chunks {
            None => 1,
            Some(c) => c.trim().parse::<u32>().map_err(|_| {
                Error::invalid(format!(
                    "RSLORA_FAST_NF4_DEQUANT={s:?}: chunks per warp must be an integer >= 0"
                ))
            })?,
        };
        let (units, pipelined) = match kind {
            "" | "unit" if chunks.is_none() => return Ok(DequantVariant::Unit),
            "warp4" => (4, false),
            "warp4p" => (4, true),
            "warp8" => (8, false),
            _ => {
                return Err(Error::invalid(format!(
                    "RSLORA_FAST_NF4_DEQUANT={s:?}: expected unit, warp4, warp4p or warp8, \
                     optionally followed by :<chunks per warp>"
                )))
            }
        };
        Ok(DequantVariant::Warp {
            units,
            pipelined,
            chunks_per_warp,
        })
    }

    fn from_env() -> Result<Self> {
        match std::env::var("RSLORA_FAST_NF4_DEQUANT") {
            Ok(v) => Self::parse(&v),
            Err(_) => Ok(DequantVariant::Unit),
        }
    }

    fn kernel(self, dtype: DType) -> &'static str {
        let DequantVariant::Warp {
            units, pipelined, ..
        } = self
        else {
            return dequant_kernel(dtype);
        };
        match (units, pipelined, dtype) {
            (4, false, DType::F32) => "nf4_dequant_warp4_f32",
            (4, false, DType::F16) => "nf4_dequant_warp4_f16",
            (4, false, DType::BF16) => "nf4_dequant_warp4_bf16",
            (4, true, DType::F32) => "nf4_dequant_warp4p_f32",
            (4, true, DType::F16) => "nf4_dequant_warp4p_f16",
            (4, true, DType::BF16) => "nf4_dequant_warp4p_bf16",
            (_, _, DType::F32) => "nf4_dequant_warp8_f32",
            (_, _, DType::F16) => "nf4_dequant_warp8_f16",
            (_, _, DType::BF16) => "nf4_dequant_warp8_bf16",
        }
    }
}

fn quant_kernel(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "nf4_quant_f32",
        DType::F16 => "nf4_quant_f16",
        DType::BF16 => "nf4_quant_bf16",
    }
}

fn qt_code(qt: QuantType) -> i32 {
    match qt {
        QuantType::Nf4 => 0,
        QuantType::Fp4 => 1,
    }
}

/// Where the block scales of a dequantize come from.
#[derive(Clone, Copy, Debug)]
pub enum ScalesPtr {
    /// float32 `[nblocks]`.
    Plain(usize),
    /// Double quantization: uint8 codes `[nblocks]`, float32 nested absmax
    /// `[ceil(nblocks/256)]`, float32 nested map `[256]`, and the offset.
    Nested {
        codes: usize,
        nested_absmax: usize,
        nested_code: usize,
        offset: f32,
    },
}

/// Dequantize `n` elements of packed NF4/FP4 codes into `out` (`dtype`).
///
/// # Safety
/// Every pointer must be a device pointer on `device`: `packed` to `ceil(n/2)` bytes, the scale
/// buffers to the sizes [`ScalesPtr`] names, `out` to `n` elements of `dtype` not overlapping
/// the inputs; all live until the launch has run on `stream`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn dequantize(
    packed: usize,
    scales: ScalesPtr,
    out: usize,
    n: usize,
    blocksize: usize,
    qt: QuantType,
    dtype: DType,
    device: i32,
    stream: RawStream,
) -> Result<()> {
    check_blocksize(blocksize)?;
    if n == 0 {
        return Ok(());
    }
    let (mut absmax, mut codes, mut nested, mut ncode, mut offset) = match scales {
        ScalesPtr::Plain(p) => (p, 0usize, 0usize, 0usize, 0f32),
        ScalesPtr::Nested {
            codes,
            nested_absmax,
            nested_code,
            offset,
        } => {
            check_ptrs(
                "nf4 dequantize (nested scales)",
                &[codes, nested_absmax, nested_code],
            )?;
            (0, codes, nested_absmax, nested_code, offset)
        }
    };
    check_ptrs("nf4 dequantize", &[packed, out])?;
    if absmax == 0 && codes == 0 {
        return Err(Error::invalid("nf4 dequantize: null scale pointer"));
    }
    // The vector body reads 4 (2 for fp32) packed bytes and writes one 16-byte vector per unit.
    let mut vec_ok = (packed % 4 == 0 && all_aligned16(&[out])) as i32;
    // Unaligned buffers take the per-unit kernel's element path whatever the variant.
    let variant = if vec_ok == 1 {
        DequantVariant::from_env()?
    } else {
        DequantVariant::Unit
    };
    let kernel = variant.kernel(dtype);
    let unit_elems = 16 / dtype.size();
    let blocks = match variant {
        // Four 16-byte units per thread (see the note at kUnroll in nf4.cu: with this grid the
        // kernel's plain grid-stride loop runs, which measured faster than its unrolled one).
        DequantVariant::Unit => elementwise_grid(n, 4 * unit_elems, THREADS, || {
            cuda::resident_blocks(device, "nf4", kernel, THREADS)
        })?,
        DequantVariant::Warp {
            units,
            chunks_per_warp,
            ..
        } => {
            let resident = || cuda::resident_blocks(device, "nf4", kernel, THREADS);
            // Each thread covers `units` store units per chunk.
            let per_thread = units as usize * unit_elems;
            if chunks_per_warp == 0 {
                // One resident wave, or fewer blocks when the tensor has fewer chunks.
                let needed = n.div_ceil(per_thread).div_ceil(THREADS as usize).max(1);
                needed.min(resident()? as usize) as u32
            } else {
                elementwise_grid(n, per_thread * chunks_per_warp as usize, THREADS, resident)?
            }
        }
    };
    let mut qt_i = qt_code(qt);
    let mut n64 = n as i64;
    let mut bs_log2 = blocksize.trailing_zeros() as i32;
    let (mut packed, mut out) = (packed, out);
    let mut args = [
        &mut packed as *mut usize as *mut c_void,
        &mut absmax as *mut usize as *mut c_void,
        &mut codes as *mut usize as *mut c_void,
        &mut nested as *mut usize as *mut c_void,
        &mut ncode as *mut usize as *mut c_void,
        &mut offset as *mut f32 as *mut c_void,
        &mut qt_i as *mut i32 as *mut c_void,
        &mut out as *mut usize as *mut c_void,
        &mut n64 as *mut i64 as *mut c_void,
        &mut bs_log2 as *mut i32 as *mut c_void,
        &mut vec_ok as *mut i32 as *mut c_void,
    ];
    // The warp kernels take no vec_ok.
    let nargs = if variant == DequantVariant::Unit {
        11
    } else {
        10
    };
    // SAFETY: args match `nf4_dequant_<dtype>(const uint8_t*, const float*, const uint8_t*,
    // const float*, const float*, float, int, T*, int64_t, int, int vec_ok)` and, without the
    // last int, `nf4_dequant_warp*_<dtype>` (only launched when vec_ok holds); the caller
    // guarantees the pointers (null scale pointers select the other scale source).
    unsafe {
        cuda::launch(
            device,
            stream,
            "nf4",
            kernel,
            LaunchConfig::linear(blocks, THREADS),
            &mut args[..nargs],
        )
    }
}

/// Quantize `n` contiguous elements of `src` (`dtype`) into `packed` (`ceil(n/2)` bytes) and
/// `absmax` (float32, `ceil(n/blocksize)`), byte-identical to [`crate::quant::quantize_4bit`].
///
/// # Safety
/// `src`, `packed` and `absmax` must be device pointers on `device` of the sizes above, not
/// overlapping, live until the launch has run on `stream`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn quantize(
    src: usize,
    packed: usize,
    absmax: usize,
    n: usize,
    blocksize: usize,
    qt: QuantType,
    dtype: DType,
    device: i32,
    stream: RawStream,
) -> Result<()> {
    check_blocksize(blocksize)?;
    if n == 0 {
        return Ok(());
    }
    check_ptrs("nf4 quantize", &[src, packed, absmax])?;
    // One warp per quantization block; 8 warps per CTA; enough CTAs to fill the GPU.
    let nblocks = n.div_ceil(blocksize);
    let warps_per_cta = (THREADS / 32) as usize;
    let cap = cuda::sm_count(device)? as usize * 16;
    let ctas = nblocks.div_ceil(warps_per_cta).clamp(1, cap.max(1)) as u32;
    let (mut src, mut packed, mut absmax) = (src, packed, absmax);
    let mut n64 = n as i64;
    let mut bs = blocksize as i32;
    let mut qt_i = qt_code(qt);
    let mut args = [
        &mut src as *mut usize as *mut c_void,
        &mut packed as *mut usize as *mut c_void,
        &mut absmax as *mut usize as *mut c_void,
        &mut n64 as *mut i64 as *mut c_void,
        &mut bs as *mut i32 as *mut c_void,
        &mut qt_i as *mut i32 as *mut c_void,
    ];
    // SAFETY: args match `nf4_quant_<dtype>(const T*, uint8_t*, float*, int64_t, int, int)`;
    // the caller guarantees the pointers.
    unsafe {
        cuda::launch(
            device,
            stream,
            "nf4",
            quant_kernel(dtype),
            LaunchConfig::linear(ctas, THREADS),
            &mut args,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dequant_variant_parses_names_and_chunks() {
        assert_eq!(DequantVariant::parse("").unwrap(), DequantVariant::Unit);
        assert_eq!(DequantVariant::parse("unit").unwrap(), DequantVariant::Unit);
        assert_eq!(
            DequantVariant::parse("warp4").unwrap(),
            DequantVariant::Warp {
                units: 4,
                pipelined: false,
                chunks_per_warp: 1
            }
        );
        assert_eq!(
            DequantVariant::parse("warp4p:0").unwrap(),
            DequantVariant::Warp {
                units: 4,
                pipelined: true,
                chunks_per_warp: 0
            }
        );
        assert_eq!(
            DequantVariant::parse(" warp8:3 ").unwrap(),
            DequantVariant::Warp {
                units: 8,
                pipelined: false,
                chunks_per_warp: 3
            }
        );
        for bad in ["warp16", "unit:2", "warp4:-1", "warp4:x", "fast"] {
            let err = DequantVariant::parse(bad).unwrap_err().to_string();
            assert!(err.contains("RSLORA_FAST_NF4_DEQUANT"), "{bad}: {err}");
        }
    }

    #[test]
    fn dequant_variant_kernel_names_follow_the_cuda_entries() {
        let v = |s| DequantVariant::parse(s).unwrap();
        assert_eq!(v("unit").kernel(DType::BF16), "nf4_dequant_bf16");
        assert_eq!(v("warp4:2").kernel(DType::F16), "nf4_dequant_warp4_f16");
        assert_eq!(v("warp4p").kernel(DType::BF16), "nf4_dequant_warp4p_bf16");
        assert_eq!(v("warp8:0").kernel(DType::F32), "nf4_dequant_warp8_f32");
    }
}
