//! Launchers for `kernels/swiglu.cu`: `h = silu(g) * u` and its backward.

use super::gated::{self, Elems, GatedGrads, Kernel};
use super::{by_dtype, DType};
use crate::Result;

fn kernel(fwd: bool, dtype: DType) -> Kernel {
    let name = if fwd {
        by_dtype!("swiglu_fwd", dtype)
    } else {
        by_dtype!("swiglu_bwd", dtype)
    };
    Kernel {
        module: "swiglu",
        name,
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
