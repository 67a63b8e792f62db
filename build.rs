//! Compiles every `kernels/*.cu` with nvcc into a fatbin (SASS sm_80 + sm_90, PTX compute_90 so
//! newer GPUs can JIT) and generates `fatbins.rs`, which embeds them. The ptxas resource report
//! (registers, spills) of each file is printed into the build log and kept in OUT_DIR.
//!
//! nvcc comes from `$CUDA_HOME/bin`, `$CUDA_PATH/bin` or `PATH`. Without it the build stops,
//! unless `RSLORA_FAST_SKIP_KERNELS=1` asks for a CPU-only build (the kernels then report
//! themselves unavailable at run time).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_GENCODE: &[&str] = &[
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=[sm_90,compute_90]",
];
const DEFAULT_ARCHS: &str = "sm_80,sm_90,compute_90";

fn find_nvcc() -> Option<PathBuf> {
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = env::var(var) {
            let p = Path::new(&home).join("bin").join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join("nvcc"))
        .find(|p| p.is_file())
}

fn main() {
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    println!("cargo:rerun-if-env-changed=RSLORA_FAST_SKIP_KERNELS");
    println!("cargo:rerun-if-env-changed=RSLORA_FAST_NVCC_FLAGS");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let kdir = Path::new("kernels");
    println!("cargo:rerun-if-changed=kernels");

    let mut sources: Vec<PathBuf> = fs::read_dir(kdir)
        .expect("kernels/ directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("cu") | Some("cuh")
            )
        })
        .collect();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    let cu: Vec<&PathBuf> = sources
        .iter()
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("cu"))
        .collect();

    let skip = env::var("RSLORA_FAST_SKIP_KERNELS")
        .map(|v| v == "1")
        .unwrap_or(false);
    let mut table = String::from("/// (module name, fatbin bytes) for every kernels/*.cu.\n");
    if skip {
        println!("cargo:warning=RSLORA_FAST_SKIP_KERNELS=1: building without CUDA kernels");
        table.push_str("pub static FATBINS: &[(&str, &[u8])] = &[];\n");
        table.push_str("const KERNEL_ARCHS: &str = \"\";\n");
        fs::write(out.join("fatbins.rs"), table).expect("write fatbins.rs");
        return;
    }

    let Some(nvcc) = find_nvcc() else {
        eprintln!(
            "\nerror: nvcc not found. rslora_fast compiles its CUDA kernels at build time.\n\
             Install a CUDA toolkit (12.x or 13.0) and set CUDA_HOME, or install the pinned PyPI\n\
             toolkit the CI uses:\n  python3 -m pip install --target .cuda-toolkit \
             nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
             nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85\n  \
             export CUDA_HOME=$PWD/.cuda-toolkit/nvidia/cu13\n\
             (or set RSLORA_FAST_SKIP_KERNELS=1 for a CPU-only development build).\n"
        );
        std::process::exit(1);
    };

    let extra: Vec<String> = env::var("RSLORA_FAST_NVCC_FLAGS")
        .map(|s| s.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    table.push_str("pub static FATBINS: &[(&str, &[u8])] = &[\n");
    for src in cu {
        let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
        let dst = out.join(format!("{stem}.fatbin"));
        let output = Command::new(&nvcc)
            .args(["--fatbin", "-O3", "-std=c++17", "-lineinfo", "-Xptxas=-v"])
            .args(DEFAULT_GENCODE)
            .args(&extra)
            .arg("-I")
            .arg(kdir)
            .arg("-o")
            .arg(&dst)
            .arg(src)
            .output()
            .unwrap_or_else(|e| panic!("could not run {}: {e}", nvcc.display()));
        let report = String::from_utf8_lossy(&output.stderr);
        fs::write(out.join(format!("{stem}.ptxas.log")), report.as_bytes()).ok();
        // Keep the resource report in the build log (cargo shows it with -vv; it is also in
        // target/*/build/rslora_fast-*/output).
        for line in report.lines() {
            println!("ptxas[{stem}]: {line}");
        }
        if !output.status.success() {
            eprintln!("{report}");
            panic!("nvcc failed on {}", src.display());
        }
        table.push_str(&format!(
            "    (\"{stem}\", include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{stem}.fatbin\"))),\n"
        ));
    }
    table.push_str("];\n");
    table.push_str(&format!(
        "const KERNEL_ARCHS: &str = \"{DEFAULT_ARCHS}\";\n"
    ));
    fs::write(out.join("fatbins.rs"), table).expect("write fatbins.rs");
}
