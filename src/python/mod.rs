//! The only place that knows PyO3: thin wrappers over the pure-Rust core and the error mapping.
//! Every binding runs its body through [`guard`] so a panic becomes a Python exception instead
//! of crossing the FFI boundary.

use pyo3::prelude::*;

mod cuda;
pub(crate) mod errors;
mod kernels;
mod kernels_cross_entropy;
mod kernels_decode;
mod kernels_geglu;
mod kernels_rms_norm;
mod kernels_rope;
mod offload;
mod patterns;
mod quant;

pub(crate) use errors::guard;

/// Run a checked launch with the GIL released, through [`guard`]: every kernel binding ends so.
pub(crate) fn launch(py: Python<'_>, f: impl FnOnce() -> crate::Result<()> + Send) -> PyResult<()> {
    py.detach(|| guard(f))
}

/// `rslora_fast._core`: the compiled extension.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    cuda::register(m)?;
    kernels::register(m)?;
    kernels_cross_entropy::register(m)?;
    kernels_decode::register(m)?;
    kernels_geglu::register(m)?;
    kernels_rms_norm::register(m)?;
    kernels_rope::register(m)?;
    quant::register(m)?;
    offload::register(m)?;
    patterns::register(m)?;
    Ok(())
}
