//! Launchers for `kernels/nf4.cu`: NF4/FP4 dequantize (plain or double-quantized scales) into a
//! caller-provided buffer, and quantize (same bytes as the CPU path in `crate::quant`).

use std::ffi::c_void;

use super::{all_aligned16, by_dtype, check_ptrs, elementwise_grid, kernel_args, DType};
use crate::cuda::{self, LaunchConfig, RawStream};
use crate::quant::{check_blocksize, QuantType};
use crate::{Error, Result};

const THREADS: u32 = 256;
/// Store units per lane in one warp chunk of the dequantize kernel (`kUnitsPerLane` in nf4.cu).
const UNITS_PER_LANE: usize = 4;

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

impl ScalesPtr {
    /// The scales as the bindings pass them: double-quantized when `codes` is non-zero (then
    /// `nested_absmax`, `nested_code` and `offset` go with it), else the float32 `absmax`.
    pub fn from_parts(
        absmax: usize,
        codes: usize,
        nested_absmax: usize,
        nested_code: usize,
        offset: f32,
    ) -> ScalesPtr {
        if codes != 0 {
            ScalesPtr::Nested {
                codes,
                nested_absmax,
                nested_code,
                offset,
            }
        } else {
            ScalesPtr::Plain(absmax)
        }
    }
}

/// What both launchers take besides their buffers: `n` elements of `dtype`, quantized in blocks
/// of `blocksize` as `qt` 4-bit codes, launched on `stream` of `device`. The launchers' docs name
/// these fields directly.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    pub n: usize,
    pub blocksize: usize,
    pub qt: QuantType,
    pub dtype: DType,
    pub device: i32,
    pub stream: RawStream,
}

impl Params {
    /// Launch `kernel` of `nf4.cu` on `blocks` blocks of [`THREADS`].
    ///
    /// # Safety
    /// `args` must match the kernel's parameters, as [`cuda::launch`] requires.
    unsafe fn launch(
        &self,
        kernel: &'static str,
        blocks: u32,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        let cfg = LaunchConfig::linear(blocks, THREADS);
        // SAFETY: the caller guarantees the arguments.
        unsafe { cuda::launch(self.device, self.stream, "nf4", kernel, cfg, args) }
    }
}

/// The four scale pointers of the dequantize entry (`absmax`, `codes`, `nested_absmax`,
/// `nested_code`; zero where unused) and the offset, after checking the nested ones.
fn scale_args(scales: ScalesPtr) -> Result<([usize; 4], f32)> {
    match scales {
        ScalesPtr::Plain(p) => Ok(([p, 0, 0, 0], 0.0)),
        ScalesPtr::Nested {
            codes,
            nested_absmax,
            nested_code,
            offset,
        } => {
            let ptrs = [codes, nested_absmax, nested_code];
            check_ptrs("nf4 dequantize (nested scales)", &ptrs)?;
            Ok(([0, codes, nested_absmax, nested_code], offset))
        }
    }
}

/// Dequantize `p.n` elements of packed NF4/FP4 codes into `out` (`p.dtype`).
///
/// # Safety
/// Every pointer must be a device pointer on `device`: `packed` to `ceil(n/2)` bytes, the scale
/// buffers to the sizes [`ScalesPtr`] names, `out` to `n` elements of `dtype` not overlapping
/// the inputs; all live until the launch has run on `stream`.
pub unsafe fn dequantize(p: &Params, packed: usize, scales: ScalesPtr, out: usize) -> Result<()> {
    check_blocksize(p.blocksize)?;
    if p.n == 0 {
        return Ok(());
    }
    let ([mut absmax, mut codes, mut nested, mut ncode], mut offset) = scale_args(scales)?;
    check_ptrs("nf4 dequantize", &[packed, out])?;
    if absmax == 0 && codes == 0 {
        return Err(Error::invalid("nf4 dequantize: null scale pointer"));
    }
    // The chunk and unit loops read 4 (2 for fp32) packed bytes as one word and write one
    // 16-byte vector per unit; otherwise the kernel goes element by element.
    let mut vec_ok = (packed % 4 == 0 && all_aligned16(&[out])) as i32;
    let kernel = by_dtype!("nf4_dequant", p.dtype);
    // One chunk per warp, i.e. UNITS_PER_LANE store units per thread (one resident wave looping
    // over the chunks is slower: docs/benchmarks.md, "NF4 dequantize").
    let unit_elems = 16 / p.dtype.size();
    let blocks = elementwise_grid(p.n, UNITS_PER_LANE * unit_elems, THREADS, || {
        cuda::resident_blocks(p.device, "nf4", kernel, THREADS)
    })?;
    let mut qt_i = qt_code(p.qt);
    let mut n64 = p.n as i64;
    let mut bs_log2 = p.blocksize.trailing_zeros() as i32;
    let (mut packed, mut out) = (packed, out);
    let mut args =
        kernel_args![packed, absmax, codes, nested, ncode, offset, qt_i, out, n64, bs_log2, vec_ok];
    // SAFETY: args match `nf4_dequant_<dtype>(const uint8_t*, const float*, const uint8_t*,
    // const float*, const float*, float, int, T*, int64_t, int, int vec_ok)`; vec_ok is set only
    // when the packed and output pointers are aligned for the word loads and vector stores; the
    // caller guarantees the pointers (null scale pointers select the other scale source).
    unsafe { p.launch(kernel, blocks, &mut args) }
}

/// Quantize `p.n` contiguous elements of `src` (`p.dtype`) into `packed` (`ceil(n/2)` bytes)
/// and `absmax` (float32, `ceil(n/blocksize)`), byte-identical to
/// [`crate::quant::quantize_4bit`].
///
/// # Safety
/// `src`, `packed` and `absmax` must be device pointers on `device` of the sizes above, not
/// overlapping, live until the launch has run on `stream`.
pub unsafe fn quantize(p: &Params, src: usize, packed: usize, absmax: usize) -> Result<()> {
    check_blocksize(p.blocksize)?;
    if p.n == 0 {
        return Ok(());
    }
    check_ptrs("nf4 quantize", &[src, packed, absmax])?;
    // One warp per quantization block; 8 warps per CTA; enough CTAs to fill the GPU.
    let nblocks = p.n.div_ceil(p.blocksize);
    let warps_per_cta = (THREADS / 32) as usize;
    let cap = cuda::sm_count(p.device)? as usize * 16;
    let ctas = nblocks.div_ceil(warps_per_cta).clamp(1, cap.max(1)) as u32;
    let (mut src, mut packed, mut absmax) = (src, packed, absmax);
    let mut n64 = p.n as i64;
    let mut bs = p.blocksize as i32;
    let mut qt_i = qt_code(p.qt);
    let mut args = kernel_args![src, packed, absmax, n64, bs, qt_i];
    // SAFETY: args match `nf4_quant_<dtype>(const T*, uint8_t*, float*, int64_t, int, int)`;
    // the caller guarantees the pointers.
    unsafe { p.launch(by_dtype!("nf4_quant", p.dtype), ctas, &mut args) }
}
