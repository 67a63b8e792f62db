//! Launchers for `kernels/geglu.cu`: `h = gelu(g) * u` (tanh or erf gelu) and its backward.

use super::gated::{self, Elems, GatedGrads, Kernel};
use super::{by_dtype, DType};
use crate::{Error, Result};

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
    match (gelu, fwd) {
        (Gelu::Tanh, true) => by_dtype!("geglu_tanh_fwd", dtype),
        (Gelu::Tanh, false) => by_dtype!("geglu_tanh_bwd", dtype),
        (Gelu::Erf, true) => by_dtype!("geglu_erf_fwd", dtype),
        (Gelu::Erf, false) => by_dtype!("geglu_erf_bwd", dtype),
    }
}

fn kernel(fwd: bool, gelu: Gelu, dtype: DType) -> Kernel {
    Kernel {
        module: "geglu",
        name: kernel_name(fwd, gelu, dtype),
    }
}

/// `h[i] = gelu(g[i]) * u[i]` for `n` contiguous elements.
///
/// # Safety
/// `g`, `u` and `h` must be device pointers on `device` to at least `n` elements of `dtype`,
/// live until the launch has run on `stream`; `h` must not overlap `g` or `u`.
pub unsafe fn forward(e: &Elems, gelu: Gelu, g: usize, u: usize, h: usize) -> Result<()> {
    let k = kernel(true, gelu, e.dtype);
    // SAFETY: the caller's guarantees; `geglu_<variant>_fwd_<dtype>` takes the gated forward
    // arguments.
    unsafe { gated::forward(k, "geglu forward", e, g, u, h) }
}

/// Gradients of GeGLU: `dg = dh * u * gelu'(g)`, `du = dh * gelu(g)` (all `n` contiguous
/// elements).
///
/// # Safety
/// As [`forward`] for every pointer of `b`; `dg` and `du` are outputs that overlap neither each
/// other nor the inputs.
pub unsafe fn backward(e: &Elems, gelu: Gelu, b: &GatedGrads) -> Result<()> {
    let k = kernel(false, gelu, e.dtype);
    // SAFETY: the caller's guarantees; `geglu_<variant>_bwd_<dtype>` takes the gated backward
    // arguments.
    unsafe { gated::backward(k, "geglu backward", e, b) }
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
        let stream = crate::cuda::RawStream(0);
        let e = Elems {
            dtype: DType::F32,
            n: 4,
            device: 0,
            stream,
        };
        // SAFETY: n > 0 with a null pointer must fail in the argument check, touching no device.
        let r = unsafe { forward(&e, Gelu::Tanh, 0, 16, 32) };
        assert!(matches!(r, Err(Error::InvalidArgument(_))));
        let e = Elems {
            dtype: DType::BF16,
            n: 0,
            device: 0,
            stream,
        };
        let b = GatedGrads {
            dh: 0,
            g: 0,
            u: 0,
            dg: 0,
            du: 0,
        };
        // SAFETY: n == 0 returns before any pointer is looked at.
        let r = unsafe { backward(&e, Gelu::Erf, &b) };
        assert!(r.is_ok());
    }
}
