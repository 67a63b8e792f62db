//! Bindings of the cross-entropy launchers. Python passes `data_ptr()`s, the row stride, the
//! shape, the ignore index, the dtype name, the device index and
//! `torch.cuda.current_stream(device).cuda_stream`; the Python op layer
//! (`python/rslora_fast/ops/cross_entropy.py`) has already checked shapes, dtypes and layouts.

use pyo3::prelude::*;

use super::{guard, launch};
use crate::args::{check_device, row_span};
use crate::cuda::RawStream;
use crate::kernels::cross_entropy::{self, Logits};
use crate::kernels::DType;

/// The launch context of a binding, after parsing its dtype name.
fn logits_of(
    dtype: &str,
    ld: usize,
    rows: usize,
    cols: usize,
    ignore: i64,
    device: i32,
    stream: usize,
) -> PyResult<Logits> {
    let dtype = guard(|| DType::parse(dtype))?;
    let stream = RawStream(stream);
    Ok(Logits {
        dtype,
        ld,
        rows,
        cols,
        ignore,
        device,
        stream,
    })
}

/// Check the buffers of binding `what`: the strided `logits`, `rows` int64 `targets`, and the
/// two per-row float32 buffers `floats` (named `names` in errors).
fn check_bufs(
    what: &str,
    l: &Logits,
    logits: usize,
    targets: usize,
    (names, floats): (&str, [usize; 2]),
) -> PyResult<()> {
    guard(|| {
        let on_logits = format!("{what} logits");
        let span = row_span(&on_logits, l.rows, l.cols, l.ld)?;
        check_device(&on_logits, &[logits], span, l.dtype.size())?;
        check_device(&format!("{what} targets"), &[targets], l.rows, 8)?;
        check_device(&format!("{what} {names}"), &floats, l.rows, 4)
    })
}

/// cross_entropy_fwd(logits, ld, targets, lse, loss, rows, cols, ignore_index, dtype, device, stream) -> None
///
/// Per-row float32 log-sum-exp into ``lse`` and ``lse - logits[i, targets[i]]`` into ``loss``
/// (0 for ignored rows) for ``rows`` rows of ``cols`` contiguous elements, ``ld`` elements apart;
/// ``targets`` are int64; pointers are CUDA device addresses.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn cross_entropy_fwd(
    py: Python<'_>,
    logits: usize,
    ld: usize,
    targets: usize,
    lse: usize,
    loss: usize,
    rows: usize,
    cols: usize,
    ignore_index: i64,
    dtype: &str,
    device: i32,
    stream: usize,
) -> PyResult<()> {
    let l = logits_of(dtype, ld, rows, cols, ignore_index, device, stream)?;
    check_bufs(
        "cross_entropy_fwd",
        &l,
        logits,
        targets,
        ("lse/loss", [lse, loss]),
    )?;
    // SAFETY: the Python op passes live tensors of the stated shapes, dtypes and strides on
    // `device`; lse and loss are fresh float32 outputs.
    launch(py, || unsafe {
        cross_entropy::forward(&l, logits, targets, lse, loss)
    })
}

/// cross_entropy_bwd(logits, ld, lse, targets, scale, rows, cols, ignore_index, dtype, device, stream) -> None
///
/// In place: ``logits[i, j] = (exp(logits[i, j] - lse[i]) - [j == targets[i]]) * scale[i]``
/// (``lse`` and ``scale`` float32 per row, ``targets`` int64).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn cross_entropy_bwd(
    py: Python<'_>,
    logits: usize,
    ld: usize,
    lse: usize,
    targets: usize,
    scale: usize,
    rows: usize,
    cols: usize,
    ignore_index: i64,
    dtype: &str,
    device: i32,
    stream: usize,
) -> PyResult<()> {
    let l = logits_of(dtype, ld, rows, cols, ignore_index, device, stream)?;
    check_bufs(
        "cross_entropy_bwd",
        &l,
        logits,
        targets,
        ("lse/scale", [lse, scale]),
    )?;
    // SAFETY: as in cross_entropy_fwd; logits is the op's mutated input, lse/scale/targets are
    // separate tensors.
    launch(py, || unsafe {
        cross_entropy::backward(&l, logits, lse, targets, scale)
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cross_entropy_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(cross_entropy_bwd, m)?)?;
    Ok(())
}
