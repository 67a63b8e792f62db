//! Bindings of the cross-entropy launchers. Python passes `data_ptr()`s, the row stride, the
//! shape, the ignore index, the dtype name, the device index and
//! `torch.cuda.current_stream(device).cuda_stream`; the Python op layer
//! (`python/rslora_fast/ops/cross_entropy.py`) has already checked shapes, dtypes and layouts.

use pyo3::prelude::*;

use super::guard;
use crate::args::{check_device, row_span};
use crate::cuda::RawStream;
use crate::kernels::{cross_entropy, DType};

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
    let dtype = guard(|| DType::parse(dtype))?;
    guard(|| {
        let span = row_span("cross_entropy_fwd logits", rows, cols, ld)?;
        check_device("cross_entropy_fwd logits", &[logits], span, dtype.size())?;
        check_device("cross_entropy_fwd targets", &[targets], rows, 8)?;
        check_device("cross_entropy_fwd lse/loss", &[lse, loss], rows, 4)
    })?;
    // SAFETY: the Python op passes live tensors of the stated shapes, dtypes and strides on
    // `device`; lse and loss are fresh float32 outputs.
    py.detach(|| {
        guard(|| unsafe {
            cross_entropy::forward(
                dtype,
                logits,
                ld,
                targets,
                lse,
                loss,
                rows,
                cols,
                ignore_index,
                device,
                RawStream(stream),
            )
        })
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
    let dtype = guard(|| DType::parse(dtype))?;
    guard(|| {
        let span = row_span("cross_entropy_bwd logits", rows, cols, ld)?;
        check_device("cross_entropy_bwd logits", &[logits], span, dtype.size())?;
        check_device("cross_entropy_bwd targets", &[targets], rows, 8)?;
        check_device("cross_entropy_bwd lse/scale", &[lse, scale], rows, 4)
    })?;
    // SAFETY: as in cross_entropy_fwd; logits is the op's mutated input, lse/scale/targets are
    // separate tensors.
    py.detach(|| {
        guard(|| unsafe {
            cross_entropy::backward(
                dtype,
                logits,
                ld,
                lse,
                targets,
                scale,
                rows,
                cols,
                ignore_index,
                device,
                RawStream(stream),
            )
        })
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cross_entropy_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(cross_entropy_bwd, m)?)?;
    Ok(())
}
