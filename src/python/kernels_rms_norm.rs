//! Bindings of the RMSNorm launchers (`crate::kernels::rms_norm`). Python passes `data_ptr()`s,
//! the row count and width, the dtype name, the device index and torch's current stream; the op
//! layer (`python/rslora_fast/ops/rms_norm.py`) has already checked shapes, dtypes and contiguity.

use pyo3::prelude::*;

use super::guard;
use crate::args::{check_device, row_span};
use crate::cuda::RawStream;
use crate::kernels::{rms_norm, DType};

/// rms_norm_fwd(x, w, y, rstd, rows, cols, eps, gemma, dtype, device, stream) -> None
///
/// RMSNorm of ``rows`` contiguous rows of ``cols`` elements into ``y`` (same dtype) and ``rstd``
/// (``rows`` float32); ``gemma`` selects ``(1 + w)``. Pointers are CUDA device addresses.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn rms_norm_fwd(
    py: Python<'_>,
    x: usize,
    w: usize,
    y: usize,
    rstd: usize,
    rows: usize,
    cols: usize,
    eps: f32,
    gemma: bool,
    dtype: &str,
    device: i32,
    stream: usize,
) -> PyResult<()> {
    let dtype = guard(|| DType::parse(dtype))?;
    guard(|| {
        let span = row_span("rms_norm_fwd", rows, cols, cols)?;
        check_device("rms_norm_fwd", &[x, y], span, dtype.size())?;
        check_device("rms_norm_fwd w", &[w], cols, dtype.size())?;
        check_device("rms_norm_fwd rstd", &[rstd], rows, 4)
    })?;
    // SAFETY: the Python op passes live contiguous tensors of the stated sizes on `device`, with
    // fresh outputs `y` and `rstd`.
    py.detach(|| {
        guard(|| unsafe {
            rms_norm::forward(
                dtype,
                x,
                w,
                y,
                rstd,
                rows,
                cols,
                eps,
                gemma,
                device,
                RawStream(stream),
            )
        })
    })
}

/// rms_norm_bwd_partial_rows(rows, cols, dtype, device) -> int
///
/// Rows of the float32 ``[n, cols]`` buffer that ``rms_norm_bwd`` fills with partial sums of
/// ``dw`` (sum it over dim 0): one per thread group of the backward's grid, a whole number of
/// blocks' groups, so it can exceed ``rows`` by less than one block (those rows are zeros).
#[pyfunction]
fn rms_norm_bwd_partial_rows(
    rows: usize,
    cols: usize,
    dtype: &str,
    device: i32,
) -> PyResult<usize> {
    guard(|| rms_norm::backward_partial_rows(rows, cols, DType::parse(dtype)?, device))
}

/// rms_norm_bwd(dy, x, w, rstd, dx, partial, partial_rows, rows, cols, gemma, dtype, device, stream) -> None
///
/// Gradient of RMSNorm into ``dx`` and per-group float32 partial sums of ``dw`` into
/// ``partial`` (``partial_rows`` from ``rms_norm_bwd_partial_rows``).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn rms_norm_bwd(
    py: Python<'_>,
    dy: usize,
    x: usize,
    w: usize,
    rstd: usize,
    dx: usize,
    partial: usize,
    partial_rows: usize,
    rows: usize,
    cols: usize,
    gemma: bool,
    dtype: &str,
    device: i32,
    stream: usize,
) -> PyResult<()> {
    let dtype = guard(|| DType::parse(dtype))?;
    guard(|| {
        let span = row_span("rms_norm_bwd", rows, cols, cols)?;
        check_device("rms_norm_bwd", &[dy, x, dx], span, dtype.size())?;
        check_device("rms_norm_bwd w", &[w], cols, dtype.size())?;
        check_device("rms_norm_bwd rstd", &[rstd], rows, 4)
    })?;
    // SAFETY: as in rms_norm_fwd; `dx` and `partial` are fresh outputs allocated by torch.
    py.detach(|| {
        guard(|| unsafe {
            rms_norm::backward(
                dtype,
                dy,
                x,
                w,
                rstd,
                dx,
                partial,
                partial_rows,
                rows,
                cols,
                gemma,
                device,
                RawStream(stream),
            )
        })
    })
}

/// rms_norm_bwd_dx(dy, x, w, rstd, dx, rows, cols, gemma, dtype, device, stream) -> None
///
/// Gradient of RMSNorm with respect to the input only (frozen weight) into ``dx``: one pass, no
/// ``dw`` partials. The op's autograd takes it whenever the weight needs no gradient.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn rms_norm_bwd_dx(
    py: Python<'_>,
    dy: usize,
    x: usize,
    w: usize,
    rstd: usize,
    dx: usize,
    rows: usize,
    cols: usize,
    gemma: bool,
    dtype: &str,
    device: i32,
    stream: usize,
) -> PyResult<()> {
    let dtype = guard(|| DType::parse(dtype))?;
    guard(|| {
        let span = row_span("rms_norm_bwd_dx", rows, cols, cols)?;
        check_device("rms_norm_bwd_dx", &[dy, x, dx], span, dtype.size())?;
        check_device("rms_norm_bwd_dx w", &[w], cols, dtype.size())?;
        check_device("rms_norm_bwd_dx rstd", &[rstd], rows, 4)
    })?;
    // SAFETY: as in rms_norm_fwd; `dx` is a fresh output allocated by torch.
    py.detach(|| {
        guard(|| unsafe {
            rms_norm::backward_dx(
                dtype,
                dy,
                x,
                w,
                rstd,
                dx,
                rows,
                cols,
                gemma,
                device,
                RawStream(stream),
            )
        })
    })
}

/// add_rms_norm_fwd(x, residual, w, s, y, rstd, rows, cols, eps, gemma, dtype, device, stream) -> None
///
/// Residual add + RMSNorm in one pass: ``s = x + residual`` (rounded to the dtype) and
/// ``y``, ``rstd`` of ``s`` as ``rms_norm_fwd`` computes them. Pointers are CUDA device addresses.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn add_rms_norm_fwd(
    py: Python<'_>,
    x: usize,
    residual: usize,
    w: usize,
    s: usize,
    y: usize,
    rstd: usize,
    rows: usize,
    cols: usize,
    eps: f32,
    gemma: bool,
    dtype: &str,
    device: i32,
    stream: usize,
) -> PyResult<()> {
    let dtype = guard(|| DType::parse(dtype))?;
    guard(|| {
        let span = row_span("add_rms_norm_fwd", rows, cols, cols)?;
        check_device("add_rms_norm_fwd", &[x, residual, s, y], span, dtype.size())?;
        check_device("add_rms_norm_fwd w", &[w], cols, dtype.size())?;
        check_device("add_rms_norm_fwd rstd", &[rstd], rows, 4)
    })?;
    // SAFETY: the Python op passes live contiguous tensors of the stated sizes on `device`, with
    // fresh outputs `s`, `y` and `rstd`.
    py.detach(|| {
        guard(|| unsafe {
            rms_norm::add_forward(
                dtype,
                x,
                residual,
                w,
                s,
                y,
                rstd,
                rows,
                cols,
                eps,
                gemma,
                device,
                RawStream(stream),
            )
        })
    })
}

/// add_rms_norm_bwd_dx(dy, ds, s, w, rstd, dx, rows, cols, gemma, dtype, device, stream) -> None
///
/// Gradient of both inputs of ``add_rms_norm_fwd`` for a frozen weight: ``ds`` (the sum's own
/// gradient) plus the RMSNorm input gradient of ``dy``, rounded once, into ``dx``.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn add_rms_norm_bwd_dx(
    py: Python<'_>,
    dy: usize,
    ds: usize,
    s: usize,
    w: usize,
    rstd: usize,
    dx: usize,
    rows: usize,
    cols: usize,
    gemma: bool,
    dtype: &str,
    device: i32,
    stream: usize,
) -> PyResult<()> {
    let dtype = guard(|| DType::parse(dtype))?;
    guard(|| {
        let span = row_span("add_rms_norm_bwd_dx", rows, cols, cols)?;
        check_device("add_rms_norm_bwd_dx", &[dy, ds, s, dx], span, dtype.size())?;
        check_device("add_rms_norm_bwd_dx w", &[w], cols, dtype.size())?;
        check_device("add_rms_norm_bwd_dx rstd", &[rstd], rows, 4)
    })?;
    // SAFETY: as in add_rms_norm_fwd; `dx` is a fresh output allocated by torch.
    py.detach(|| {
        guard(|| unsafe {
            rms_norm::add_backward_dx(
                dtype,
                dy,
                ds,
                s,
                w,
                rstd,
                dx,
                rows,
                cols,
                gemma,
                device,
                RawStream(stream),
            )
        })
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(rms_norm_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(rms_norm_bwd_partial_rows, m)?)?;
    m.add_function(wrap_pyfunction!(rms_norm_bwd, m)?)?;
    m.add_function(wrap_pyfunction!(rms_norm_bwd_dx, m)?)?;
    m.add_function(wrap_pyfunction!(add_rms_norm_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(add_rms_norm_bwd_dx, m)?)?;
    Ok(())
}
