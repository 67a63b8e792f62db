//! The launch shared by the gated-activation kernels (`swiglu.cu`, `geglu.cu`): both take
//! `(g, u, h, n, vec_ok)` forward and `(dh, g, u, dg, du, n, vec_ok)` backward over contiguous
//! elements, so only the module and kernel names differ.

use super::{all_aligned16, check_ptrs, elementwise_grid, kernel_args, ptr_args, DType};
use crate::cuda::{self, LaunchConfig, RawStream};
use crate::Result;

const THREADS: u32 = 256;

/// A compiled gated-activation kernel: its module (`.cu` file stem) and entry name.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Kernel {
    pub module: &'static str,
    pub name: &'static str,
}

/// `n` contiguous elements of `dtype` per tensor, launched on `stream` of `device`: the
/// context every elementwise launcher shares (their docs name these fields directly).
#[derive(Clone, Copy, Debug)]
pub struct Elems {
    pub dtype: DType,
    pub n: usize,
    pub device: i32,
    pub stream: RawStream,
}

/// The buffers of a gated backward, `n` contiguous elements each: the output gradient `dh` and
/// the inputs `g`, `u` it reads, the input gradients `dg`, `du` it writes.
#[derive(Clone, Copy, Debug)]
pub struct GatedGrads {
    pub dh: usize,
    pub g: usize,
    pub u: usize,
    pub dg: usize,
    pub du: usize,
}

/// `h[i] = act(g[i]) * u[i]` for `n` contiguous elements; `what` names the op in errors.
///
/// # Safety
/// `g`, `u` and `h` must be device pointers on `device` to at least `n` elements of `dtype`,
/// live until the launch has run on `stream`; `h` must not overlap `g` or `u`; `kernel` must take
/// `(const T*, const T*, T*, int64_t, int)`.
pub(crate) unsafe fn forward(
    kernel: Kernel,
    what: &str,
    e: &Elems,
    g: usize,
    u: usize,
    h: usize,
) -> Result<()> {
    // The forward bodies handle two 16-byte vectors per thread per trip.
    let per_thread = 2 * (16 / e.dtype.size());
    // SAFETY: the caller's guarantees, for a kernel taking `(g, u, h, n, vec_ok)`.
    unsafe { launch(kernel, what, e, &[g, u, h], per_thread) }
}

/// Gradients `b.dg`, `b.du` from `b.dh`, `b.g`, `b.u`.
///
/// # Safety
/// As [`forward`] for every pointer of `b`; `dg` and `du` are outputs that overlap neither each
/// other nor the inputs; `kernel` must take `(const T*, const T*, const T*, T*, T*, int64_t, int)`.
pub(crate) unsafe fn backward(kernel: Kernel, what: &str, e: &Elems, b: &GatedGrads) -> Result<()> {
    let per_thread = 16 / e.dtype.size();
    let ptrs = [b.dh, b.g, b.u, b.dg, b.du];
    // SAFETY: the caller's guarantees, for a kernel taking `(dh, g, u, dg, du, n, vec_ok)`.
    unsafe { launch(kernel, what, e, &ptrs, per_thread) }
}

/// Launch `kernel` over `e.n` elements, `per_thread` per thread per trip, with the arguments
/// `(ptrs..., int64_t n, int vec_ok)`; `vec_ok` when every pointer is 16-byte aligned.
///
/// # Safety
/// `ptrs` must match the kernel's pointer parameters, valid for `e.n` elements each.
unsafe fn launch(
    kernel: Kernel,
    what: &str,
    e: &Elems,
    ptrs: &[usize],
    per_thread: usize,
) -> Result<()> {
    if e.n == 0 {
        return Ok(());
    }
    check_ptrs(what, ptrs)?;
    let mut vec_ok = all_aligned16(ptrs) as i32;
    let blocks = elementwise_grid(e.n, per_thread, THREADS, || {
        cuda::resident_blocks(e.device, kernel.module, kernel.name, THREADS)
    })?;
    let (mut ptrs, mut n64) = (ptrs.to_vec(), e.n as i64);
    let mut args = ptr_args(&mut ptrs);
    args.extend(kernel_args![n64, vec_ok]);
    let cfg = LaunchConfig::linear(blocks, THREADS);
    // SAFETY: args are the caller's pointers then (int64_t n, int vec_ok), as the caller
    // guarantees the kernel takes them.
    unsafe {
        cuda::launch(
            e.device,
            e.stream,
            kernel.module,
            kernel.name,
            cfg,
            &mut args,
        )
    }
}
