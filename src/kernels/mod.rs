//! One typed launcher per `kernels/*.cu` file: argument checks, launch shape, dtype dispatch.
//! Tensors arrive as raw device pointers (owned by PyTorch) plus element counts.

use crate::{Error, Result};

pub mod cross_entropy;
pub mod decode_matvec;
mod gated;
pub mod geglu;
pub mod nf4;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;

pub use gated::{Elems, GatedGrads};

/// The entry `<stem>_f32`, `<stem>_f16` or `<stem>_bf16` for `dtype`: the kernel files build one
/// entry per dtype by appending that suffix (`##SUFFIX` in `kernels/*.cu`).
macro_rules! by_dtype {
    ($stem:literal, $dtype:expr) => {
        match $dtype {
            $crate::kernels::DType::F32 => concat!($stem, "_f32"),
            $crate::kernels::DType::F16 => concat!($stem, "_f16"),
            $crate::kernels::DType::BF16 => concat!($stem, "_bf16"),
        }
    };
}
pub(crate) use by_dtype;

/// The argument array of a launch: a pointer to each given place, in the kernel's parameter order
/// (the driver reads every parameter's value through its pointer, so the places must be live
/// until the launch call returns). `addr_of_mut!` takes places only: a value expression such as
/// `n as i64` is a compile error, not a pointer to a temporary dropped before the launch.
macro_rules! kernel_args {
    ($($place:expr),* $(,)?) => {
        [$(::core::ptr::addr_of_mut!($place).cast::<::std::ffi::c_void>()),*]
    };
}
pub(crate) use kernel_args;

/// [`kernel_args!`] for a run of pointer parameters held in `ptrs`.
pub(crate) fn ptr_args(ptrs: &mut [usize]) -> Vec<*mut std::ffi::c_void> {
    ptrs.iter_mut()
        .map(|p| p as *mut usize as *mut std::ffi::c_void)
        .collect()
}

/// Floating-point element types our kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Parse the torch dtype name (`"float32"`, `"float16"`, `"bfloat16"`).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "float32" | "float" | "f32" => Ok(DType::F32),
            "float16" | "half" | "f16" => Ok(DType::F16),
            "bfloat16" | "bf16" => Ok(DType::BF16),
            other => Err(Error::invalid(format!(
                "unsupported dtype {other:?}; expected one of float32, float16, bfloat16"
            ))),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// True when every pointer is 16-byte aligned (so kernels may use 16-byte vector access).
pub(crate) fn all_aligned16(ptrs: &[usize]) -> bool {
    ptrs.iter().all(|p| p % 16 == 0)
}

/// Grid for a grid-stride elementwise kernel over `n` elements with `per_thread` elements per
/// thread per trip: as many blocks as the work needs (many short-lived blocks beat one resident
/// wave looping over the tensor: docs/benchmarks.md, "Grid sizing"). `RSLORA_FAST_MAX_WAVES=N` caps the grid at N waves of `resident` blocks (see
/// [`crate::cuda::resident_blocks`]); it exists for benchmarking.
pub(crate) fn elementwise_grid(
    n: usize,
    per_thread: usize,
    threads: u32,
    resident: impl FnOnce() -> Result<u32>,
) -> Result<u32> {
    static WAVES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let waves = *WAVES.get_or_init(|| {
        std::env::var("RSLORA_FAST_MAX_WAVES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    let needed = n.div_ceil(per_thread).div_ceil(threads as usize).max(1);
    // The occupancy query only runs when a cap asks for it (it is off the default path).
    let cap = if waves == 0 {
        usize::MAX
    } else {
        waves * resident()?.max(1) as usize
    };
    Ok(needed.min(cap).min(i32::MAX as usize) as u32)
}

pub(crate) fn check_ptrs(what: &str, ptrs: &[usize]) -> Result<()> {
    if ptrs.contains(&0) {
        return Err(Error::invalid(format!("{what}: null device pointer")));
    }
    Ok(())
}
