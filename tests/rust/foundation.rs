//! CPU-side checks of the foundation: the embedded kernels, dtype parsing, and graceful behaviour
//! without a GPU (no panic, a clear error).

use rslora_fast::cuda;
use rslora_fast::kernels::DType;
use rslora_fast::Error;

#[test]
fn every_kernel_file_is_embedded_as_a_fatbin() {
    let mut cu: Vec<String> = std::fs::read_dir("kernels")
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "cu").then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    cu.sort();
    let mut embedded: Vec<String> = cuda::kernel_modules()
        .iter()
        .map(|s| s.to_string())
        .collect();
    embedded.sort();
    if std::env::var("RSLORA_FAST_SKIP_KERNELS").as_deref() == Ok("1") {
        assert!(embedded.is_empty());
        return;
    }
    assert_eq!(cu, embedded);
    for name in &embedded {
        let image = cuda::fatbins::fatbin(name).unwrap();
        // A fatbin starts with the magic 0xBA55ED50 (little endian).
        assert_eq!(
            &image[..4],
            &[0x50, 0xed, 0x55, 0xba],
            "{name} is not a fatbin"
        );
    }
    assert!(cuda::fatbins::ARCHS.contains("sm_90"));
}

#[test]
fn unknown_module_is_a_clear_error() {
    match cuda::fatbins::fatbin("no_such_kernel") {
        Err(Error::KernelsUnavailable(msg)) => {
            assert!(msg.contains("no_such_kernel") || msg.contains("without"))
        }
        other => panic!("expected KernelsUnavailable, got {other:?}"),
    }
}

#[test]
fn dtype_names() {
    assert_eq!(DType::parse("bfloat16").unwrap(), DType::BF16);
    assert_eq!(DType::parse("float16").unwrap().size(), 2);
    assert_eq!(DType::parse("float32").unwrap().size(), 4);
    let err = DType::parse("float64").unwrap_err().to_string();
    assert!(err.contains("float64") && err.contains("bfloat16"), "{err}");
}

#[test]
fn no_gpu_means_errors_not_panics() {
    if cuda::device_count() > 0 {
        return; // this test is about machines without a GPU
    }
    assert!(cuda::device_info(0).is_err());
    assert!(cuda::bind_device(0).is_err());
    let err = cuda::load_all_modules(0).unwrap_err();
    assert!(
        matches!(err, Error::CudaUnavailable(_) | Error::InvalidArgument(_)),
        "{err:?}"
    );
}
