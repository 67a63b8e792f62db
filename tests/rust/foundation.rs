//! CPU-side checks of the foundation: the embedded kernels, dtype parsing, and graceful behaviour
//! without a GPU (no panic, a clear error).

use rslora_fast::cuda;
use rslora_fast::cuda::images;
use rslora_fast::kernels::DType;
use rslora_fast::Error;

const SHIPPED: [&str; 6] = [
    "sm_80",
    "sm_86",
    "sm_89",
    "sm_90",
    "compute_80",
    "compute_90",
];

#[test]
fn every_kernel_file_is_embedded_for_every_target() {
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
        let images = images::module_images(name).unwrap();
        let targets: Vec<&str> = images.iter().map(|(t, _)| *t).collect();
        assert_eq!(targets.len(), SHIPPED.len(), "{name}: {targets:?}");
        for t in SHIPPED {
            assert!(targets.contains(&t), "{name} lacks {t}: {targets:?}");
        }
        for (target, image) in images {
            if target.starts_with("sm_") {
                assert_eq!(&image[..4], b"\x7fELF", "{name} {target} is not a cubin");
            }
        }
    }
}

/// The `.version` line of a PTX text as (major, minor).
fn ptx_version(ptx: &str) -> (u32, u32) {
    let lines: Vec<&str> = ptx
        .lines()
        .filter_map(|l| l.trim().strip_prefix(".version "))
        .collect();
    assert_eq!(lines.len(), 1, "one .version line expected");
    let (a, b) = lines[0].trim().split_once('.').unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

#[test]
fn shipped_ptx_loads_on_cuda_12_4_drivers() {
    // A CUDA 12.4 driver (550) JIT-compiles PTX up to ISA 8.4 and rejects newer (error 222).
    for name in cuda::kernel_modules() {
        for (target, image) in images::module_images(name).unwrap() {
            if let Some(cap) = target.strip_prefix("compute_") {
                let ptx = std::str::from_utf8(image).expect("PTX is text");
                assert!(
                    ptx_version(ptx) <= (8, 4),
                    "{name} {target}: {:?}",
                    ptx_version(ptx)
                );
                assert!(
                    ptx.lines().any(|l| l.trim() == format!(".target sm_{cap}")),
                    "{name} {target}: wrong .target"
                );
            }
        }
    }
    assert_eq!(images::PTX_ISA, "8.4");
}

#[test]
fn each_device_gets_its_sass_else_ptx() {
    if cuda::kernel_modules().is_empty() {
        return;
    }
    let pick = |cc, mode| -> Vec<&str> {
        images::candidates("swiglu", cc, mode)
            .unwrap()
            .iter()
            .map(|(t, _)| *t)
            .collect()
    };
    use images::Mode::{Auto, Off, Ptx};
    assert_eq!(pick((8, 0), Auto), ["sm_80", "compute_80"]);
    assert_eq!(pick((8, 6), Auto), ["sm_86", "compute_80"]);
    assert_eq!(pick((8, 7), Auto), ["sm_86", "compute_80"]); // Orin: sm_86 SASS runs on 8.7
    assert_eq!(pick((8, 9), Auto), ["sm_89", "compute_80"]);
    assert_eq!(pick((9, 0), Auto), ["sm_90", "compute_90"]);
    assert_eq!(pick((10, 0), Auto), ["compute_90"]); // Blackwell: the driver JITs our PTX
    assert_eq!(pick((12, 0), Auto), ["compute_90"]);
    assert!(pick((7, 5), Auto).is_empty()); // Turing: nothing fits
    assert_eq!(pick((9, 0), Ptx), ["compute_90"]);
    assert!(pick((9, 0), Off).is_empty());
}

#[test]
fn unknown_module_is_a_clear_error() {
    match images::module_images("no_such_kernel") {
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
