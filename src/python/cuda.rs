//! Bindings for the CUDA bridge: device / driver facts for `rslora_fast info`.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::guard;
use crate::cuda;

/// cuda_info() -> dict
///
/// Facts about the driver and the kernels in this build: ``driver_version`` (e.g. 13000, or
/// None), ``device_count``, ``kernel_modules`` (names of the embedded kernel files) and
/// ``kernel_archs`` (the SASS/PTX targets they were compiled for).
#[pyfunction]
fn cuda_info(py: Python<'_>) -> PyResult<Py<PyDict>> {
    let d = PyDict::new(py);
    d.set_item("driver_version", cuda::driver_version().ok())?;
    d.set_item("device_count", cuda::device_count())?;
    d.set_item("kernel_modules", cuda::kernel_modules())?;
    d.set_item("kernel_archs", cuda::fatbins::ARCHS)?;
    Ok(d.unbind())
}

/// device_info(device: int) -> tuple[str, int, int]
///
/// Name and compute capability ``(major, minor)`` of CUDA device ``device``.
#[pyfunction]
fn device_info(device: i32) -> PyResult<(String, i32, i32)> {
    guard(|| cuda::device_info(device))
}

/// load_kernels(device: int) -> list[str]
///
/// Load every embedded kernel module on ``device`` (checks the build runs on this GPU); returns
/// the module names. Raises ``CudaError`` naming the module and the CUDA error on failure.
#[pyfunction]
fn load_kernels(device: i32) -> PyResult<Vec<&'static str>> {
    guard(|| cuda::load_all_modules(device))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_info, m)?)?;
    m.add_function(wrap_pyfunction!(device_info, m)?)?;
    m.add_function(wrap_pyfunction!(load_kernels, m)?)?;
    Ok(())
}
