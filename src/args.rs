//! Checks of the raw buffers the Python bindings receive, done before any pointer arithmetic.
//!
//! A binding receives `(address, element count)` pairs. These checks reject a null or misaligned
//! address, a byte size that overflows `isize`, and an extent that wraps the address space; the
//! core functions then compare the element counts with what the operation needs, so a buffer
//! shorter than the shape needs is an error, never a read past its end. What cannot be checked
//! from an address is whether the caller's count is true: the Python layer passes `numel()` of
//! the tensor whose `data_ptr()` it passes.

use crate::{Error, Result};

/// Bytes of `count` elements of `elem` bytes, if that fits in `isize` (Rust's object size limit).
pub fn byte_size(what: &str, count: usize, elem: usize) -> Result<usize> {
    count
        .checked_mul(elem)
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(|| Error::invalid(format!("{what}: {count} elements of {elem} bytes overflow")))
}

/// Check that `[ptr, ptr + count * elem)` is a plausible buffer: non-null, aligned to `align`,
/// a size that fits in `isize`, not wrapping the address space. Returns its size in bytes.
pub fn check_extent(
    what: &str,
    ptr: usize,
    count: usize,
    elem: usize,
    align: usize,
) -> Result<usize> {
    let bytes = byte_size(what, count, elem)?;
    if count == 0 {
        return Ok(0);
    }
    if ptr == 0 {
        return Err(Error::invalid(format!("{what}: null pointer")));
    }
    if ptr % align != 0 {
        return Err(Error::invalid(format!(
            "{what}: address {ptr:#x} is not aligned to {align} bytes"
        )));
    }
    if ptr.checked_add(bytes).is_none() {
        return Err(Error::invalid(format!(
            "{what}: {bytes} bytes at {ptr:#x} wrap the address space"
        )));
    }
    Ok(bytes)
}

/// A shared slice of `len` elements at `ptr`, after [`check_extent`].
///
/// # Safety
/// `ptr` must point to `len` initialized, live elements of `T` not written during `'a`.
pub unsafe fn host_slice<'a, T>(what: &str, ptr: usize, len: usize) -> Result<&'a [T]> {
    check_extent(what, ptr, len, size_of::<T>(), align_of::<T>())?;
    if len == 0 {
        return Ok(&[]);
    }
    // SAFETY: non-null, aligned, size within isize and no wrap (checked); the caller vouches for
    // liveness and length.
    Ok(unsafe { std::slice::from_raw_parts(ptr as *const T, len) })
}

/// A mutable slice of `len` elements at `ptr`, after [`check_extent`].
///
/// # Safety
/// `ptr` must point to `len` live elements of `T` that nothing else reads or writes during `'a`.
pub unsafe fn host_slice_mut<'a, T>(what: &str, ptr: usize, len: usize) -> Result<&'a mut [T]> {
    check_extent(what, ptr, len, size_of::<T>(), align_of::<T>())?;
    if len == 0 {
        return Ok(&mut []);
    }
    // SAFETY: as in `host_slice`, and the caller vouches for exclusive access.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr as *mut T, len) })
}

/// Check device buffers of `count` elements of `elem` bytes each (null, size overflow, wrap);
/// device addresses cannot be probed further from here.
pub fn check_device(what: &str, ptrs: &[usize], count: usize, elem: usize) -> Result<()> {
    for &p in ptrs {
        check_extent(what, p, count, elem, 1)?;
    }
    Ok(())
}

/// Check that no two of the `(address, bytes)` ranges overlap (an output written while it is
/// read, or two outputs in one buffer, would give garbage). Null addresses are left to
/// [`check_extent`], which names them.
pub fn check_disjoint(what: &str, ranges: &[(usize, usize)]) -> Result<()> {
    for (i, &(a, na)) in ranges.iter().enumerate() {
        for &(b, nb) in &ranges[i + 1..] {
            let both = na > 0 && nb > 0 && a != 0 && b != 0;
            if both && a < b.saturating_add(nb) && b < a.saturating_add(na) {
                return Err(Error::invalid(format!("{what}: buffers overlap")));
            }
        }
    }
    Ok(())
}

/// Elements spanned by `rows` rows of `cols` elements, `ld` elements apart (`ld >= cols`), if
/// that count does not overflow.
pub fn row_span(what: &str, rows: usize, cols: usize, ld: usize) -> Result<usize> {
    if rows == 0 || cols == 0 {
        return Ok(0);
    }
    if ld < cols {
        return Err(Error::invalid(format!(
            "{what}: leading dimension {ld} is smaller than the row width {cols}"
        )));
    }
    (rows - 1)
        .checked_mul(ld)
        .and_then(|x| x.checked_add(cols))
        .ok_or_else(|| Error::invalid(format!("{what}: {rows} rows of stride {ld} overflow")))
}
