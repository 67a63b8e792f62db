//! The crate's one error type. `src/python/errors.rs` maps each variant to a Python exception
//! under `rslora_fast.RsloraError`; nothing here knows Python.

use thiserror::Error;

/// Every failure the Rust core can report.
#[derive(Debug, Error)]
pub enum Error {
    /// A caller passed a value we cannot accept (shape, dtype, blocksize, pointer...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A CUDA driver call failed. `context` names the operation or kernel.
    #[error("CUDA error in {context}: {message} (CUresult {code})")]
    Cuda {
        context: String,
        code: i32,
        message: String,
    },

    /// No CUDA driver could be loaded, or no device is present.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),

    /// The kernels were not compiled into this build (it was made without nvcc).
    #[error("kernels unavailable: {0}")]
    KernelsUnavailable(String),

    /// A serialized quantization state (bitsandbytes layout) is malformed.
    #[error("bad quantization format: {0}")]
    QuantFormat(String),

    /// Host memory could not be allocated or a configured cap was reached.
    #[error("out of host memory: {0}")]
    HostMemory(String),

    /// Misuse of the offload scheduler (unknown handle, double release, ...).
    #[error("offload scheduler: {0}")]
    Offload(String),
}

/// Shorthand used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Build an [`Error::InvalidArgument`] from anything printable.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}
