//! Binding of the decode matvec launcher (`crate::kernels::decode_matvec`). The Python planner
//! (`python/rslora_fast/generate/matvec.py`) builds the member dicts once per projection group;
//! each call passes `data_ptr()`s of x, the output buffer and the LoRA down-projection, the batch,
//! the dtype name, the device and torch's current stream. The launchers check every count, size
//! and pointer before any pointer arithmetic.

use pyo3::prelude::*;

use super::{guard, launch};
use crate::cuda::RawStream;
use crate::kernels::decode_matvec::{self, Args, LoraB, LoraBArgs, Member, XaArgs};
use crate::kernels::nf4::ScalesPtr;
use crate::kernels::DType;
use crate::quant::QuantType;

/// One member as Python describes it (a dict with these keys).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct PyMember {
    n: usize,
    packed: usize,
    absmax: usize,
    absmax_q: usize,
    nested_absmax: usize,
    nested_code: usize,
    offset: f32,
    blocksize: usize,
    quant_type: String,
    bias: usize,
    lora_b: usize,
    rank: usize,
    scaling: f32,
    xa_col: usize,
}

impl PyMember {
    fn to_member(&self) -> crate::Result<Member> {
        Ok(Member {
            n: self.n,
            packed: self.packed,
            scales: ScalesPtr::from_parts(
                self.absmax,
                self.absmax_q,
                self.nested_absmax,
                self.nested_code,
                self.offset,
            ),
            blocksize: self.blocksize,
            quant_type: QuantType::parse(&self.quant_type)?,
            bias: self.bias,
            lora_b: self.lora_b,
            rank: self.rank,
            scaling: self.scaling,
            xa_col: self.xa_col,
        })
    }
}

/// decode_matvec_4bit(members, x, out, xa, xa_ld, batch, k, dtype, device, stream) -> None
///
/// For each member (a dict: ``n``, ``packed``, ``absmax`` or ``absmax_q`` + ``nested_absmax`` +
/// ``nested_code`` + ``offset``, ``blocksize``, ``quant_type``, ``bias`` (0: none), ``lora_b``
/// (0: none), ``rank``, ``scaling``, ``xa_col``) write ``x W^T (+ bias) + scaling * xa[:,
/// xa_col:xa_col+rank] lora_b^T`` for ``x`` ``[batch, k]`` (float16/bfloat16) into ``out``,
/// members one after the other, each ``[batch, n]``. ``xa`` is ``[batch, xa_ld]`` in the same
/// dtype (0 when no member has LoRA). Pointers are CUDA device addresses on ``device``.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn decode_matvec_4bit(
    py: Python<'_>,
    members: Vec<PyMember>,
    x: usize,
    out: usize,
    xa: usize,
    xa_ld: usize,
    batch: usize,
    k: usize,
    dtype: &str,
    device: i32,
    stream: usize,
) -> PyResult<()> {
    let args = guard(|| {
        Ok(Args {
            dtype: DType::parse(dtype)?,
            members: members
                .iter()
                .map(PyMember::to_member)
                .collect::<crate::Result<_>>()?,
            x,
            out,
            xa,
            xa_ld,
            batch,
            k,
        })
    })?;
    // SAFETY: the planner passes live contiguous tensors on `device` whose element counts are the
    // ones given (packed weights and scales of each layer's quant state, x, the fresh output
    // buffer and the LoRA buffers); `launch` checks the extents before any arithmetic.
    launch(py, || unsafe {
        decode_matvec::launch(&args, device, RawStream(stream))
    })
}

/// decode_lora_a(x, a, xa, rows, xa_ld, batch, k, dtype, device, stream) -> None
///
/// ``xa[:, :rows] = x a^T`` for ``x`` ``[batch, k]`` and ``a`` ``[rows, k]`` (a group's stacked
/// LoRA A matrices) into ``xa`` ``[batch, xa_ld]``, all float16/bfloat16 CUDA device addresses
/// on ``device``: one launch for the whole group.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn decode_lora_a(
    py: Python<'_>,
    x: usize,
    a: usize,
    xa: usize,
    rows: usize,
    xa_ld: usize,
    batch: usize,
    k: usize,
    dtype: &str,
    device: i32,
    stream: usize,
) -> PyResult<()> {
    let args = XaArgs {
        dtype: guard(|| DType::parse(dtype))?,
        x,
        a,
        xa,
        rows,
        xa_ld,
        batch,
        k,
    };
    // SAFETY: the planner passes live contiguous tensors on `device` of the counts given (x, the
    // group's stacked A copy, the output buffer's xa slice); `launch_xa` checks the extents.
    launch(py, || unsafe {
        decode_matvec::launch_xa(&args, device, RawStream(stream))
    })
}

/// decode_lora_b(members, out, xa, xa_ld, batch, dtype, device, stream) -> None
///
/// For each member, a tuple ``(n, lora_b, rank, scaling, xa_col)`` (``lora_b`` 0 and rank 0: no
/// LoRA), add ``scaling * xa[:, xa_col:xa_col+rank] lora_b^T`` in place to its output in ``out``
/// (members one after the other, each ``[batch, n]``); ``xa`` is ``[batch, xa_ld]``. The 16-bit
/// members' LoRA terms of a group in one launch. float16/bfloat16 CUDA device addresses.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn decode_lora_b(
    py: Python<'_>,
    members: Vec<(usize, usize, usize, f32, usize)>,
    out: usize,
    xa: usize,
    xa_ld: usize,
    batch: usize,
    dtype: &str,
    device: i32,
    stream: usize,
) -> PyResult<()> {
    let args = LoraBArgs {
        dtype: guard(|| DType::parse(dtype))?,
        members: members
            .iter()
            .map(|&(n, lora_b, rank, scaling, xa_col)| LoraB {
                n,
                lora_b,
                rank,
                scaling,
                xa_col,
            })
            .collect(),
        out,
        xa,
        xa_ld,
        batch,
    };
    // SAFETY: the planner passes live contiguous tensors on `device` (the output buffer, its xa
    // slice, the LoRA B copies) of the counts given; `launch_lora_b` checks the extents.
    launch(py, || unsafe {
        decode_matvec::launch_lora_b(&args, device, RawStream(stream))
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(decode_lora_b, m)?)?;
    m.add_function(wrap_pyfunction!(decode_matvec_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(decode_lora_a, m)?)?;
    Ok(())
}
