//! Launchers for `kernels/cross_entropy.cu`: per-row log-sum-exp and loss of `[rows, cols]`
//! logits (forward) and the in-place logits gradient `(softmax - onehot) * scale` (backward).
//! One block per row; rows may be strided (`ld` elements apart), columns are contiguous.

use std::ffi::c_void;

use super::{check_ptrs, DType};
use crate::cuda::{self, LaunchConfig, RawStream};
use crate::{Error, Result};

/// Most threads of a block (`MAX_THREADS` in the kernel).
const MAX_THREADS: usize = 512;
/// Most blocks of a launch: rows beyond it are looped over by the grid.
const MAX_BLOCKS: usize = i32::MAX as usize;

fn kernel_name(fwd: bool, dtype: DType) -> &'static str {
    match (fwd, dtype) {
        (true, DType::F32) => "cross_entropy_fwd_f32",
        (true, DType::F16) => "cross_entropy_fwd_f16",
        (true, DType::BF16) => "cross_entropy_fwd_bf16",
        (false, DType::F32) => "cross_entropy_bwd_f32",
        (false, DType::F16) => "cross_entropy_bwd_f16",
        (false, DType::BF16) => "cross_entropy_bwd_bf16",
    }
}

/// Which forward kernel the launcher uses, from [`Variant::ENV`], read at every launch (not
/// cached) so a benchmark can time every variant in one process. The backward has one kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// `v1` (the default): two 16-byte vectors per thread per trip, `__expf` per element.
    V1,
    /// `v2x4`: fewer instructions per element than v1 and four 16-byte vectors per thread per
    /// trip (64 bytes in flight per thread): the group max in packed bf16x2/f16x2, a
    /// one-instruction unpack, `ex2.approx.ftz((x - m) * log2e)` per element (x - m first, as
    /// v1, so the terms stay exact at any |m|).
    V2X4,
}

impl Variant {
    /// The environment variable that selects the forward variant.
    pub const ENV: &'static str = "RSLORA_FAST_CE";
    /// Every accepted value, for error messages and benchmarks.
    pub const NAMES: [&'static str; 2] = ["v1", "v2x4"];

    /// Parse a value of [`Variant::ENV`] (empty means the default).
    pub fn parse(value: &str) -> Result<Variant> {
        match value.trim() {
            "" | "v1" => Ok(Variant::V1),
            "v2x4" => Ok(Variant::V2X4),
            other => Err(Error::invalid(format!(
                "{}={other:?}: expected one of {}",
                Variant::ENV,
                Variant::NAMES.join(", ")
            ))),
        }
    }

    /// The variant the environment asks for now ([`Variant::V1`] when unset).
    pub fn from_env() -> Result<Variant> {
        match std::env::var(Variant::ENV) {
            Ok(v) => Variant::parse(&v),
            Err(std::env::VarError::NotPresent) => Ok(Variant::V1),
            Err(std::env::VarError::NotUnicode(_)) => Err(Error::invalid(format!(
                "{} is not valid unicode",
                Variant::ENV
            ))),
        }
    }

    /// The name [`Variant::parse`] accepts for this variant.
    pub fn name(self) -> &'static str {
        match self {
            Variant::V1 => "v1",
            Variant::V2X4 => "v2x4",
        }
    }

    /// 16-byte vectors per thread per trip of the forward.
    fn vecs_per_trip(self) -> usize {
        match self {
            Variant::V1 => 2,
            Variant::V2X4 => 4,
        }
    }

    fn forward_kernel(self, dtype: DType) -> &'static str {
        match (self, dtype) {
            (Variant::V1, _) => kernel_name(true, dtype),
            (Variant::V2X4, DType::F32) => "cross_entropy_fwd_v2x4_f32",
            (Variant::V2X4, DType::F16) => "cross_entropy_fwd_v2x4_f16",
            (Variant::V2X4, DType::BF16) => "cross_entropy_fwd_v2x4_bf16",
        }
    }
}

/// Threads of the block that owns a row of `cols` elements: two 16-byte vectors per thread
/// per trip, in whole warps, 32 to 512 (a 128k-wide bf16 row then takes ~16 trips per thread).
pub fn threads_for(cols: usize, dtype: DType) -> u32 {
    threads_for_vecs(cols, dtype, 2)
}

/// As [`threads_for`] with `per_trip` vectors per thread per trip.
fn threads_for_vecs(cols: usize, dtype: DType, per_trip: usize) -> u32 {
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

/// One launch of a row kernel: both kernels take `(logits, ld, p1, p2, p3, rows, cols, ignore)`.
///
/// # Safety
/// As [`forward`] / [`backward`] for the pointers they name.
#[allow(clippy::too_many_arguments)]
unsafe fn launch_rows(
    fwd: bool,
    dtype: DType,
    logits: usize,
    ld: usize,
    rest: [usize; 3],
    rows: usize,
    cols: usize,
    ignore: i64,
    device: i32,
    stream: RawStream,
) -> Result<()> {
    let what = if fwd {
        "cross_entropy forward"
    } else {
        "cross_entropy backward"
    };
    check_shape(what, rows, cols, ld)?;
    if rows == 0 {
        return Ok(());
    }
    check_ptrs(what, &[logits, rest[0], rest[1], rest[2]])?;
    let (kernel, threads) = if fwd {
        let v = Variant::from_env()?;
        (
            v.forward_kernel(dtype),
            threads_for_vecs(cols, dtype, v.vecs_per_trip()),
        )
    } else {
        (kernel_name(false, dtype), threads_for(cols, dtype))
    };
    let blocks = rows.min(MAX_BLOCKS) as u32;
    let [mut p1, mut p2, mut p3] = rest;
    let (mut logits, mut ld) = (logits, ld as i64);
    let (mut rows, mut cols, mut ignore) = (rows as i64, cols as i64, ignore);
    let mut args = [
        &mut logits as *mut usize as *mut c_void,
        &mut ld as *mut i64 as *mut c_void,
        &mut p1 as *mut usize as *mut c_void,
        &mut p2 as *mut usize as *mut c_void,
        &mut p3 as *mut usize as *mut c_void,
        &mut rows as *mut i64 as *mut c_void,
        &mut cols as *mut i64 as *mut c_void,
        &mut ignore as *mut i64 as *mut c_void,
    ];
    // SAFETY: args match `cross_entropy_fwd_<dtype>(const T*, int64_t, const int64_t* targets,
    // float* lse, float* loss, int64_t, int64_t, int64_t)` and `cross_entropy_bwd_<dtype>(T*,
    // int64_t, const float* lse, const int64_t* targets, const float* scale, int64_t, int64_t,
    // int64_t)` (every forward variant has the forward's signature); the callers pass `rest` in
    // those orders and guarantee the pointers.
    unsafe {
        cuda::launch(
            device,
            stream,
            "cross_entropy",
            kernel,
            LaunchConfig::linear(blocks, threads),
            &mut args,
        )
    }
}

/// Forward: `lse[i] = logsumexp(logits[i, :])` and `loss[i] = lse[i] - logits[i, targets[i]]`
/// (computed as `(max - logits[i, targets[i]]) + log(sum)`, so no cancellation at huge logits)
/// (0 where `targets[i] == ignore`, NaN where a target lies outside `[0, cols)`), all in fp32.
///
/// # Safety
/// `logits` must be a device pointer on `device` to `rows` rows of `cols` contiguous `dtype`
/// elements, row `i` starting at element `i * ld`; `targets` to `rows` int64; `lse` and `loss`
/// to `rows` f32 each, overlapping nothing else; all live until the launch has run on `stream`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn forward(
    dtype: DType,
    logits: usize,
    ld: usize,
    targets: usize,
    lse: usize,
    loss: usize,
    rows: usize,
    cols: usize,
    ignore: i64,
    device: i32,
    stream: RawStream,
) -> Result<()> {
    // SAFETY: the caller's guarantees, passed on in the kernel's argument order.
    unsafe {
        launch_rows(
            true,
            dtype,
            logits,
            ld,
            [targets, lse, loss],
            rows,
            cols,
            ignore,
            device,
            stream,
        )
    }
}

/// Backward, in place: `logits[i, j] = T((exp(logits[i, j] - lse[i]) - [j == targets[i]]) *
/// scale[i])`; a row whose target is `ignore` (or outside `[0, cols)`) subtracts no one-hot.
///
/// # Safety
/// As [`forward`] for `logits` (read and written) and `targets`; `lse` and `scale` must point to
/// `rows` f32 each on `device`, overlapping `logits` nowhere.
#[allow(clippy::too_many_arguments)]
pub unsafe fn backward(
    dtype: DType,
    logits: usize,
    ld: usize,
    lse: usize,
    targets: usize,
    scale: usize,
    rows: usize,
    cols: usize,
    ignore: i64,
    device: i32,
    stream: RawStream,
) -> Result<()> {
    // SAFETY: the caller's guarantees, passed on in the kernel's argument order.
    unsafe {
        launch_rows(
            false,
            dtype,
            logits,
            ld,
            [lse, targets, scale],
            rows,
            cols,
            ignore,
            device,
            stream,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_cover_the_row_in_whole_warps() {
        assert_eq!(threads_for(1, DType::BF16), 32);
        assert_eq!(threads_for(1000, DType::BF16), 64); // 125 vectors -> 63 threads -> 2 warps
        assert_eq!(threads_for(128_256, DType::BF16), 512);
        assert_eq!(threads_for(128_256, DType::F32), 512);
        for cols in [1, 7, 8, 9, 1000, 4096, 128_259] {
            let t = threads_for(cols, DType::F16) as usize;
            assert!(t % 32 == 0 && (32..=MAX_THREADS).contains(&t));
        }
    }

    #[test]
    fn variants_parse_and_bad_values_name_the_accepted_ones() {
        for name in Variant::NAMES {
            assert_eq!(Variant::parse(name).unwrap().name(), name);
        }
        assert_eq!(Variant::parse("").unwrap(), Variant::V1);
        let err = Variant::parse("v2").unwrap_err().to_string();
        assert!(
            err.contains("RSLORA_FAST_CE") && err.contains("v1, v2x4"),
            "{err}"
        );
        // every variant has its own entry per dtype (v1's are the plain names)
        let mut seen = std::collections::HashSet::new();
        for v in Variant::NAMES.map(|n| Variant::parse(n).unwrap()) {
            for d in [DType::F32, DType::F16, DType::BF16] {
                assert!(seen.insert(v.forward_kernel(d)));
            }
        }
    }

    #[test]
    fn four_vector_trips_use_half_the_threads_on_short_rows() {
        assert_eq!(threads_for_vecs(128_256, DType::BF16, 4), 512);
        assert_eq!(threads_for_vecs(8 * 256, DType::BF16, 4), 64); // 256 vectors -> 64 threads
        assert_eq!(threads_for_vecs(8 * 256, DType::BF16, 2), 128);
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
        // SAFETY: no rows: returns before touching any pointer or the driver.
        let r = unsafe { forward(DType::BF16, 0, 7, 0, 0, 0, 0, 7, -100, 0, RawStream(0)) };
        assert!(r.is_ok());
        // SAFETY: as above.
        let r = unsafe { backward(DType::F32, 0, 7, 0, 0, 0, 0, 7, -100, 0, RawStream(0)) };
        assert!(r.is_ok());
    }
}
