//! Launchers for `kernels/swiglu.cu`: `h = silu(g) * u` and its backward.

use std::ffi::c_void;

use super::{all_aligned16, check_ptrs, elementwise_grid, DType};
use crate::cuda::{self, LaunchConfig, RawStream};
use crate::Result;

const THREADS: u32 = 256;

fn kernel_name(fwd: bool, dtype: DType) -> &'static str {
    match (fwd, dtype) {
        (true, DType::F32) => "swiglu_fwd_f32",
        (true, DType::F16) => "swiglu_fwd_f16",
        (true, DType::BF16) => "swiglu_fwd_bf16",
        (false, DType::F32) => "swiglu_bwd_f32",
        (false, DType::F16) => "swiglu_bwd_f16",
        (false, DType::BF16) => "swiglu_bwd_bf16",
    }
}

/// `h[i] = silu(g[i]) * u[i]` for `n` contiguous elements.
///
/// # Safety
/// `g`, `u` and `h` must be device pointers on `device` to at least `n` elements of `dtype`,
/// live until the launch has run on `stream`; `h` must not overlap `g` or `u`.
pub unsafe fn forward(
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
    check_ptrs("swiglu forward", &[g, u, h])?;
    let mut vec_ok = all_aligned16(&[g, u, h]) as i32;
    let per = 16 / dtype.size();
    let blocks = elementwise_grid(n, 2 * per, THREADS, || {
        cuda::resident_blocks(device, "swiglu", kernel_name(true, dtype), THREADS)
    })?;
    let (mut g, mut u, mut h, mut n64) = (g, u, h, n as i64);
    let mut args = [
        &mut g as *mut usize as *mut c_void,
        &mut u as *mut usize as *mut c_void,
        &mut h as *mut usize as *mut c_void,
        &mut n64 as *mut i64 as *mut c_void,
        &mut vec_ok as *mut i32 as *mut c_void,
    ];
    // SAFETY: args match `swiglu_fwd_<dtype>(const T*, const T*, T*, int64_t, int)`; the caller
    // guarantees the pointers.
    unsafe {
        cuda::launch(
            device,
            stream,
            "swiglu",
            kernel_name(true, dtype),
            LaunchConfig::linear(blocks, THREADS),
            &mut args,
        )
    }
}

/// Gradients of SwiGLU: `dg`, `du` from `dh`, `g`, `u` (all `n` contiguous elements).
///
/// # Safety
/// As [`forward`]; `dg` and `du` are outputs that overlap neither each other nor the inputs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn backward(
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
    check_ptrs("swiglu backward", &[dh, g, u, dg, du])?;
    let mut vec_ok = all_aligned16(&[dh, g, u, dg, du]) as i32;
    let per = 16 / dtype.size();
    let blocks = elementwise_grid(n, per, THREADS, || {
        cuda::resident_blocks(device, "swiglu", kernel_name(false, dtype), THREADS)
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
    // SAFETY: args match `swiglu_bwd_<dtype>(const T*, const T*, const T*, T*, T*, int64_t, int)`.
    unsafe {
        cuda::launch(
            device,
            stream,
            "swiglu",
            kernel_name(false, dtype),
            LaunchConfig::linear(blocks, THREADS),
            &mut args,
        )
    }
}
