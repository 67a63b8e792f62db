//! Bindings of the RMSNorm launchers (`crate::kernels::rms_norm`). Python passes `data_ptr()`s,
//! the row count and width, the dtype name, the device index and torch's current stream; the op
//! layer (`python/rslora_fast/ops/rms_norm.py`) has already checked shapes, dtypes and contiguity.

use pyo3::prelude::*;

use super::{guard, launch};
use crate::args::{check_device, row_span};
use crate::cuda::RawStream;
use crate::kernels::rms_norm::{self, AddNorm, Grads, Rows};
use crate::kernels::DType;

/// The launch context of a binding, after parsing its dtype name.
fn rows_of(
    dtype: &str,
    rows: usize,
    cols: usize,
    gemma: bool,
    device: i32,
    stream: usize,
) -> PyResult<Rows> {
    let dtype = guard(|| DType::parse(dtype))?;
    let stream = RawStream(stream);
    Ok(Rows {
        dtype,
        rows,
        cols,
        gemma,
        device,
        stream,
    })
}

/// Check the buffers of binding `what`: `row_bufs` hold `rows x cols` elements of the dtype, `w`
/// holds `cols` of them and `rstd` `rows` float32.
fn check_bufs(what: &str, r: &Rows, row_bufs: &[usize], w: usize, rstd: usize) -> PyResult<()> {
    let size = r.dtype.size();
    guard(|| {
        let span = row_span(what, r.rows, r.cols, r.cols)?;
        check_device(what, row_bufs, span, size)?;
        check_device(&format!("{what} w"), &[w], r.cols, size)?;
        check_device(&format!("{what} rstd"), &[rstd], r.rows, 4)
    })
}

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
    let r = rows_of(dtype, rows, cols, gemma, device, stream)?;
    check_bufs("rms_norm_fwd", &r, &[x, y], w, rstd)?;
    // SAFETY: the Python op passes live contiguous tensors of the stated sizes on `device`, with
    // fresh outputs `y` and `rstd`.
    launch(py, || unsafe { rms_norm::forward(&r, x, w, y, rstd, eps) })
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
    let r = rows_of(dtype, rows, cols, gemma, device, stream)?;
    check_bufs("rms_norm_bwd", &r, &[dy, x, dx], w, rstd)?;
    let g = Grads { dy, x, w, rstd, dx };
    // SAFETY: as in rms_norm_fwd; `dx` and `partial` are fresh outputs allocated by torch.
    launch(py, || unsafe {
        rms_norm::backward(&r, &g, partial, partial_rows)
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
    let r = rows_of(dtype, rows, cols, gemma, device, stream)?;
    check_bufs("rms_norm_bwd_dx", &r, &[dy, x, dx], w, rstd)?;
    let g = Grads { dy, x, w, rstd, dx };
    // SAFETY: as in rms_norm_fwd; `dx` is a fresh output allocated by torch.
    launch(py, || unsafe { rms_norm::backward_dx(&r, &g) })
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
    let r = rows_of(dtype, rows, cols, gemma, device, stream)?;
    check_bufs("add_rms_norm_fwd", &r, &[x, residual, s, y], w, rstd)?;
    let b = AddNorm {
        x,
        residual,
        w,
        s,
        y,
        rstd,
    };
    // SAFETY: the Python op passes live contiguous tensors of the stated sizes on `device`, with
    // fresh outputs `s`, `y` and `rstd`.
    launch(py, || unsafe { rms_norm::add_forward(&r, &b, eps) })
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
    let r = rows_of(dtype, rows, cols, gemma, device, stream)?;
    check_bufs("add_rms_norm_bwd_dx", &r, &[dy, ds, s, dx], w, rstd)?;
    let g = Grads {
        dy,
        x: s,
        w,
        rstd,
        dx,
    };
    // SAFETY: as in add_rms_norm_fwd; `dx` is a fresh output allocated by torch.
    launch(py, || unsafe { rms_norm::add_backward_dx(&r, &g, ds) })
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
