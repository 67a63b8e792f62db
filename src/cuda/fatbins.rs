//! The kernel images compiled by `build.rs` (one fatbin per `kernels/*.cu`), embedded as bytes.

use crate::{Error, Result};

include!(concat!(env!("OUT_DIR"), "/fatbins.rs"));

/// The image of `kernels/<module>.cu`.
pub fn fatbin(module: &str) -> Result<&'static [u8]> {
    if FATBINS.is_empty() {
        return Err(Error::KernelsUnavailable(
            "this build has no CUDA kernels (it was built with RSLORA_FAST_SKIP_KERNELS=1); \
             rebuild with nvcc available (see README)"
                .into(),
        ));
    }
    FATBINS
        .iter()
        .find(|(name, _)| *name == module)
        .map(|(_, bytes)| *bytes)
        .ok_or_else(|| Error::KernelsUnavailable(format!("no kernel module named {module}")))
}

/// The architectures the embedded images were compiled for, e.g. `"sm_80,sm_90,compute_90"`.
pub const ARCHS: &str = KERNEL_ARCHS;
