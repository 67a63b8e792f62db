//! Launchers for `kernels/rms_norm.cu`: RMSNorm over the last dimension (Llama's `w * x_hat` and
//! Gemma's `(1 + w) * x_hat`), forward and backward, on a contiguous `[rows, cols]` tensor; and
//! the residual-add variants (`s = x + residual` written and normalized in the same pass).

use std::ffi::c_void;

use super::{all_aligned16, by_dtype, check_ptrs, kernel_args, ptr_args, DType};
use crate::cuda::{self, LaunchConfig, RawStream};
use crate::{Error, Result};

/// Threads of a block (must match `MAX_THREADS` in the kernel as an upper bound).
const MAX_THREADS: usize = 512;
/// Row elements one thread owns on the fast path of the backward with dw (`BWD_ELEMS`).
const BWD_ELEMS: usize = 32;
/// 16-byte vectors of a row one thread owns on the forward fast path (`FWD_VECS`).
const FWD_VECS: usize = 8;
/// Block size when a warp owns a row (narrow rows): eight rows per block.
const WARP_MODE_THREADS: usize = 256;

/// Elements of `dtype` in one 16-byte vector.
fn vec_elems(dtype: DType) -> usize {
    16 / dtype.size()
}

/// Row elements one thread holds on the forward fast path: [`FWD_VECS`] vectors (128 bytes) in
/// every dtype (64 elements of a 16-bit row: half the threads, and block-wide reductions, of 32).
fn forward_elems(dtype: DType) -> usize {
    FWD_VECS * vec_elems(dtype)
}

/// Entry of the dx-only backward (`add`: its residual-add variant) for `cols`-wide rows and its
/// elements per thread: 32 (4 vectors of x and 4 of dy for 16-bit types at 63 registers, 8 + 8
/// for fp32 at 104: about 128 KB of reads in flight per SM either way); 16-bit rows wider than
/// 32 x 512 take the 8-vector entry so that they stay on the fast path.
fn dx_kernel(dtype: DType, cols: usize, add: bool) -> (&'static str, usize) {
    let n = vec_elems(dtype);
    let wide = cols > 4 * n * MAX_THREADS;
    let k = if dtype == DType::F32 || wide { 8 } else { 4 };
    // There is no 4-vector float32 entry: `k` is 8 for float32.
    let name = match (add, k) {
        (false, 4) => by_dtype!("rms_norm_bwd_dx4", dtype),
        (false, _) => by_dtype!("rms_norm_bwd_dx8", dtype),
        (true, 4) => by_dtype!("add_rms_norm_bwd_dx4", dtype),
        (true, _) => by_dtype!("add_rms_norm_bwd_dx8", dtype),
    };
    (name, k * n)
}

/// How rows map onto threads: `group` threads own one row at a time (32 = one warp per row),
/// `threads` per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Threads per block.
    pub threads: u32,
    /// Threads that share one row (32, or `threads` when the block owns the row).
    pub group: u32,
    /// Row elements one thread holds on the fast path.
    pub elems: u32,
}

impl Plan {
    /// The layout of the backward with dw for rows of `cols` elements: [`Plan::with_elems`] at
    /// [`BWD_ELEMS`].
    pub fn for_backward(cols: usize) -> Plan {
        Plan::with_elems(cols, BWD_ELEMS)
    }

    /// The fewest threads that hold a row of `cols` at `elems` elements each, a warp per row
    /// when one warp suffices, at most 512 threads.
    pub fn with_elems(cols: usize, elems: usize) -> Plan {
        let needed = cols.div_ceil(elems);
        let elems = elems as u32;
        if needed <= 32 {
            return Plan {
                threads: WARP_MODE_THREADS as u32,
                group: 32,
                elems,
            };
        }
        let threads = needed.next_multiple_of(32).min(MAX_THREADS) as u32;
        Plan {
            threads,
            group: threads,
            elems,
        }
    }

    /// Rows handled at once by one block.
    pub fn rows_per_block(self) -> usize {
        (self.threads / self.group) as usize
    }

    /// Whether the register-resident, 16-byte-vector path applies.
    fn fast(self, dtype: DType, cols: usize, ptrs: &[usize]) -> bool {
        let per = 16 / dtype.size();
        all_aligned16(ptrs) && cols % per == 0 && cols <= self.elems as usize * self.group as usize
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
/// of `dtype` on `device` (one per thread group of the grid): the caller allocates `[n, cols]`
/// fp32 and sums it over dim 0 afterwards to get `dw`. A whole number of blocks' groups (a block
/// of a narrow-row grid holds several rows; the groups without a row write zeros), at most `rows`
/// rounded up to a whole block.
pub fn backward_partial_rows(rows: usize, cols: usize, dtype: DType, device: i32) -> Result<usize> {
    check_shape("rms_norm backward", rows, cols)?;
    let plan = Plan::for_backward(cols);
    let per_block = plan.rows_per_block();
    // One wave at the kernel's real occupancy (registers keep it under 2048 threads per SM; a
    // grid sized for 2048 ran in several waves with a mostly idle last one), never more groups
    // than rows: each group sums its rows' dw in registers, so fewer groups mean fewer partials.
    let kernel = by_dtype!("rms_norm_bwd", dtype);
    let resident = cuda::resident_blocks(device, "rms_norm", kernel, plan.threads)? as usize;
    let blocks = rows.div_ceil(per_block).clamp(1, resident.max(1));
    Ok(blocks * per_block)
}

/// The shape and launch context every RMSNorm entry shares: `rows` contiguous rows of `cols`
/// elements of `dtype` (`gemma` selects `(1 + w)`), launched on `stream` of `device`. The
/// launchers' docs name these fields directly.
#[derive(Clone, Copy, Debug)]
pub struct Rows {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub gemma: bool,
    pub device: i32,
    pub stream: RawStream,
}

/// RMSNorm forward: `y` (`rows x cols`, `dtype`) and `rstd` (`rows` fp32) from `x` and `w`
/// (`cols`); `gemma` selects `(1 + w)` with a single rounding instead of Llama's
/// `w * T(x_hat)`.
///
/// # Safety
/// `x`, `y` must be device pointers on `device` to `rows * cols` contiguous elements of `dtype`,
/// `w` to `cols` elements, `rstd` to `rows` f32, all live until the launch has run on `stream`;
/// `y` and `rstd` overlap nothing else.
pub unsafe fn forward(r: &Rows, x: usize, w: usize, y: usize, rstd: usize, eps: f32) -> Result<()> {
    let kernel = by_dtype!("rms_norm_fwd", r.dtype);
    let entry = (kernel, forward_elems(r.dtype));
    let ptrs = [x, w, y, rstd];
    // SAFETY: `rms_norm_fwd_<dtype>(const T* x, const T* w, T* y, float* rstd, ...)`; the caller
    // guarantees the pointers and sizes.
    unsafe { launch_per_row("rms_norm forward", entry, r, (&ptrs, 3), Some(eps)) }
}

/// The buffers of the residual-add forward: the summands `x` and `residual`, the sum `s` and the
/// normed `y` it writes (`rows x cols`), the weight `w` (`cols`) and `rstd` (`rows` f32).
#[derive(Clone, Copy, Debug)]
pub struct AddNorm {
    pub x: usize,
    pub residual: usize,
    pub w: usize,
    pub s: usize,
    pub y: usize,
    pub rstd: usize,
}

/// Residual add + RMSNorm forward: `s = x + residual` (rounded to `dtype`, `rows x cols`), and
/// `y`, `rstd` of `s` as [`forward`] computes them, in one pass over the rows.
///
/// # Safety
/// The pointers of `b` must be device pointers on `device` to the sizes [`AddNorm`] names, of
/// `dtype` but `rstd`, all live until the launch has run on `stream`; `s`, `y` and `rstd` overlap
/// nothing else.
pub unsafe fn add_forward(r: &Rows, b: &AddNorm, eps: f32) -> Result<()> {
    let kernel = by_dtype!("add_rms_norm_fwd", r.dtype);
    let entry = (kernel, forward_elems(r.dtype));
    let ptrs = [b.x, b.residual, b.w, b.s, b.y, b.rstd];
    // SAFETY: `add_rms_norm_fwd_<dtype>(const T* x, const T* res, const T* w, T* s, T* y,
    // float* rstd, ...)`; the caller guarantees the pointers and sizes.
    unsafe { launch_per_row("add_rms_norm forward", entry, r, (&ptrs, 5), Some(eps)) }
}

/// Launch an entry with one thread group per row (`(name, row elements per thread)`): `ptrs` in
/// signature order, `ptrs[rstd_at]` the fp32 rstd (not part of the 16-byte alignment test), then
/// rows, cols, eps (the forward entries: `eps` is `Some`), gemma, group, fast.
///
/// # Safety
/// As [`forward`], [`add_forward`], [`backward_dx`] and [`add_backward_dx`] for the entry's
/// pointers.
unsafe fn launch_per_row(
    what: &str,
    (kernel, elems): (&'static str, usize),
    r: &Rows,
    (ptrs, rstd_at): (&[usize], usize),
    eps: Option<f32>,
) -> Result<()> {
    check_shape(what, r.rows, r.cols)?;
    if r.rows == 0 {
        return Ok(());
    }
    check_ptrs(what, ptrs)?;
    if let Some(eps) = eps {
        check_eps(what, eps)?;
    }
    let plan = Plan::with_elems(r.cols, elems);
    let vec_ptrs: Vec<usize> = (ptrs.iter().enumerate())
        .filter(|&(i, _)| i != rstd_at)
        .map(|(_, &p)| p)
        .collect();
    let fast = plan.fast(r.dtype, r.cols, &vec_ptrs);
    let mut scalars = Scalars::new(r, plan, eps.unwrap_or(0.0), fast);
    let tail = scalars.args(eps.is_some());
    // SAFETY: the entry takes its pointers, then (int64 rows, int64 cols, [float eps,] int gemma,
    // int group, int fast); `fast` is set only when the plan's threads hold the whole row at the
    // entry's elements and every row pointer is 16-byte aligned.
    unsafe { launch_rows(r, kernel, plan, row_blocks(r, plan), ptrs.to_vec(), &tail) }
}

/// The forward entries' epsilon must be finite and non-negative.
fn check_eps(what: &str, eps: f32) -> Result<()> {
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::invalid(format!(
            "{what}: eps must be finite and >= 0, got {eps}"
        )));
    }
    Ok(())
}

/// Blocks for one group per row (the kernel loops when the grid is capped): short blocks.
fn row_blocks(r: &Rows, plan: Plan) -> u32 {
    r.rows
        .div_ceil(plan.rows_per_block())
        .min(i32::MAX as usize) as u32
}

/// Launch `kernel` of `kernels/rms_norm.cu` on `blocks` blocks of `plan`'s threads with the
/// pointer arguments `ptrs` followed by the scalar arguments `tail`.
///
/// # Safety
/// `ptrs` then `tail` must match the entry's signature, with the sizes its caller guarantees;
/// `tail`'s pointers (into a [`Scalars`]) must stay valid until this call returns.
unsafe fn launch_rows(
    r: &Rows,
    kernel: &'static str,
    plan: Plan,
    blocks: u32,
    mut ptrs: Vec<usize>,
    tail: &[*mut c_void],
) -> Result<()> {
    let mut args = ptr_args(&mut ptrs);
    args.extend_from_slice(tail);
    let cfg = LaunchConfig::linear(blocks, plan.threads);
    // SAFETY: the caller guarantees the arguments; `ptrs` outlives the launch call.
    unsafe { cuda::launch(r.device, r.stream, "rms_norm", kernel, cfg, &mut args) }
}

/// The scalar kernel arguments, kept in one place so their pointers outlive the launch.
struct Scalars {
    rows: i64,
    cols: i64,
    eps: f32,
    gemma: i32,
    group: i32,
    fast: i32,
}

impl Scalars {
    fn new(r: &Rows, plan: Plan, eps: f32, fast: bool) -> Scalars {
        Scalars {
            rows: r.rows as i64,
            cols: r.cols as i64,
            eps,
            gemma: r.gemma as i32,
            group: plan.group as i32,
            fast: fast as i32,
        }
    }

    /// The entries' scalar tail: rows, cols, eps (forward entries only: `with_eps`), gemma,
    /// group, fast.
    fn args(&mut self, with_eps: bool) -> Vec<*mut c_void> {
        if with_eps {
            kernel_args![self.rows, self.cols, self.eps, self.gemma, self.group, self.fast].to_vec()
        } else {
            kernel_args![self.rows, self.cols, self.gemma, self.group, self.fast].to_vec()
        }
    }
}

/// The buffers both RMSNorm backward entries take: the output gradient `dy` and input `x`
/// (`rows x cols`), the weight `w` (`cols`) and `rstd` (`rows` f32, as written by [`forward`]),
/// and the input gradient `dx` (`rows x cols`) they write.
#[derive(Clone, Copy, Debug)]
pub struct Grads {
    pub dy: usize,
    pub x: usize,
    pub w: usize,
    pub rstd: usize,
    pub dx: usize,
}

/// RMSNorm backward: `dx` (`rows x cols`, `dtype`) and per-group fp32 partial sums of `dw` in
/// `partial` (`partial_rows x cols`, where `partial_rows` must equal
/// [`backward_partial_rows`]`(rows, cols, dtype, device)`; the caller sums it over rows).
///
/// # Safety
/// The pointers of `g` must be device pointers on `device` to the sizes [`Grads`] names, of
/// `dtype` but `rstd`, `partial` to `partial_rows * cols` f32, all live until the launch has run
/// on `stream`; `dx` and `partial` overlap nothing else.
pub unsafe fn backward(r: &Rows, g: &Grads, partial: usize, partial_rows: usize) -> Result<()> {
    let expected = backward_partial_rows(r.rows, r.cols, r.dtype, r.device)?;
    if partial_rows != expected {
        return Err(Error::invalid(format!(
            "rms_norm backward: partial buffer has {partial_rows} rows, expected {expected}"
        )));
    }
    if r.cols == 0 {
        return Ok(());
    }
    let Grads { dy, x, w, rstd, dx } = *g;
    let ptrs = vec![dy, x, w, rstd, dx, partial];
    check_ptrs("rms_norm backward", &ptrs)?;
    let plan = Plan::for_backward(r.cols);
    let fast = plan.fast(r.dtype, r.cols, &[dy, x, w, dx, partial]);
    // Exactly the grid `backward_partial_rows` assumed: one partial row per group.
    let blocks = (expected / plan.rows_per_block()) as u32;
    let mut scalars = Scalars::new(r, plan, 0.0, fast);
    let kernel = by_dtype!("rms_norm_bwd", r.dtype);
    // SAFETY: args match `rms_norm_bwd_<dtype>(const T*, const T*, const T*, const float*, T*,
    // float*, int64_t, int64_t, int, int, int)`; the caller guarantees the pointers and sizes,
    // and the grid has exactly `partial_rows` groups, so every partial row is written.
    unsafe { launch_rows(r, kernel, plan, blocks, ptrs, &scalars.args(false)) }
}

/// RMSNorm backward for a frozen weight: `dx` only (`rows x cols`, `dtype`), one pass with the
/// row's x and dy held in registers and no dw partials. Same math and roundings as [`backward`]'s
/// dx; the Python op takes it whenever the weight needs no gradient.
///
/// # Safety
/// The pointers of `g` must be device pointers on `device` to the sizes [`Grads`] names, of
/// `dtype` but `rstd`, all live until the launch has run on `stream`; `dx` overlaps nothing else.
pub unsafe fn backward_dx(r: &Rows, g: &Grads) -> Result<()> {
    let entry = dx_kernel(r.dtype, r.cols, false);
    let ptrs = [g.dy, g.x, g.w, g.rstd, g.dx];
    // SAFETY: `rms_norm_bwd_dx{4,8}_<dtype>(const T* dy, const T* x, const T* w, const float*
    // rstd, T* dx, ...)`; the caller guarantees the pointers and sizes.
    unsafe { launch_per_row("rms_norm backward", entry, r, (&ptrs, 3), None) }
}

/// Residual add + RMSNorm backward for a frozen weight: `dx = ds + d norm(s) / d s` rounded once
/// (`rows x cols`, `dtype`): the gradient of both `x` and `residual` of [`add_forward`], from the
/// normed output's gradient `dy` and the sum's own gradient `ds`.
///
/// `g.x` is the sum `s` (the normed input) and `g.rstd` its rstd as [`add_forward`] wrote them.
///
/// # Safety
/// The pointers of `g` must be device pointers on `device` to the sizes [`Grads`] names, of
/// `dtype` but `rstd`, and `ds` to `rows * cols` elements of `dtype`, all live until the launch
/// has run on `stream`; `dx` overlaps nothing else.
pub unsafe fn add_backward_dx(r: &Rows, g: &Grads, ds: usize) -> Result<()> {
    let entry = dx_kernel(r.dtype, r.cols, true);
    let ptrs = [g.dy, ds, g.x, g.w, g.rstd, g.dx];
    // SAFETY: `add_rms_norm_bwd_dx{4,8}_<dtype>(const T* dy, const T* ds, const T* s, const T* w,
    // const float* rstd, T* dx, ...)`; the caller guarantees the pointers and sizes.
    unsafe { launch_per_row("add_rms_norm backward", entry, r, (&ptrs, 4), None) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_plan_covers_every_column_on_the_fast_path_up_to_16384() {
        for cols in [1, 8, 1024, 1025, 2048, 4096, 5000, 8192, 16384] {
            let p = Plan::for_backward(cols);
            assert!(p.threads % 32 == 0 && p.threads as usize <= MAX_THREADS);
            assert!(p.group == 32 || p.group == p.threads);
            assert_eq!(p.threads % p.group, 0);
            assert!(cols <= BWD_ELEMS * p.group as usize, "cols {cols}: {p:?}");
        }
        assert_eq!(Plan::for_backward(1024).group, 32);
        assert_eq!(Plan::for_backward(1024).rows_per_block(), 8);
        assert_eq!(Plan::for_backward(4096).group, 128);
        assert_eq!(Plan::for_backward(1 << 20).threads, 512);
    }

    #[test]
    fn fast_path_needs_alignment_and_whole_vectors() {
        let p = Plan::for_backward(4096);
        assert!(p.fast(DType::BF16, 4096, &[256, 512]));
        assert!(!p.fast(DType::BF16, 4096, &[256, 514]));
        assert!(!p.fast(DType::BF16, 4090, &[256, 512]));
        let wide = Plan::for_backward(40000);
        assert!(!wide.fast(DType::BF16, 40000, &[256]));
    }

    fn forward_plan(dtype: DType, cols: usize) -> Plan {
        Plan::with_elems(cols, forward_elems(dtype))
    }

    #[test]
    fn forward_gives_every_dtype_128_bytes_per_thread() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(
                forward_plan(dtype, 1 << 20).elems as usize * dtype.size(),
                128
            );
        }
        // rows of 4096: two warps per 16-bit row, four per fp32 row
        assert_eq!(forward_plan(DType::BF16, 4096).threads, 64);
        assert_eq!(forward_plan(DType::F32, 4096).threads, 128);
        // the widest fast-path row: 512 threads x 64 elements of a 16-bit type
        assert!(forward_plan(DType::BF16, 32768).fast(DType::BF16, 32768, &[256]));
        assert!(!forward_plan(DType::BF16, 32776).fast(DType::BF16, 32776, &[256]));
    }

    #[test]
    fn dx_only_plan_stays_on_the_fast_path_for_wide_16_bit_rows() {
        for add in [false, true] {
            let pre = if add { "add_" } else { "" };
            let (name, elems) = dx_kernel(DType::BF16, 4096, add);
            assert_eq!((name, elems), (&*format!("{pre}rms_norm_bwd_dx4_bf16"), 32));
            assert_eq!(Plan::with_elems(4096, elems).threads, 128);
            let (name, elems) = dx_kernel(DType::F16, 20000, add);
            assert_eq!((name, elems), (&*format!("{pre}rms_norm_bwd_dx8_f16"), 64));
            assert!(Plan::with_elems(20000, elems).fast(DType::F16, 20000, &[256]));
            let (name, elems) = dx_kernel(DType::F32, 4096, add);
            assert_eq!((name, elems), (&*format!("{pre}rms_norm_bwd_dx8_f32"), 32));
        }
    }

    #[test]
    fn bad_shapes_are_rejected_before_any_gpu_work() {
        assert!(check_shape("t", 3, 0).is_err());
        assert!(check_shape("t", usize::MAX / 2, 4).is_err());
        assert!(check_shape("t", 0, 0).is_ok());
    }
}
