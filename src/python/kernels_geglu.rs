//! Bindings of the GeGLU launchers. Python passes `data_ptr()`s, the element count, the dtype
//! name, torch's `approximate` string, the device index and
//! `torch.cuda.current_stream(device).cuda_stream`; the Python op layer
//! (`python/rslora_fast/ops/geglu.py`) has already checked shapes, dtypes and contiguity.

use pyo3::prelude::*;

use super::kernels::checked_elems;
use super::{guard, launch};
use crate::kernels::geglu::{self, Gelu};
use crate::kernels::{DType, GatedGrads};

/// geglu_fwd(g, u, h, n, dtype, approximate, device, stream) -> None
///
/// ``h = gelu(g, approximate) * u`` over ``n`` contiguous elements; ``approximate`` is ``"tanh"``
/// or ``"none"`` (erf); pointers are CUDA device addresses.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn geglu_fwd(
    py: Python<'_>,
    g: usize,
    u: usize,
    h: usize,
    n: usize,
    dtype: &str,
    approximate: &str,
    device: i32,
    stream: usize,
) -> PyResult<()> {
    let (dtype, gelu) = guard(|| Ok((DType::parse(dtype)?, Gelu::parse(approximate)?)))?;
    let e = checked_elems("geglu_fwd", &[g, u, h], n, dtype, device, stream)?;
    // SAFETY: the Python op passes live, contiguous tensors of `n` elements of `dtype` on `device`.
    launch(py, || unsafe { geglu::forward(&e, gelu, g, u, h) })
}

/// geglu_bwd(dh, g, u, dg, du, n, dtype, approximate, device, stream) -> None
///
/// Gradients of GeGLU into ``dg`` and ``du`` (``n`` contiguous elements each).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn geglu_bwd(
    py: Python<'_>,
    dh: usize,
    g: usize,
    u: usize,
    dg: usize,
    du: usize,
    n: usize,
    dtype: &str,
    approximate: &str,
    device: i32,
    stream: usize,
) -> PyResult<()> {
    let (dtype, gelu) = guard(|| Ok((DType::parse(dtype)?, Gelu::parse(approximate)?)))?;
    let e = checked_elems("geglu_bwd", &[dh, g, u, dg, du], n, dtype, device, stream)?;
    let b = GatedGrads { dh, g, u, dg, du };
    // SAFETY: as in geglu_fwd; dg/du are fresh outputs allocated by torch.
    launch(py, || unsafe { geglu::backward(&e, gelu, &b) })
}

/// Add the GeGLU bindings to `_core`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(geglu_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(geglu_bwd, m)?)?;
    Ok(())
}
