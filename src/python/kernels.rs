//! Bindings of the kernel launchers. Python passes `data_ptr()`s, element counts, the dtype
//! name, the device index and `torch.cuda.current_stream(device).cuda_stream`; the Python op
//! layer (`python/rslora_fast/ops/`) has already checked shapes, dtypes and contiguity.

use pyo3::prelude::*;

use super::guard;
use crate::args::check_device;
use crate::cuda::RawStream;
use crate::kernels::{swiglu, DType};

/// swiglu_fwd(g, u, h, n, dtype, device, stream) -> None
///
/// ``h = silu(g) * u`` over ``n`` contiguous elements; pointers are CUDA device addresses.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn swiglu_fwd(
    py: Python<'_>,
    g: usize,
    u: usize,
    h: usize,
    n: usize,
    dtype: &str,
    device: i32,
    stream: usize,
) -> PyResult<()> {
    let dtype = guard(|| DType::parse(dtype))?;
    guard(|| check_device("swiglu_fwd", &[g, u, h], n, dtype.size()))?;
    // SAFETY: the Python op passes live, contiguous tensors of `n` elements of `dtype` on `device`.
    py.detach(|| guard(|| unsafe { swiglu::forward(dtype, g, u, h, n, device, RawStream(stream)) }))
}

/// swiglu_bwd(dh, g, u, dg, du, n, dtype, device, stream) -> None
///
/// Gradients of SwiGLU into ``dg`` and ``du`` (``n`` contiguous elements each).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn swiglu_bwd(
    py: Python<'_>,
    dh: usize,
    g: usize,
    u: usize,
    dg: usize,
    du: usize,
    n: usize,
    dtype: &str,
    device: i32,
    stream: usize,
) -> PyResult<()> {
    let dtype = guard(|| DType::parse(dtype))?;
    guard(|| check_device("swiglu_bwd", &[dh, g, u, dg, du], n, dtype.size()))?;
    // SAFETY: as in swiglu_fwd; dg/du are fresh outputs allocated by torch.
    py.detach(|| {
        guard(|| unsafe { swiglu::backward(dtype, dh, g, u, dg, du, n, device, RawStream(stream)) })
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(swiglu_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(swiglu_bwd, m)?)?;
    Ok(())
}
