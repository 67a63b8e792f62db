//! Launchers for `kernels/rms_norm.cu`: RMSNorm over the last dimension (Llama's `w * x_hat` and
//! Gemma's `(1 + w) * x_hat`), forward and backward, on a contiguous `[rows, cols]` tensor.

use std::ffi::c_void;

use super::{all_aligned16, check_ptrs, DType};
use crate::cuda::{self, LaunchConfig, RawStream};
use crate::{Error, Result};

/// Threads of a block (must match `MAX_THREADS` in the kernel as an upper bound).
const MAX_THREADS: usize = 512;
/// Row elements one thread owns on the fast path (`ELEMS` in the kernel).
const ELEMS: usize = 32;
/// Block size when a warp owns a row (narrow rows): eight rows per block.
const WARP_MODE_THREADS: usize = 256;

fn kernel_name(fwd: bool, dtype: DType) -> &'static str {
    match (fwd, dtype) {
        (true, DType::F32) => "rms_norm_fwd_f32",
        (true, DType::F16) => "rms_norm_fwd_f16",
        (true, DType::BF16) => "rms_norm_fwd_bf16",
        (false, DType::F32) => "rms_norm_bwd_f32",
        (false, DType::F16) => "rms_norm_bwd_f16",
        (false, DType::BF16) => "rms_norm_bwd_bf16",
    }
}

/// How rows map onto threads: `group` threads own one row at a time (32 = one warp per row),
/// `threads` per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Threads per block.
    pub threads: u32,
    /// Threads that share one row (32, or `threads` when the block owns the row).
    pub group: u32,
}

impl Plan {
    /// The layout for rows of `cols` elements: the fewest threads that hold the row at
    /// [`ELEMS`] elements each, a warp per row when one warp suffices, at most 512 threads.
    pub fn for_cols(cols: usize) -> Plan {
        let needed = cols.div_ceil(ELEMS);
        if needed <= 32 {
            return Plan {
                threads: WARP_MODE_THREADS as u32,
                group: 32,
            };
        }
        let threads = needed.next_multiple_of(32).min(MAX_THREADS) as u32;
        Plan {
            threads,
            group: threads,
        }
    }

    /// Rows handled at once by one block.
    pub fn rows_per_block(self) -> usize {
        (self.threads / self.group) as usize
    }

    /// Whether the register-resident, 16-byte-vector path applies.
    fn fast(self, dtype: DType, cols: usize, ptrs: &[usize]) -> bool {
        let per = 16 / dtype.size();
        all_aligned16(ptrs) && cols % per == 0 && cols <= ELEMS * self.group as usize
    }
}

fn check_shape(what: &str, rows: usize, cols: usize) -> Result<()> {
    if cols == 0 && rows != 0 {
        return Err(Error::invalid(format!("{what}: rows of width 0")));
    }
    if cols > i64::MAX as usize / rows.max(1) {
        return Err(Error::invalid(format!(
            "{what}: {rows} x {cols} elements overflow"
        )));
    }
    Ok(())
}

/// Rows of the fp32 `partial` buffer that [`backward`] needs for `rows` rows of `cols` elements
/// on `device` (one per thread group of the grid): the caller allocates `[n, cols]` fp32 and
/// sums it over dim 0 afterwards to get `dw`.
pub fn backward_partial_rows(rows: usize, cols: usize, device: i32) -> Result<usize> {
    check_shape("rms_norm backward", rows, cols)?;
    let plan = Plan::for_cols(cols);
    let per_block = plan.rows_per_block();
    // Enough groups to fill the GPU about twice (2048 threads per SM), never more than the rows:
    // each group sums its rows' dw in registers, so fewer groups mean a smaller partial buffer.
    let resident = cuda::sm_count(device)? as usize * (2048 / plan.threads as usize).max(1);
    let blocks = rows.div_ceil(per_block).clamp(1, resident);
    Ok(blocks * per_block)
}

/// RMSNorm forward: `y` (`rows x cols`, `dtype`) and `rstd` (`rows` fp32) from `x` and `w`
/// (`cols`); `gemma` selects `(1 + w)` with a single rounding instead of Llama's
/// `w * T(x_hat)`.
///
/// # Safety
/// `x`, `y` must be device pointers on `device` to `rows * cols` contiguous elements of `dtype`,
/// `w` to `cols` elements, `rstd` to `rows` f32, all live until the launch has run on `stream`;
/// `y` and `rstd` overlap nothing else.
#[allow(clippy::too_many_arguments)]
pub unsafe fn forward(
    dtype: DType,
    x: usize,
    w: usize,
    y: usize,
    rstd: usize,
    rows: usize,
    cols: usize,
    eps: f32,
    gemma: bool,
    device: i32,
    stream: RawStream,
) -> Result<()> {
    check_shape("rms_norm forward", rows, cols)?;
    if rows == 0 {
        return Ok(());
    }
    check_ptrs("rms_norm forward", &[x, w, y, rstd])?;
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::invalid(format!(
            "rms_norm forward: eps must be finite and >= 0, got {eps}"
        )));
    }
    let plan = Plan::for_cols(cols);
    let mut fast = plan.fast(dtype, cols, &[x, w, y]) as i32;
    let blocks = rows.div_ceil(plan.rows_per_block()).min(i32::MAX as usize) as u32;
    let (mut x, mut w, mut y, mut rstd) = (x, w, y, rstd);
    let (mut rows64, mut cols64, mut eps) = (rows as i64, cols as i64, eps);
    let (mut gemma, mut group) = (gemma as i32, plan.group as i32);
    let mut args = [
        &mut x as *mut usize as *mut c_void,
        &mut w as *mut usize as *mut c_void,
        &mut y as *mut usize as *mut c_void,
        &mut rstd as *mut usize as *mut c_void,
        &mut rows64 as *mut i64 as *mut c_void,
        &mut cols64 as *mut i64 as *mut c_void,
        &mut eps as *mut f32 as *mut c_void,
        &mut gemma as *mut i32 as *mut c_void,
        &mut group as *mut i32 as *mut c_void,
        &mut fast as *mut i32 as *mut c_void,
    ];
    // SAFETY: args match `rms_norm_fwd_<dtype>(const T*, const T*, T*, float*, int64_t, int64_t,
    // float, int, int, int)`; the caller guarantees the pointers and sizes.
    unsafe {
        cuda::launch(
            device,
            stream,
            "rms_norm",
            kernel_name(true, dtype),
            LaunchConfig::linear(blocks, plan.threads),
            &mut args,
        )
    }
}

/// RMSNorm backward: `dx` (`rows x cols`, `dtype`) and per-group fp32 partial sums of `dw` in
/// `partial` (`partial_rows x cols`, where `partial_rows` must equal
/// [`backward_partial_rows`]`(rows, cols, device)`; the caller sums it over rows).
///
/// # Safety
/// `dy`, `x`, `dx` must be device pointers on `device` to `rows * cols` contiguous elements of
/// `dtype`, `w` to `cols` elements, `rstd` to `rows` f32 (as written by [`forward`]), `partial`
/// to `partial_rows * cols` f32, all live until the launch has run on `stream`; `dx` and
/// `partial` overlap nothing else.
#[allow(clippy::too_many_arguments)]
pub unsafe fn backward(
    dtype: DType,
    dy: usize,
    x: usize,
    w: usize,
    rstd: usize,
    dx: usize,
    partial: usize,
    partial_rows: usize,
    rows: usize,
    cols: usize,
    gemma: bool,
    device: i32,
    stream: RawStream,
) -> Result<()> {
    let expected = backward_partial_rows(rows, cols, device)?;
    if partial_rows != expected {
        return Err(Error::invalid(format!(
            "rms_norm backward: partial buffer has {partial_rows} rows, expected {expected}"
        )));
    }
    if cols == 0 {
        return Ok(());
    }
    check_ptrs("rms_norm backward", &[dy, x, w, rstd, dx, partial])?;
    let plan = Plan::for_cols(cols);
    let mut fast = plan.fast(dtype, cols, &[dy, x, w, dx, partial]) as i32;
    // Exactly the grid `backward_partial_rows` assumed: one partial row per group.
    let blocks = (expected / plan.rows_per_block()) as u32;
    let (mut dy, mut x, mut w, mut rstd, mut dx, mut partial) = (dy, x, w, rstd, dx, partial);
    let (mut rows64, mut cols64) = (rows as i64, cols as i64);
    let (mut gemma, mut group) = (gemma as i32, plan.group as i32);
    let mut args = [
        &mut dy as *mut usize as *mut c_void,
        &mut x as *mut usize as *mut c_void,
        &mut w as *mut usize as *mut c_void,
        &mut rstd as *mut usize as *mut c_void,
        &mut dx as *mut usize as *mut c_void,
        &mut partial as *mut usize as *mut c_void,
        &mut rows64 as *mut i64 as *mut c_void,
        &mut cols64 as *mut i64 as *mut c_void,
        &mut gemma as *mut i32 as *mut c_void,
        &mut group as *mut i32 as *mut c_void,
        &mut fast as *mut i32 as *mut c_void,
    ];
    // SAFETY: args match `rms_norm_bwd_<dtype>(const T*, const T*, const T*, const float*, T*,
    // float*, int64_t, int64_t, int, int, int)`; the caller guarantees the pointers and sizes,
    // and the grid has exactly `partial_rows` groups, so every partial row is written.
    unsafe {
        cuda::launch(
            device,
            stream,
            "rms_norm",
            kernel_name(false, dtype),
            LaunchConfig::linear(blocks, plan.threads),
            &mut args,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_covers_every_column_on_the_fast_path_up_to_16384() {
        for cols in [1, 8, 1024, 1025, 2048, 4096, 5000, 8192, 16384] {
            let p = Plan::for_cols(cols);
            assert!(p.threads % 32 == 0 && p.threads as usize <= MAX_THREADS);
            assert!(p.group == 32 || p.group == p.threads);
            assert_eq!(p.threads % p.group, 0);
            assert!(cols <= ELEMS * p.group as usize, "cols {cols}: {p:?}");
        }
        assert_eq!(Plan::for_cols(1024).group, 32);
        assert_eq!(Plan::for_cols(4096).group, 128);
        assert_eq!(Plan::for_cols(1 << 20).threads, 512);
    }

    #[test]
    fn fast_path_needs_alignment_and_whole_vectors() {
        let p = Plan::for_cols(4096);
        assert!(p.fast(DType::BF16, 4096, &[256, 512]));
        assert!(!p.fast(DType::BF16, 4096, &[256, 514]));
        assert!(!p.fast(DType::BF16, 4090, &[256, 512]));
        let wide = Plan::for_cols(40000);
        assert!(!wide.fast(DType::BF16, 40000, &[256]));
    }

    #[test]
    fn bad_shapes_are_rejected_before_any_gpu_work() {
        assert!(check_shape("t", 3, 0).is_err());
        assert!(check_shape("t", usize::MAX / 2, 4).is_err());
        assert!(check_shape("t", 0, 0).is_ok());
    }
}
