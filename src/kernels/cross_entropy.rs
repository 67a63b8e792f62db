//! Launchers for `kernels/cross_entropy.cu`: per-row log-sum-exp and loss of `[rows, cols]`
//! logits (forward) and the in-place logits gradient `(softmax - onehot) * scale` (backward).
//! One block per row; rows may be strided (`ld` elements apart), columns are contiguous.

use super::{by_dtype, check_ptrs, kernel_args, DType};
use crate::cuda::{self, LaunchConfig, RawStream};
use crate::{Error, Result};

/// Most threads of a block (`MAX_THREADS` in the kernel).
const MAX_THREADS: usize = 512;
/// Most blocks of a launch: rows beyond it are looped over by the grid.
const MAX_BLOCKS: usize = i32::MAX as usize;

fn kernel_name(fwd: bool, dtype: DType) -> &'static str {
    if fwd {
        by_dtype!("cross_entropy_fwd", dtype)
    } else {
        by_dtype!("cross_entropy_bwd", dtype)
    }
}

/// 16-byte vectors per thread per trip of the forward (`FWD_VECS` in the kernel) and of the
/// backward: the block size follows from them.
const FWD_VECS: usize = 4;
const BWD_VECS: usize = 2;

/// Threads of the block that owns a row of `cols` elements when each thread takes `per_trip`
/// 16-byte vectors per trip: in whole warps, 32 to 512 (a 128k-wide bf16 row then takes ~8
/// forward trips per thread).
pub fn threads_for(cols: usize, dtype: DType, per_trip: usize) -> u32 {
    let vecs = cols.div_ceil(16 / dtype.size());
    vecs.div_ceil(per_trip)
        .next_multiple_of(32)
        .clamp(32, MAX_THREADS) as u32
}

fn check_shape(what: &str, rows: usize, cols: usize, ld: usize) -> Result<()> {
    if cols == 0 {
        return Err(Error::invalid(format!("{what}: rows of width 0")));
    }
    if ld < cols && rows > 1 {
        return Err(Error::invalid(format!(
            "{what}: row stride {ld} is smaller than the row width {cols}"
        )));
    }
    if ld.max(cols) > i64::MAX as usize / rows.max(1) {
        return Err(Error::invalid(format!(
            "{what}: {rows} rows of stride {ld} overflow"
        )));
    }
    Ok(())
}

/// The shape and launch context both entries share: `rows` rows of `cols` contiguous `dtype`
/// logits, `ld` elements apart, targets equal to `ignore` skipped, on `stream` of `device`. The
/// launchers' docs name these fields directly.
#[derive(Clone, Copy, Debug)]
pub struct Logits {
    pub dtype: DType,
    pub ld: usize,
    pub rows: usize,
    pub cols: usize,
    pub ignore: i64,
    pub device: i32,
    pub stream: RawStream,
}

/// One launch of a row kernel: both kernels take `(logits, ld, p1, p2, p3, rows, cols, ignore)`.
///
/// # Safety
/// As [`forward`] / [`backward`] for the pointers they name.
unsafe fn launch_rows(fwd: bool, l: &Logits, logits: usize, rest: [usize; 3]) -> Result<()> {
    let what = if fwd {
        "cross_entropy forward"
    } else {
        "cross_entropy backward"
    };
    check_shape(what, l.rows, l.cols, l.ld)?;
    if l.rows == 0 {
        return Ok(());
    }
    check_ptrs(what, &[logits, rest[0], rest[1], rest[2]])?;
    let kernel = kernel_name(fwd, l.dtype);
    let threads = threads_for(l.cols, l.dtype, if fwd { FWD_VECS } else { BWD_VECS });
    let blocks = l.rows.min(MAX_BLOCKS) as u32;
    let [mut p1, mut p2, mut p3] = rest;
    let (mut logits, mut ld) = (logits, l.ld as i64);
    let (mut rows, mut cols, mut ignore) = (l.rows as i64, l.cols as i64, l.ignore);
    let mut args = kernel_args![logits, ld, p1, p2, p3, rows, cols, ignore];
    let cfg = LaunchConfig::linear(blocks, threads);
    // SAFETY: args match `cross_entropy_fwd_<dtype>(const T*, int64_t, const int64_t* targets,
    // float* lse, float* loss, int64_t, int64_t, int64_t)` and `cross_entropy_bwd_<dtype>(T*,
    // int64_t, const float* lse, const int64_t* targets, const float* scale, int64_t, int64_t,
    // int64_t)`; the callers pass `rest` in those orders and guarantee the pointers.
    unsafe { cuda::launch(l.device, l.stream, "cross_entropy", kernel, cfg, &mut args) }
}

/// Forward: `lse[i] = logsumexp(logits[i, :])` and `loss[i] = lse[i] - logits[i, targets[i]]`
/// (computed as `(max - logits[i, targets[i]]) + log(sum)`, so no cancellation at huge logits)
/// (0 where `targets[i] == ignore`, NaN where a target lies outside `[0, cols)`), all in fp32.
///
/// # Safety
/// `logits` must be a device pointer on `device` to `rows` rows of `cols` contiguous `dtype`
/// elements, row `i` starting at element `i * ld`; `targets` to `rows` int64; `lse` and `loss`
/// to `rows` f32 each, overlapping nothing else; all live until the launch has run on `stream`.
pub unsafe fn forward(
    l: &Logits,
    logits: usize,
    targets: usize,
    lse: usize,
    loss: usize,
) -> Result<()> {
    // SAFETY: the caller's guarantees, passed on in the kernel's argument order.
    unsafe { launch_rows(true, l, logits, [targets, lse, loss]) }
}

/// Backward, in place: `logits[i, j] = T((exp(logits[i, j] - lse[i]) - [j == targets[i]]) *
/// scale[i])`; a row whose target is `ignore` (or outside `[0, cols)`) subtracts no one-hot.
///
/// # Safety
/// As [`forward`] for `logits` (read and written) and `targets`; `lse` and `scale` must point to
/// `rows` f32 each on `device`, overlapping `logits` nowhere.
pub unsafe fn backward(
    l: &Logits,
    logits: usize,
    lse: usize,
    targets: usize,
    scale: usize,
) -> Result<()> {
    // SAFETY: the caller's guarantees, passed on in the kernel's argument order.
    unsafe { launch_rows(false, l, logits, [lse, targets, scale]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_cover_the_row_in_whole_warps() {
        assert_eq!(threads_for(1, DType::BF16, BWD_VECS), 32);
        assert_eq!(threads_for(1000, DType::BF16, BWD_VECS), 64); // 125 vectors -> 63 threads -> 2 warps
        assert_eq!(threads_for(128_256, DType::BF16, FWD_VECS), 512);
        assert_eq!(threads_for(128_256, DType::F32, FWD_VECS), 512);
        for cols in [1, 7, 8, 9, 1000, 4096, 128_259] {
            for per_trip in [FWD_VECS, BWD_VECS] {
                let t = threads_for(cols, DType::F16, per_trip) as usize;
                assert!(t % 32 == 0 && (32..=MAX_THREADS).contains(&t));
            }
        }
    }

    #[test]
    fn four_vector_trips_use_half_the_threads_on_short_rows() {
        assert_eq!(threads_for(8 * 256, DType::BF16, FWD_VECS), 64); // 256 vectors -> 64 threads
        assert_eq!(threads_for(8 * 256, DType::BF16, BWD_VECS), 128);
    }

    #[test]
    fn shape_checks_name_the_problem() {
        assert!(check_shape("ce", 4, 0, 0).is_err());
        assert!(check_shape("ce", 4, 10, 9).is_err());
        assert!(check_shape("ce", 1, 10, 0).is_ok()); // one row: the stride is never used
        assert!(check_shape("ce", usize::MAX / 2, 10, 10).is_err());
        assert!(check_shape("ce", 4, 10, 16).is_ok());
    }

    #[test]
    fn zero_rows_launch_nothing() {
        let mut l = Logits {
            dtype: DType::BF16,
            ld: 7,
            rows: 0,
            cols: 7,
            ignore: -100,
            device: 0,
            stream: RawStream(0),
        };
        // SAFETY: no rows: returns before touching any pointer or the driver.
        assert!(unsafe { forward(&l, 0, 0, 0, 0) }.is_ok());
        l.dtype = DType::F32;
        // SAFETY: as above.
        assert!(unsafe { backward(&l, 0, 0, 0, 0) }.is_ok());
    }
}
