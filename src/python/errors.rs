//! One mapping from [`crate::Error`] to Python exceptions, all under `RsloraError`.
//!
//! The classes are the Python ones in `rslora_fast.errors` (the canonical hierarchy, importable
//! without the extension); Rust imports them by name, so `except
//! rslora_fast.errors.InvalidArgumentError` catches what the extension raises. `_core` also
//! exposes them under the same names (the same class objects, not copies).

use pyo3::import_exception;
use pyo3::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::Error;

import_exception!(rslora_fast.errors, RsloraError);
import_exception!(rslora_fast.errors, CudaError);
import_exception!(rslora_fast.errors, KernelsUnavailableError);
import_exception!(rslora_fast.errors, QuantFormatError);
import_exception!(rslora_fast.errors, OffloadError);
import_exception!(rslora_fast.errors, InvalidArgumentError);
import_exception!(rslora_fast.errors, HostMemoryError);

/// Expose the error classes on `_core` (`_core.OffloadError is rslora_fast.errors.OffloadError`).
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
    m.add("HostMemoryError", py.get_type::<HostMemoryError>())?;
    Ok(())
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        let msg = err.to_string();
        match err {
            Error::InvalidArgument(_) => InvalidArgumentError::new_err(msg),
            Error::Cuda { .. } | Error::CudaUnavailable(_) => CudaError::new_err(msg),
            Error::KernelsUnavailable(_) => KernelsUnavailableError::new_err(msg),
            Error::QuantFormat(_) => QuantFormatError::new_err(msg),
            Error::HostMemory(_) => HostMemoryError::new_err(msg),
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
