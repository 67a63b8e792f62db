//! Launchers for `kernels/swiglu.cu`: `h = silu(g) * u` and its backward.

use super::gated::{self, Kernel};
use super::DType;
use crate::cuda::RawStream;
use crate::Result;

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

fn kernel(fwd: bool, dtype: DType) -> Kernel {
    Kernel {
        module: "swiglu",
        name: kernel_name(fwd, dtype),
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
    // SAFETY: the caller's guarantees; `swiglu_fwd_<dtype>` takes the gated forward arguments.
    unsafe {
        gated::forward(
            kernel(true, dtype),
            "swiglu forward",
            dtype,
            g,
            u,
            h,
            n,
            device,
            stream,
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
    // SAFETY: the caller's guarantees; `swiglu_bwd_<dtype>` takes the gated backward arguments.
    unsafe {
        gated::backward(
            kernel(false, dtype),
            "swiglu backward",
            dtype,
            dh,
            g,
            u,
            dg,
            du,
            n,
            device,
            stream,
        )
    }
}
