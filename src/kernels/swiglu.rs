//! Launchers for `kernels/swiglu.cu`: `h = silu(g) * u` and its backward.

use super::gated::{self, Elems, GatedGrads, Kernel};
use super::DType;
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
pub unsafe fn forward(e: &Elems, g: usize, u: usize, h: usize) -> Result<()> {
    let k = kernel(true, e.dtype);
    // SAFETY: the caller's guarantees; `swiglu_fwd_<dtype>` takes the gated forward arguments.
    unsafe { gated::forward(k, "swiglu forward", e, g, u, h) }
}

/// Gradients of SwiGLU: `dg`, `du` from `dh`, `g`, `u` (all `n` contiguous elements).
///
/// # Safety
/// As [`forward`] for every pointer of `b`; `dg` and `du` are outputs that overlap neither each
/// other nor the inputs.
pub unsafe fn backward(e: &Elems, b: &GatedGrads) -> Result<()> {
    let k = kernel(false, e.dtype);
    // SAFETY: the caller's guarantees; `swiglu_bwd_<dtype>` takes the gated backward arguments.
    unsafe { gated::backward(k, "swiglu backward", e, b) }
}
