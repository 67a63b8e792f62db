//! The checks every binding runs on a Python-supplied address and length before touching it.

use rslora_fast::args::{
    byte_size, check_device, check_disjoint, check_extent, host_slice, row_span,
};
use rslora_fast::Error;

fn invalid<T: std::fmt::Debug>(r: rslora_fast::Result<T>, needle: &str) {
    match r {
        Err(Error::InvalidArgument(msg)) => {
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}")
        }
        other => panic!("expected InvalidArgument containing {needle:?}, got {other:?}"),
    }
}

#[test]
fn byte_sizes_that_overflow_isize_are_rejected() {
    assert_eq!(byte_size("x", 10, 4).unwrap(), 40);
    invalid(byte_size("x", usize::MAX, 4), "overflow");
    invalid(byte_size("x", isize::MAX as usize / 2 + 1, 2), "overflow");
}

#[test]
fn null_misaligned_and_wrapping_extents_are_rejected() {
    assert_eq!(
        check_extent("x", 0, 0, 4, 4).unwrap(),
        0,
        "an empty buffer may be null"
    );
    invalid(check_extent("x", 0, 1, 4, 4), "null");
    invalid(check_extent("x", 4098, 1, 4, 4), "aligned");
    invalid(check_extent("x", usize::MAX - 7, 4, 4, 4), "wrap");
    assert_eq!(check_extent("x", 4096, 3, 4, 4).unwrap(), 12);
    invalid(check_device("k", &[4096, 0], 1, 2), "null");
    invalid(check_device("k", &[4096], usize::MAX / 2, 4), "overflow");
}

#[test]
fn host_slice_checks_before_building_the_slice() {
    let v = [1.0f32, 2.0, 3.0];
    // SAFETY: a live array of 3 floats.
    let s = unsafe { host_slice::<f32>("v", v.as_ptr() as usize, 3) }.unwrap();
    assert_eq!(s, &v);
    // SAFETY: rejected before any slice exists (misaligned by one byte).
    invalid(
        unsafe { host_slice::<f32>("v", v.as_ptr() as usize + 1, 2) },
        "aligned",
    );
    // SAFETY: rejected before any slice exists.
    invalid(unsafe { host_slice::<f32>("v", 0, 2) }, "null");
}

#[test]
fn overlapping_buffers_are_rejected() {
    check_disjoint("op", &[(4096, 16), (4112, 16)]).unwrap();
    invalid(check_disjoint("op", &[(4096, 16), (4100, 16)]), "overlap");
    check_disjoint("op", &[(4096, 0), (4096, 16)]).unwrap();
}

#[test]
fn row_spans_check_the_leading_dimension_and_overflow() {
    assert_eq!(row_span("ce", 3, 4, 8).unwrap(), 2 * 8 + 4);
    assert_eq!(row_span("ce", 0, 4, 8).unwrap(), 0);
    invalid(row_span("ce", 2, 8, 4), "leading dimension");
    invalid(row_span("ce", usize::MAX, 8, 8), "overflow");
}
