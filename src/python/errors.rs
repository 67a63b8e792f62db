//! One mapping from [`crate::Error`] to Python exceptions, all under `RsloraError`.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyMemoryError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};
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

// Two classes with a second, builtin base (so `except ValueError` / `except MemoryError` keep
// working): `create_exception!` takes one base, so they are made with `type(name, bases, ns)`.
static INVALID_ARGUMENT: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static HOST_MEMORY: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn two_base_class<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Py<PyType>>,
    name: &str,
    builtin: Bound<'py, PyType>,
    doc: &str,
) -> PyResult<Bound<'py, PyType>> {
    let cls = cell.get_or_try_init(py, || -> PyResult<Py<PyType>> {
        let bases = PyTuple::new(py, [py.get_type::<RsloraError>(), builtin])?;
        let ns = PyDict::new(py);
        ns.set_item("__doc__", doc)?;
        ns.set_item("__module__", "rslora_fast._core")?;
        let cls = py.get_type::<PyType>().call1((name, bases, ns))?;
        Ok(cls.cast_into::<PyType>()?.unbind())
    })?;
    Ok(cls.bind(py).clone())
}

fn invalid_argument_error(py: Python<'_>) -> PyResult<Bound<'_, PyType>> {
    two_base_class(
        py,
        &INVALID_ARGUMENT,
        "InvalidArgumentError",
        py.get_type::<PyValueError>(),
        "An argument passed to the extension is not acceptable (also a ValueError).",
    )
}

fn host_memory_error(py: Python<'_>) -> PyResult<Bound<'_, PyType>> {
    two_base_class(
        py,
        &HOST_MEMORY,
        "HostMemoryError",
        py.get_type::<PyMemoryError>(),
        "Host memory could not be allocated or a configured cap was reached (also a MemoryError).",
    )
}

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
    m.add("InvalidArgumentError", invalid_argument_error(py)?)?;
    m.add("HostMemoryError", host_memory_error(py)?)?;
    Ok(())
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        let msg = err.to_string();
        match err {
            Error::InvalidArgument(_) => two_base_err(invalid_argument_error, msg),
            Error::Cuda { .. } | Error::CudaUnavailable(_) => CudaError::new_err(msg),
            Error::KernelsUnavailable(_) => KernelsUnavailableError::new_err(msg),
            Error::QuantFormat(_) => QuantFormatError::new_err(msg),
            Error::HostMemory(_) => two_base_err(host_memory_error, msg),
            Error::Offload(_) => OffloadError::new_err(msg),
        }
    }
}

/// An instance of one of the two-base classes; before `register` ran (never in practice) the
/// builtin base is raised instead, so the error is not lost.
fn two_base_err(
    class: for<'py> fn(Python<'py>) -> PyResult<Bound<'py, PyType>>,
    msg: String,
) -> PyErr {
    Python::attach(|py| match class(py) {
        Ok(cls) => PyErr::from_type(cls, msg),
        Err(e) => e,
    })
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
