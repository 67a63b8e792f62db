//! Bindings for the CUDA bridge: device / driver facts for `rslora_fast info`.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::guard;
use crate::cuda;

/// cuda_info() -> dict
///
/// Facts about the driver and the kernels in this build: ``driver_version`` (e.g. 13000, or
/// None), ``device_count``, ``kernel_modules`` (names of the embedded kernel files),
/// ``kernel_archs`` (the SASS/PTX targets shipped), ``kernel_ptx_isa`` (the PTX ISA they declare),
/// ``kernel_ptxas`` (the ptxas release of the SASS) and ``driver_floor`` (oldest CUDA driver).
#[pyfunction]
fn cuda_info(py: Python<'_>) -> PyResult<Py<PyDict>> {
    let d = PyDict::new(py);
    d.set_item("driver_version", cuda::driver_version().ok())?;
    d.set_item("device_count", cuda::device_count())?;
    d.set_item("kernel_modules", cuda::kernel_modules())?;
    d.set_item("kernel_archs", cuda::images::targets())?;
    d.set_item("kernel_ptx_isa", cuda::images::PTX_ISA)?;
    d.set_item("kernel_ptxas", cuda::images::PTXAS_RELEASE)?;
    d.set_item("driver_floor", cuda::images::DRIVER_FLOOR_CUDA)?;
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
/// ``"module:target"`` per module (``sm_90``: shipped SASS; ``compute_90``: PTX the driver
/// JIT-compiled). Raises ``KernelsUnavailableError`` naming the images tried and the driver.
#[pyfunction]
fn load_kernels(device: i32) -> PyResult<Vec<String>> {
    let loaded = guard(|| cuda::load_all_modules(device))?;
    Ok(loaded.iter().map(|(m, t)| format!("{m}:{t}")).collect())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_info, m)?)?;
    m.add_function(wrap_pyfunction!(device_info, m)?)?;
    m.add_function(wrap_pyfunction!(load_kernels, m)?)?;
    Ok(())
}
