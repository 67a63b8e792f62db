//! Launchers for `kernels/geglu.cu`: `h = gelu(g) * u` (tanh or erf gelu) and its backward.

use std::ffi::c_void;

use super::{all_aligned16, check_ptrs, elementwise_grid, DType};
use crate::cuda::{self, LaunchConfig, RawStream};
use crate::{Error, Result};

const THREADS: u32 = 256;

/// Which gelu the kernel computes; names follow `torch.nn.functional.gelu(approximate=...)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gelu {
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (`approximate="tanh"`, Gemma's
    /// `gelu_pytorch_tanh`).
    Tanh,
    /// `0.5 x (1 + erf(x / sqrt 2))` (`approximate="none"`).
    Erf,
}

impl Gelu {
    /// Parse torch's `approximate` argument: `"tanh"` or `"none"`.
    pub fn parse(approximate: &str) -> Result<Self> {
        match approximate {
            "tanh" => Ok(Gelu::Tanh),
            "none" => Ok(Gelu::Erf),
            other => Err(Error::invalid(format!(
                "unsupported gelu approximate={other:?}; expected \"tanh\" or \"none\""
            ))),
        }
    }
}

fn kernel_name(fwd: bool, gelu: Gelu, dtype: DType) -> &'static str {
    match (gelu, fwd, dtype) {
        (Gelu::Tanh, true, DType::F32) => "geglu_tanh_fwd_f32",
        (Gelu::Tanh, true, DType::F16) => "geglu_tanh_fwd_f16",
        (Gelu::Tanh, true, DType::BF16) => "geglu_tanh_fwd_bf16",
        (Gelu::Tanh, false, DType::F32) => "geglu_tanh_bwd_f32",
        (Gelu::Tanh, false, DType::F16) => "geglu_tanh_bwd_f16",
        (Gelu::Tanh, false, DType::BF16) => "geglu_tanh_bwd_bf16",
        (Gelu::Erf, true, DType::F32) => "geglu_erf_fwd_f32",
        (Gelu::Erf, true, DType::F16) => "geglu_erf_fwd_f16",
        (Gelu::Erf, true, DType::BF16) => "geglu_erf_fwd_bf16",
        (Gelu::Erf, false, DType::F32) => "geglu_erf_bwd_f32",
        (Gelu::Erf, false, DType::F16) => "geglu_erf_bwd_f16",
        (Gelu::Erf, false, DType::BF16) => "geglu_erf_bwd_bf16",
    }
}

/// `h[i] = gelu(g[i]) * u[i]` for `n` contiguous elements.
///
/// # Safety
/// `g`, `u` and `h` must be device pointers on `device` to at least `n` elements of `dtype`,
/// live until the launch has run on `stream`; `h` must not overlap `g` or `u`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn forward(
    dtype: DType,
    gelu: Gelu,
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
    check_ptrs("geglu forward", &[g, u, h])?;
    let mut vec_ok = all_aligned16(&[g, u, h]) as i32;
    let per = 16 / dtype.size();
    let name = kernel_name(true, gelu, dtype);
    // The forward body handles two vectors per thread per trip.
    let blocks = elementwise_grid(n, 2 * per, THREADS, || {
        cuda::resident_blocks(device, "geglu", name, THREADS)
    })?;
    let (mut g, mut u, mut h, mut n64) = (g, u, h, n as i64);
    let mut args = [
        &mut g as *mut usize as *mut c_void,
        &mut u as *mut usize as *mut c_void,
        &mut h as *mut usize as *mut c_void,
        &mut n64 as *mut i64 as *mut c_void,
        &mut vec_ok as *mut i32 as *mut c_void,
    ];
    // SAFETY: args match `geglu_<variant>_fwd_<dtype>(const T*, const T*, T*, int64_t, int)`;
    // the caller guarantees the pointers.
    unsafe {
        cuda::launch(
            device,
            stream,
            "geglu",
            name,
            LaunchConfig::linear(blocks, THREADS),
            &mut args,
        )
    }
}

/// Gradients of GeGLU: `dg = dh * u * gelu'(g)`, `du = dh * gelu(g)` (all `n` contiguous
/// elements).
///
/// # Safety
/// As [`forward`]; `dg` and `du` are outputs that overlap neither each other nor the inputs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn backward(
    dtype: DType,
    gelu: Gelu,
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
    check_ptrs("geglu backward", &[dh, g, u, dg, du])?;
    let mut vec_ok = all_aligned16(&[dh, g, u, dg, du]) as i32;
    let per = 16 / dtype.size();
    let name = kernel_name(false, gelu, dtype);
    let blocks = elementwise_grid(n, per, THREADS, || {
        cuda::resident_blocks(device, "geglu", name, THREADS)
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
    // SAFETY: args match
    // `geglu_<variant>_bwd_<dtype>(const T*, const T*, const T*, T*, T*, int64_t, int)`.
    unsafe {
        cuda::launch(
            device,
            stream,
            "geglu",
            name,
            LaunchConfig::linear(blocks, THREADS),
            &mut args,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_torch_approximate_names() {
        assert_eq!(Gelu::parse("tanh").unwrap(), Gelu::Tanh);
        assert_eq!(Gelu::parse("none").unwrap(), Gelu::Erf);
        assert!(matches!(Gelu::parse("erf"), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn null_pointer_is_rejected_before_any_cuda_call() {
        // SAFETY: n > 0 with a null pointer must fail in the argument check, touching no device.
        let r = unsafe { forward(DType::F32, Gelu::Tanh, 0, 16, 32, 4, 0, RawStream(0)) };
        assert!(matches!(r, Err(Error::InvalidArgument(_))));
        // SAFETY: n == 0 returns before any pointer is looked at.
        let r = unsafe { backward(DType::BF16, Gelu::Erf, 0, 0, 0, 0, 0, 0, 0, RawStream(0)) };
        assert!(r.is_ok());
    }
}
