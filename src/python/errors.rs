//! One mapping from [`crate::Error`] to Python exceptions, all under `RsloraError`.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyMemoryError, PyValueError};
use pyo3::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::Error;

create_exception!(
    _core,
    RsloraError,
    PyException,
    "Base class of every error raised by rslora_fast."
);
create_exception!(
    _core,
    CudaError,
    RsloraError,
    "A CUDA driver call or kernel launch failed; the message names the kernel and the CUDA error."
);
create_exception!(
    _core,
    KernelsUnavailableError,
    RsloraError,
    "The compiled kernels are missing or cannot be loaded on this machine."
);
create_exception!(
    _core,
    QuantFormatError,
    RsloraError,
    "A quantized tensor or its serialized state is malformed."
);
create_exception!(
    _core,
    OffloadError,
    RsloraError,
    "The activation-offload scheduler was misused or ran out of host memory."
);
create_exception!(
    _core,
    InvalidArgumentError,
    RsloraError,
    "An argument passed to the extension is not acceptable (also a ValueError)."
);

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("RsloraError", py.get_type::<RsloraError>())?;
    m.add("CudaError", py.get_type::<CudaError>())?;
    m.add(
        "KernelsUnavailableError",
        py.get_type::<KernelsUnavailableError>(),
    )?;
    m.add("QuantFormatError", py.get_type::<QuantFormatError>())?;
    m.add("OffloadError", py.get_type::<OffloadError>())?;
    m.add(
        "InvalidArgumentError",
        py.get_type::<InvalidArgumentError>(),
    )?;
    Ok(())
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        let msg = err.to_string();
        match err {
            // ValueError keeps `except ValueError` working for bad arguments.
            Error::InvalidArgument(_) => PyValueError::new_err(msg),
            Error::Cuda { .. } | Error::CudaUnavailable(_) => CudaError::new_err(msg),
            Error::KernelsUnavailable(_) => KernelsUnavailableError::new_err(msg),
            Error::QuantFormat(_) => QuantFormatError::new_err(msg),
            Error::HostMemory(_) => PyMemoryError::new_err(msg),
            Error::Offload(_) => OffloadError::new_err(msg),
        }
    }
}

/// Run a binding body, turning `Err` into the mapped exception and a panic into `RsloraError`.
pub(crate) fn guard<T>(f: impl FnOnce() -> crate::Result<T>) -> PyResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.into()),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(RsloraError::new_err(format!(
                "internal error (bug): {what}"
            )))
        }
    }
}
