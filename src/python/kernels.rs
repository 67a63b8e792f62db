//! Bindings of the kernel launchers. Python passes `data_ptr()`s, element counts, the dtype
//! name, the device index and `torch.cuda.current_stream(device).cuda_stream`; the Python op
//! layer (`python/rslora_fast/ops/`) has already checked shapes, dtypes and contiguity.

use pyo3::prelude::*;

use super::{guard, launch};
use crate::args::check_device;
use crate::cuda::RawStream;
use crate::kernels::{swiglu, DType, Elems, GatedGrads};

/// The launch context of an elementwise binding over `n` elements of `dtype`, after checking its
/// buffers (`what` names the binding in errors).
pub(super) fn checked_elems(
    what: &str,
    bufs: &[usize],
    n: usize,
    dtype: DType,
    device: i32,
    stream: usize,
) -> PyResult<Elems> {
    guard(|| check_device(what, bufs, n, dtype.size()))?;
    let stream = RawStream(stream);
    Ok(Elems {
        dtype,
        n,
        device,
        stream,
    })
}

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
    let e = checked_elems("swiglu_fwd", &[g, u, h], n, dtype, device, stream)?;
    // SAFETY: the Python op passes live, contiguous tensors of `n` elements of `dtype` on `device`.
    launch(py, || unsafe { swiglu::forward(&e, g, u, h) })
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
    let e = checked_elems("swiglu_bwd", &[dh, g, u, dg, du], n, dtype, device, stream)?;
    let b = GatedGrads { dh, g, u, dg, du };
    // SAFETY: as in swiglu_fwd; dg/du are fresh outputs allocated by torch.
    launch(py, || unsafe { swiglu::backward(&e, &b) })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(swiglu_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(swiglu_bwd, m)?)?;
    Ok(())
}
