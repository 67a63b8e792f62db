//! Python bindings of `crate::quant` (CPU, by pointer) and of the `kernels/nf4.cu` launchers.
//! Python passes `data_ptr()`s of contiguous torch tensors it allocated, element counts and
//! names; `rslora_fast.quant.functional` has already checked dtypes, sizes and devices.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::guard;
use crate::cuda::RawStream;
use crate::kernels::nf4::{self, ScalesPtr};
use crate::kernels::DType;
use crate::quant::{self, QuantState, QuantType};
use crate::Error;

fn nonnull(what: &str, ptrs: &[usize]) -> crate::Result<()> {
    if ptrs.contains(&0) {
        return Err(Error::invalid(format!("{what}: null pointer")));
    }
    Ok(())
}

/// nf4_quantize_cpu(src, n, blocksize, quant_type, packed, absmax) -> None
///
/// Quantize ``n`` contiguous float32 values at host address ``src`` into ``packed`` (uint8,
/// ``(n + 1) // 2`` bytes) and ``absmax`` (float32, ``ceil(n / blocksize)``). Multi-threaded.
/// Raises ``QuantFormatError`` for a bad blocksize or quant type.
#[pyfunction]
fn nf4_quantize_cpu(
    py: Python<'_>,
    src: usize,
    n: usize,
    blocksize: usize,
    quant_type: &str,
    packed: usize,
    absmax: usize,
) -> PyResult<()> {
    let qt = guard(|| QuantType::parse(quant_type))?;
    py.detach(|| {
        guard(|| {
            quant::check_blocksize(blocksize)?;
            if n == 0 {
                return Ok(());
            }
            nonnull("nf4_quantize_cpu", &[src, packed, absmax])?;
            // SAFETY: Python passes live, contiguous CPU tensors of these sizes and dtypes
            // (float32 src, uint8 packed, float32 absmax) that do not overlap.
            let (x, p, a) = unsafe {
                (
                    std::slice::from_raw_parts(src as *const f32, n),
                    std::slice::from_raw_parts_mut(packed as *mut u8, quant::packed_len(n)),
                    std::slice::from_raw_parts_mut(
                        absmax as *mut f32,
                        quant::num_blocks(n, blocksize),
                    ),
                )
            };
            quant::quantize_4bit(x, blocksize, qt, p, a)
        })
    })
}

/// nf4_dequantize_cpu(packed, absmax, n, blocksize, quant_type, out) -> None
///
/// Dequantize ``n`` elements into the float32 host buffer ``out`` from ``packed`` (uint8) and
/// the float32 block scales ``absmax``.
#[pyfunction]
fn nf4_dequantize_cpu(
    py: Python<'_>,
    packed: usize,
    absmax: usize,
    n: usize,
    blocksize: usize,
    quant_type: &str,
    out: usize,
) -> PyResult<()> {
    let qt = guard(|| QuantType::parse(quant_type))?;
    py.detach(|| {
        guard(|| {
            quant::check_blocksize(blocksize)?;
            if n == 0 {
                return Ok(());
            }
            nonnull("nf4_dequantize_cpu", &[packed, absmax, out])?;
            // SAFETY: live contiguous CPU tensors of these sizes; `out` overlaps no input.
            let (p, a, o) = unsafe {
                (
                    std::slice::from_raw_parts(packed as *const u8, quant::packed_len(n)),
                    std::slice::from_raw_parts(
                        absmax as *const f32,
                        quant::num_blocks(n, blocksize),
                    ),
                    std::slice::from_raw_parts_mut(out as *mut f32, n),
                )
            };
            quant::dequantize_4bit(p, a, blocksize, qt, o)
        })
    })
}

/// double_quant_cpu(absmax, n, offset, codes, nested_absmax) -> None
///
/// Double-quantize ``n`` float32 block scales around ``offset`` (pass torch's
/// ``absmax.mean()`` for bitsandbytes-identical bytes): uint8 ``codes`` ``[n]`` and float32
/// ``nested_absmax`` ``[ceil(n / 256)]``, with the signed 8-bit dynamic map.
#[pyfunction]
fn double_quant_cpu(
    py: Python<'_>,
    absmax: usize,
    n: usize,
    offset: f32,
    codes: usize,
    nested_absmax: usize,
) -> PyResult<()> {
    py.detach(|| {
        guard(|| {
            if n == 0 {
                return Ok(());
            }
            nonnull("double_quant_cpu", &[absmax, codes, nested_absmax])?;
            // SAFETY: live contiguous CPU tensors of these sizes, not overlapping.
            let (a, c, na) = unsafe {
                (
                    std::slice::from_raw_parts(absmax as *const f32, n),
                    std::slice::from_raw_parts_mut(codes as *mut u8, n),
                    std::slice::from_raw_parts_mut(
                        nested_absmax as *mut f32,
                        n.div_ceil(quant::NESTED_BLOCKSIZE),
                    ),
                )
            };
            quant::double_quant_into(a, offset, c, na)
        })
    })
}

/// dequant_scales_cpu(codes, nested_absmax, offset, n, out) -> None
///
/// Undo double quantization of ``n`` block scales into the float32 buffer ``out``:
/// ``map[codes[b]] * nested_absmax[b // 256] + offset``.
#[pyfunction]
fn dequant_scales_cpu(
    codes: usize,
    nested_absmax: usize,
    offset: f32,
    n: usize,
    out: usize,
) -> PyResult<()> {
    guard(|| {
        if n == 0 {
            return Ok(());
        }
        nonnull("dequant_scales_cpu", &[codes, nested_absmax, out])?;
        // SAFETY: live contiguous CPU tensors of these sizes; `out` overlaps no input.
        let (c, na, o) = unsafe {
            (
                std::slice::from_raw_parts(codes as *const u8, n),
                std::slice::from_raw_parts(
                    nested_absmax as *const f32,
                    n.div_ceil(quant::NESTED_BLOCKSIZE),
                ),
                std::slice::from_raw_parts_mut(out as *mut f32, n),
            )
        };
        quant::dequant_scales(c, na, offset, o)
    })
}

/// dynamic_map() -> list[float]
///
/// The signed 8-bit dynamic map (256 sorted float32 values) used for double quantization.
#[pyfunction]
fn dynamic_map() -> Vec<f32> {
    quant::dynamic_map().to_vec()
}

/// parse_quant_state(raw: bytes) -> dict
///
/// Parse and validate bitsandbytes' ``quant_state`` JSON. Returns a dict with ``quant_type``,
/// ``blocksize``, ``dtype``, ``shape`` and, with double quantization, ``nested_blocksize``,
/// ``nested_dtype``, ``nested_offset``. Raises ``QuantFormatError`` naming the problem.
#[pyfunction]
fn parse_quant_state(py: Python<'_>, raw: &[u8]) -> PyResult<Py<PyDict>> {
    let st = guard(|| QuantState::from_json(raw))?;
    let d = PyDict::new(py);
    d.set_item("quant_type", st.quant_type.name())?;
    d.set_item("blocksize", st.blocksize)?;
    d.set_item("dtype", &st.dtype)?;
    d.set_item("shape", st.shape.clone())?;
    if let Some((nb, off)) = st.nested {
        d.set_item("nested_blocksize", nb)?;
        d.set_item("nested_dtype", "float32")?;
        d.set_item("nested_offset", off as f64)?;
    }
    Ok(d.unbind())
}

/// quant_state_json(quant_type, blocksize, dtype, shape, nested_offset=None) -> bytes
///
/// The ``quant_state`` JSON bytes bitsandbytes writes (same spacing and float formatting).
#[pyfunction]
#[pyo3(signature = (quant_type, blocksize, dtype, shape, nested_offset=None))]
fn quant_state_json<'py>(
    py: Python<'py>,
    quant_type: &str,
    blocksize: usize,
    dtype: &str,
    shape: Vec<usize>,
    nested_offset: Option<f32>,
) -> PyResult<Bound<'py, PyBytes>> {
    let st = guard(|| {
        quant::check_blocksize(blocksize)?;
        Ok(QuantState {
            quant_type: QuantType::parse(quant_type)?,
            blocksize,
            dtype: dtype.to_string(),
            shape,
            nested: nested_offset.map(|o| (quant::NESTED_BLOCKSIZE, o)),
        })
    })?;
    Ok(PyBytes::new(py, &st.to_json()))
}

/// nf4_dequantize_cuda(packed, absmax, absmax_q, nested_absmax, nested_code, offset, out, n,
/// blocksize, quant_type, out_dtype, device, stream) -> None
///
/// Dequantize on the GPU into ``out`` (``out_dtype``: float32/float16/bfloat16). Scales are
/// either float32 ``absmax`` (then pass 0 for ``absmax_q``, ``nested_absmax``,
/// ``nested_code``) or double-quantized: ``absmax`` = 0, uint8 ``absmax_q``, float32
/// ``nested_absmax`` and ``nested_code`` (256) and ``offset``. Pointers are device addresses.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn nf4_dequantize_cuda(
    py: Python<'_>,
    packed: usize,
    absmax: usize,
    absmax_q: usize,
    nested_absmax: usize,
    nested_code: usize,
    offset: f32,
    out: usize,
    n: usize,
    blocksize: usize,
    quant_type: &str,
    out_dtype: &str,
    device: i32,
    stream: usize,
) -> PyResult<()> {
    let (qt, dtype) = guard(|| Ok((QuantType::parse(quant_type)?, DType::parse(out_dtype)?)))?;
    let scales = if absmax_q != 0 {
        ScalesPtr::Nested {
            codes: absmax_q,
            nested_absmax,
            nested_code,
            offset,
        }
    } else {
        ScalesPtr::Plain(absmax)
    };
    // SAFETY: the Python layer passes live contiguous CUDA tensors of the documented sizes on
    // `device`, allocated by torch; `out` is a separate buffer.
    py.detach(|| {
        guard(|| unsafe {
            nf4::dequantize(
                packed,
                scales,
                out,
                n,
                blocksize,
                qt,
                dtype,
                device,
                RawStream(stream),
            )
        })
    })
}

/// nf4_quantize_cuda(src, src_dtype, n, blocksize, quant_type, packed, absmax, device, stream)
/// -> None
///
/// Quantize ``n`` contiguous elements (``src_dtype``) on the GPU into ``packed`` (uint8,
/// ``(n + 1) // 2``) and ``absmax`` (float32, ``ceil(n / blocksize)``): the same bytes as
/// ``nf4_quantize_cpu``.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn nf4_quantize_cuda(
    py: Python<'_>,
    src: usize,
    src_dtype: &str,
    n: usize,
    blocksize: usize,
    quant_type: &str,
    packed: usize,
    absmax: usize,
    device: i32,
    stream: usize,
) -> PyResult<()> {
    let (qt, dtype) = guard(|| Ok((QuantType::parse(quant_type)?, DType::parse(src_dtype)?)))?;
    // SAFETY: as in nf4_dequantize_cuda; outputs are fresh torch allocations.
    py.detach(|| {
        guard(|| unsafe {
            nf4::quantize(
                src,
                packed,
                absmax,
                n,
                blocksize,
                qt,
                dtype,
                device,
                RawStream(stream),
            )
        })
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(nf4_quantize_cpu, m)?)?;
    m.add_function(wrap_pyfunction!(nf4_dequantize_cpu, m)?)?;
    m.add_function(wrap_pyfunction!(double_quant_cpu, m)?)?;
    m.add_function(wrap_pyfunction!(dequant_scales_cpu, m)?)?;
    m.add_function(wrap_pyfunction!(dynamic_map, m)?)?;
    m.add_function(wrap_pyfunction!(parse_quant_state, m)?)?;
    m.add_function(wrap_pyfunction!(quant_state_json, m)?)?;
    m.add_function(wrap_pyfunction!(nf4_dequantize_cuda, m)?)?;
    m.add_function(wrap_pyfunction!(nf4_quantize_cuda, m)?)?;
    Ok(())
}
