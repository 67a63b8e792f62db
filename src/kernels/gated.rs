//! The launch shared by the gated-activation kernels (`swiglu.cu`, `geglu.cu`): both take
//! `(g, u, h, n, vec_ok)` forward and `(dh, g, u, dg, du, n, vec_ok)` backward over contiguous
//! elements, so only the module and kernel names differ.

use std::ffi::c_void;

use super::{all_aligned16, check_ptrs, elementwise_grid, DType};
use crate::cuda::{self, LaunchConfig, RawStream};
use crate::Result;

const THREADS: u32 = 256;

/// A compiled gated-activation kernel: its module (`.cu` file stem) and entry name.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Kernel {
    pub module: &'static str,
    pub name: &'static str,
}

/// `h[i] = act(g[i]) * u[i]` for `n` contiguous elements; `what` names the op in errors.
///
/// # Safety
/// `g`, `u` and `h` must be device pointers on `device` to at least `n` elements of `dtype`,
/// live until the launch has run on `stream`; `h` must not overlap `g` or `u`; `kernel` must take
/// `(const T*, const T*, T*, int64_t, int)`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn forward(
    kernel: Kernel,
    what: &str,
    dtype: DType,
    g: usize,
    u: usize,
    h: usize,
    n: usize,
    device: i32,
    stream: RawStream,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    check_ptrs(what, &[g, u, h])?;
    let mut vec_ok = all_aligned16(&[g, u, h]) as i32;
    // The forward bodies handle two 16-byte vectors per thread per trip.
    let blocks = elementwise_grid(n, 2 * (16 / dtype.size()), THREADS, || {
        cuda::resident_blocks(device, kernel.module, kernel.name, THREADS)
    })?;
    let (mut g, mut u, mut h, mut n64) = (g, u, h, n as i64);
    let mut args = [
        &mut g as *mut usize as *mut c_void,
        &mut u as *mut usize as *mut c_void,
        &mut h as *mut usize as *mut c_void,
        &mut n64 as *mut i64 as *mut c_void,
        &mut vec_ok as *mut i32 as *mut c_void,
    ];
    // SAFETY: args match `(const T*, const T*, T*, int64_t, int)`, which the caller guarantees
    // for `kernel`, as it guarantees the pointers.
    unsafe {
        cuda::launch(
            device,
            stream,
            kernel.module,
            kernel.name,
            LaunchConfig::linear(blocks, THREADS),
            &mut args,
        )
    }
}

/// Gradients `dg`, `du` from `dh`, `g`, `u` (all `n` contiguous elements).
///
/// # Safety
/// As [`forward`]; `dg` and `du` are outputs that overlap neither each other nor the inputs;
/// `kernel` must take `(const T*, const T*, const T*, T*, T*, int64_t, int)`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn backward(
    kernel: Kernel,
    what: &str,
    dtype: DType,
    dh: usize,
    g: usize,
    u: usize,
    dg: usize,
    du: usize,
    n: usize,
    device: i32,
    stream: RawStream,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    check_ptrs(what, &[dh, g, u, dg, du])?;
    let mut vec_ok = all_aligned16(&[dh, g, u, dg, du]) as i32;
    let blocks = elementwise_grid(n, 16 / dtype.size(), THREADS, || {
        cuda::resident_blocks(device, kernel.module, kernel.name, THREADS)
    })?;
    let (mut dh, mut g, mut u, mut dg, mut du, mut n64) = (dh, g, u, dg, du, n as i64);
    let mut args = [
        &mut dh as *mut usize as *mut c_void,
        &mut g as *mut usize as *mut c_void,
        &mut u as *mut usize as *mut c_void,
        &mut dg as *mut usize as *mut c_void,
        &mut du as *mut usize as *mut c_void,
        &mut n64 as *mut i64 as *mut c_void,
        &mut vec_ok as *mut i32 as *mut c_void,
    ];
    // SAFETY: args match `(const T*, const T*, const T*, T*, T*, int64_t, int)`, which the caller
    // guarantees for `kernel`, as it guarantees the pointers.
    unsafe {
        cuda::launch(
            device,
            stream,
            kernel.module,
            kernel.name,
            LaunchConfig::linear(blocks, THREADS),
            &mut args,
        )
    }
}
