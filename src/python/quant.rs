//! Python bindings of `crate::quant` (CPU, by pointer) and of the `kernels/nf4.cu` launchers.
//! Python passes `data_ptr()`s of contiguous torch tensors it allocated, element counts and
//! names; `rslora_fast.quant.functional` has already checked dtypes, sizes and devices.

use std::marker::PhantomData;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::{guard, launch};
use crate::args::{byte_size, check_device, check_disjoint, host_slice, host_slice_mut};
use crate::cuda::RawStream;
use crate::kernels::nf4::{self, ScalesPtr};
use crate::kernels::DType;
use crate::quant::{self, QuantState, QuantType};

/// A contiguous host buffer of `len` `T`s at `addr` passed to a CPU binding; `name` names it in
/// errors.
struct Host<T> {
    name: &'static str,
    addr: usize,
    len: usize,
    elem: PhantomData<T>,
}

fn host<T>(name: &'static str, addr: usize, len: usize) -> Host<T> {
    Host {
        name,
        addr,
        len,
        elem: PhantomData,
    }
}

impl<T> Host<T> {
    /// `(address, bytes)` for the overlap check; a byte buffer's count is its size already.
    fn range(&self) -> crate::Result<(usize, usize)> {
        let bytes = match size_of::<T>() {
            1 => self.len,
            size => byte_size(self.name, self.len, size)?,
        };
        Ok((self.addr, bytes))
    }

    /// The buffer as a slice, after checking its extent (`what` names the binding in errors).
    ///
    /// # Safety
    /// As [`host_slice`]: the buffer is live and holds `len` `T`s.
    unsafe fn get<'a>(&self, what: &str) -> crate::Result<&'a [T]> {
        // SAFETY: the caller's guarantee.
        unsafe { host_slice(&format!("{what} {}", self.name), self.addr, self.len) }
    }

    /// As [`Host::get`], for a buffer the binding writes (nothing else may access it meanwhile).
    ///
    /// # Safety
    /// As [`host_slice_mut`].
    unsafe fn get_mut<'a>(&self, what: &str) -> crate::Result<&'a mut [T]> {
        // SAFETY: the caller's guarantee.
        unsafe { host_slice_mut(&format!("{what} {}", self.name), self.addr, self.len) }
    }
}

/// Run the body of a 4-bit CPU binding with the GIL released, after parsing its quant type and
/// checking its blocksize.
fn run_4bit(
    py: Python<'_>,
    quant_type: &str,
    blocksize: usize,
    body: impl FnOnce(QuantType) -> crate::Result<()> + Send,
) -> PyResult<()> {
    let qt = guard(|| QuantType::parse(quant_type))?;
    py.detach(|| {
        guard(|| {
            quant::check_blocksize(blocksize)?;
            body(qt)
        })
    })
}

/// nf4_quantize_cpu(src, src_len, blocksize, quant_type, packed, packed_len, absmax, absmax_len)
/// -> None
///
/// Quantize the ``src_len`` contiguous float32 values at host address ``src`` into ``packed``
/// (uint8, must hold ``(src_len + 1) // 2`` bytes) and ``absmax`` (float32,
/// ``ceil(src_len / blocksize)``). Each ``*_len`` is the element count of the buffer passed.
/// Multi-threaded. Raises ``QuantFormatError`` for a bad blocksize or quant type and
/// ``InvalidArgumentError`` for a null, misaligned, overlapping or wrongly sized buffer.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn nf4_quantize_cpu(
    py: Python<'_>,
    src: usize,
    src_len: usize,
    blocksize: usize,
    quant_type: &str,
    packed: usize,
    packed_len: usize,
    absmax: usize,
    absmax_len: usize,
) -> PyResult<()> {
    const WHAT: &str = "nf4_quantize_cpu";
    let src = host::<f32>("src", src, src_len);
    let packed = host::<u8>("packed", packed, packed_len);
    let absmax = host::<f32>("absmax", absmax, absmax_len);
    run_4bit(py, quant_type, blocksize, |qt| {
        check_disjoint(WHAT, &[src.range()?, packed.range()?, absmax.range()?])?;
        // SAFETY: extents checked by `get*`; Python passes live contiguous CPU tensors with these
        // element counts.
        let (x, p, a) = unsafe { (src.get(WHAT)?, packed.get_mut(WHAT)?, absmax.get_mut(WHAT)?) };
        quant::quantize_4bit(x, blocksize, qt, p, a)
    })
}

/// nf4_dequantize_cpu(packed, packed_len, absmax, absmax_len, blocksize, quant_type, out, out_len)
/// -> None
///
/// Dequantize ``out_len`` elements into the float32 host buffer ``out`` from ``packed`` (uint8,
/// ``(out_len + 1) // 2`` bytes) and the float32 block scales ``absmax``
/// (``ceil(out_len / blocksize)``). A buffer of another size raises ``InvalidArgumentError``.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn nf4_dequantize_cpu(
    py: Python<'_>,
    packed: usize,
    packed_len: usize,
    absmax: usize,
    absmax_len: usize,
    blocksize: usize,
    quant_type: &str,
    out: usize,
    out_len: usize,
) -> PyResult<()> {
    const WHAT: &str = "nf4_dequantize_cpu";
    let packed = host::<u8>("packed", packed, packed_len);
    let absmax = host::<f32>("absmax", absmax, absmax_len);
    let out = host::<f32>("out", out, out_len);
    run_4bit(py, quant_type, blocksize, |qt| {
        check_disjoint(WHAT, &[out.range()?, packed.range()?, absmax.range()?])?;
        // SAFETY: extents checked; live contiguous CPU tensors of these element counts.
        let (p, a, o) = unsafe { (packed.get(WHAT)?, absmax.get(WHAT)?, out.get_mut(WHAT)?) };
        quant::dequantize_4bit(p, a, blocksize, qt, o)
    })
}

/// double_quant_cpu(absmax, absmax_len, offset, codes, codes_len, nested_absmax, nested_len)
/// -> None
///
/// Double-quantize ``absmax_len`` float32 block scales around ``offset`` (pass torch's
/// ``absmax.mean()`` for bitsandbytes-identical bytes): uint8 ``codes`` (``absmax_len``) and
/// float32 ``nested_absmax`` (``ceil(absmax_len / 256)``), with the signed 8-bit dynamic map.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn double_quant_cpu(
    py: Python<'_>,
    absmax: usize,
    absmax_len: usize,
    offset: f32,
    codes: usize,
    codes_len: usize,
    nested_absmax: usize,
    nested_len: usize,
) -> PyResult<()> {
    const WHAT: &str = "double_quant_cpu";
    let absmax = host::<f32>("absmax", absmax, absmax_len);
    let codes = host::<u8>("codes", codes, codes_len);
    let nested = host::<f32>("nested_absmax", nested_absmax, nested_len);
    py.detach(|| {
        guard(|| {
            check_disjoint(WHAT, &[absmax.range()?, codes.range()?, nested.range()?])?;
            // SAFETY: extents checked; live contiguous CPU tensors of these element counts.
            let (a, c, na) = unsafe {
                (
                    absmax.get(WHAT)?,
                    codes.get_mut(WHAT)?,
                    nested.get_mut(WHAT)?,
                )
            };
            quant::double_quant_into(a, offset, c, na)
        })
    })
}

/// dequant_scales_cpu(codes, codes_len, nested_absmax, nested_len, offset, out, out_len) -> None
///
/// Undo double quantization of ``codes_len`` block scales into the float32 buffer ``out``
/// (``codes_len`` entries): ``map[codes[b]] * nested_absmax[b // 256] + offset``.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn dequant_scales_cpu(
    codes: usize,
    codes_len: usize,
    nested_absmax: usize,
    nested_len: usize,
    offset: f32,
    out: usize,
    out_len: usize,
) -> PyResult<()> {
    const WHAT: &str = "dequant_scales_cpu";
    let codes = host::<u8>("codes", codes, codes_len);
    let nested = host::<f32>("nested_absmax", nested_absmax, nested_len);
    let out = host::<f32>("out", out, out_len);
    guard(|| {
        check_disjoint(WHAT, &[codes.range()?, nested.range()?, out.range()?])?;
        // SAFETY: extents checked; live contiguous CPU tensors of these element counts.
        let (c, na, o) = unsafe { (codes.get(WHAT)?, nested.get(WHAT)?, out.get_mut(WHAT)?) };
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
    guard(|| {
        quant::check_blocksize(blocksize)?;
        check_device("nf4_dequantize_cuda out", &[out], n, dtype.size())?;
        check_device(
            "nf4_dequantize_cuda packed",
            &[packed],
            quant::packed_len(n),
            1,
        )?;
        let nb = quant::num_blocks(n, blocksize);
        if absmax_q != 0 {
            check_device("nf4_dequantize_cuda absmax_q", &[absmax_q], nb, 1)?;
            let nested = nb.div_ceil(quant::NESTED_BLOCKSIZE);
            check_device(
                "nf4_dequantize_cuda nested_absmax",
                &[nested_absmax],
                nested,
                4,
            )?;
            check_device("nf4_dequantize_cuda nested_code", &[nested_code], 256, 4)
        } else {
            check_device("nf4_dequantize_cuda absmax", &[absmax], nb, 4)
        }
    })?;
    let scales = ScalesPtr::from_parts(absmax, absmax_q, nested_absmax, nested_code, offset);
    let p = params(n, blocksize, qt, dtype, device, stream);
    // SAFETY: the Python layer passes live contiguous CUDA tensors of the documented sizes on
    // `device`, allocated by torch; `out` is a separate buffer.
    launch(py, || unsafe { nf4::dequantize(&p, packed, scales, out) })
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
    guard(|| {
        quant::check_blocksize(blocksize)?;
        check_device("nf4_quantize_cuda src", &[src], n, dtype.size())?;
        check_device(
            "nf4_quantize_cuda packed",
            &[packed],
            quant::packed_len(n),
            1,
        )?;
        let nb = quant::num_blocks(n, blocksize);
        check_device("nf4_quantize_cuda absmax", &[absmax], nb, 4)
    })?;
    let p = params(n, blocksize, qt, dtype, device, stream);
    // SAFETY: as in nf4_dequantize_cuda; outputs are fresh torch allocations.
    launch(py, || unsafe { nf4::quantize(&p, src, packed, absmax) })
}

/// The launch parameters of a CUDA binding.
fn params(
    n: usize,
    blocksize: usize,
    qt: QuantType,
    dtype: DType,
    device: i32,
    stream: usize,
) -> nf4::Params {
    let stream = RawStream(stream);
    nf4::Params {
        n,
        blocksize,
        qt,
        dtype,
        device,
        stream,
    }
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
