//! Binding of the rotary-embedding launcher. The Python op (`python/rslora_fast/ops/rope.py`)
//! has checked shapes, dtypes, devices and that the last dimension of every tensor is contiguous;
//! it passes `data_ptr()`s, sizes, element strides, the dtype name, the device and the stream.

use pyo3::prelude::*;

use super::{guard, launch};
use crate::cuda::RawStream;
use crate::kernels::{rope, DType};

/// rope_apply(q, k, cos, sin, batch, seq, q_heads, k_heads, head_dim, q_strides, k_strides, cos_strides, sin_strides, backward, dtype, device, stream) -> None
///
/// Rotate ``q`` ``[batch, q_heads, seq, head_dim]`` and ``k`` ``[batch, k_heads, seq, head_dim]``
/// in place by ``cos``/``sin`` ``[batch, seq, head_dim]`` (rotate_half convention); with
/// ``backward=True`` apply the transposed rotation (gradients). Strides are in elements:
/// ``(batch, head, seq)`` for q/k and ``(batch, seq)`` for cos/sin; pointers are CUDA addresses.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn rope_apply(
    py: Python<'_>,
    q: usize,
    k: usize,
    cos: usize,
    sin: usize,
    batch: usize,
    seq: usize,
    q_heads: usize,
    k_heads: usize,
    head_dim: usize,
    q_strides: [i64; 3],
    k_strides: [i64; 3],
    cos_strides: [i64; 2],
    sin_strides: [i64; 2],
    backward: bool,
    dtype: &str,
    device: i32,
    stream: usize,
) -> PyResult<()> {
    let dtype = guard(|| DType::parse(dtype))?;
    let args = rope::RopeArgs {
        dtype,
        q,
        k,
        cos,
        sin,
        batch,
        seq,
        q_heads,
        k_heads,
        head_dim,
        q_strides,
        k_strides,
        cos_strides,
        sin_strides,
    };
    // SAFETY: the Python op passes live tensors on `device` whose shapes and strides are the ones
    // given, q and k distinct (and in-place rows non-overlapping: it rejects overlapping layouts).
    launch(py, || unsafe {
        rope::apply(&args, backward, device, RawStream(stream))
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(rope_apply, m)?)?;
    Ok(())
}
