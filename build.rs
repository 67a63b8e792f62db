//! Compiles every `kernels/*.cu` into images that load on every driver from CUDA 12.4 (driver
//! 550) on, and generates `images.rs`, which embeds them (docs/gpu.md, "Which drivers").
//!
//! 1. nvcc (any recent toolkit, 13.0 in CI) turns each file into PTX for `compute_80` and
//!    `compute_90`.
//! 2. The PTX's `.version` line is lowered to ISA 8.4 (CUDA 12.4) when nvcc wrote a newer one.
//! 3. ptxas of a CUDA 12.4-12.9 toolkit assembles that PTX into SASS for sm_80, sm_86, sm_89 and
//!    sm_90. ptxas rejects any instruction or directive that ISA 8.4 lacks, so step 2 is checked
//!    here, on every build; its cubins load on every 12.x and 13.x driver.
//!
//! Both the cubins and the PTX are embedded: the loader picks the device's SASS, or JIT-compiles
//! the PTX on GPUs newer than sm_90. The ptxas resource report (registers, spills) of each file is
//! printed into the build log and kept in OUT_DIR.
//!
//! nvcc comes from `$CUDA_HOME/bin`, `$CUDA_PATH/bin` or `PATH`; ptxas from `RSLORA_FAST_PTXAS`,
//! `.cuda-ptxas/nvidia/cuda_nvcc/bin`, the sibling `cuda_nvcc` of `$CUDA_HOME` (PyPI layout)
//! or nvcc's own directory, the first of release 12.4-12.9. Without them the build stops, unless
//! `RSLORA_FAST_SKIP_KERNELS=1` asks for a CPU-only build (the kernels then report themselves
//! unavailable at run time).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The PTX we emit, one per compute capability (nvcc `-arch`).
const PTX_TARGETS: &[&str] = &["compute_80", "compute_90"];
/// SASS we ship: (cubin target, the PTX it is assembled from).
const SASS_TARGETS: &[(&str, &str)] = &[
    ("sm_80", "compute_80"),
    ("sm_86", "compute_80"),
    ("sm_89", "compute_80"),
    ("sm_90", "compute_90"),
];
/// The PTX ISA of CUDA 12.4, the oldest driver we support (docs/gpu.md).
const PTX_ISA_FLOOR: (u32, u32) = (8, 4);
/// ptxas releases (12.x) whose cubins load on every CUDA 12.x driver and that accept ISA 8.4.
const PTXAS_MINORS: std::ops::RangeInclusive<u32> = 4..=9;
const PTXAS_PIP: &str =
    "python3 -m pip install --no-deps --target .cuda-ptxas nvidia-cuda-nvcc-cu12==12.4.131";

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

/// `(12, 4)` from ptxas' `--version` ("... release 12.4, V12.4.131").
fn ptxas_release(ptxas: &Path) -> Option<(u32, u32)> {
    let out = Command::new(ptxas).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rel = text.split("release ").nth(1)?.split(',').next()?;
    let (major, minor) = rel.trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The first ptxas of release 12.4-12.9 among the candidates, or every candidate seen.
fn find_floor_ptxas(nvcc: &Path) -> Result<PathBuf, Vec<String>> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(p) = env::var("RSLORA_FAST_PTXAS") {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(PathBuf::from(".cuda-ptxas/nvidia/cuda_nvcc/bin/ptxas"));
    if let Some(bin) = nvcc.parent() {
        // PyPI layout: .../nvidia/cu13/bin/nvcc beside .../nvidia/cuda_nvcc/bin/ptxas
        candidates.push(bin.join("../../cuda_nvcc/bin/ptxas"));
        candidates.push(bin.join("ptxas"));
    }
    let mut seen = Vec::new();
    for p in candidates.into_iter().filter(|p| p.is_file()) {
        match ptxas_release(&p) {
            Some((12, m)) if PTXAS_MINORS.contains(&m) => return Ok(p),
            rel => seen.push(format!("{} (release {rel:?})", p.display())),
        }
    }
    Err(seen)
}

/// PTX with its `.version` lowered to the floor when it is newer (ptxas then checks the result).
fn lower_ptx_version(ptx: &str, file: &str) -> String {
    let mut lines: Vec<String> = Vec::new();
    let mut found = 0;
    for line in ptx.lines() {
        if let Some(v) = line.trim().strip_prefix(".version ") {
            found += 1;
            let (a, b) = v
                .trim()
                .split_once('.')
                .expect("PTX .version is major.minor");
            let have = (a.parse::<u32>().unwrap(), b.parse::<u32>().unwrap());
            if have > PTX_ISA_FLOOR {
                lines.push(format!(".version {}.{}", PTX_ISA_FLOOR.0, PTX_ISA_FLOOR.1));
                continue;
            }
        }
        lines.push(line.to_string());
    }
    assert_eq!(found, 1, "{file}: expected one .version line in the PTX");
    lines.join("\n") + "\n"
}

/// Run a compiler; its stderr (the ptxas report) on success, a panic with it on failure.
fn run(cmd: &mut Command, what: &str) -> String {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {what}: {e}"));
    let report = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        eprintln!("{report}");
        panic!("{what} failed");
    }
    report
}

/// Compile one `.cu` into its PTX and cubins in `out`; returns the (target, file name) pairs.
fn compile(src: &Path, nvcc: &Path, ptxas: &Path, out: &Path) -> Vec<(String, String)> {
    let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
    let extra: Vec<String> = env::var("RSLORA_FAST_NVCC_FLAGS")
        .map(|s| s.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let mut images = Vec::new();
    let mut report = String::new();
    for ptx_target in PTX_TARGETS {
        let raw = out.join(format!("{stem}.{ptx_target}.nvcc.ptx"));
        run(
            Command::new(nvcc)
                .args(["-ptx", "-O3", "-std=c++17", "-lineinfo"])
                .arg(format!("-arch={ptx_target}"))
                .args(&extra)
                .arg("-I")
                .arg("kernels")
                .arg("-o")
                .arg(&raw)
                .arg(src),
            &format!("nvcc on {}", src.display()),
        );
        let ptx = lower_ptx_version(&fs::read_to_string(&raw).unwrap(), &stem);
        let ptx_file = format!("{stem}.{ptx_target}.ptx");
        fs::write(out.join(&ptx_file), ptx).expect("write ptx");
        images.push((ptx_target.to_string(), ptx_file.clone()));
        for (sm, _) in SASS_TARGETS.iter().filter(|(_, from)| from == ptx_target) {
            let cubin = format!("{stem}.{sm}.cubin");
            report += &run(
                Command::new(ptxas)
                    .args(["-O3", "-v", "-lineinfo"])
                    .arg(format!("-arch={sm}"))
                    .arg("-o")
                    .arg(out.join(&cubin))
                    .arg(out.join(&ptx_file)),
                &format!("ptxas -arch={sm} on {ptx_file}"),
            );
            images.push((sm.to_string(), cubin));
        }
    }
    fs::write(out.join(format!("{stem}.ptxas.log")), report.as_bytes()).ok();
    // Keep the resource report in the build log (cargo shows it with -vv; it is also in
    // target/*/build/rslora_fast-*/output).
    for line in report.lines() {
        println!("ptxas[{stem}]: {line}");
    }
    images
}

type Module = (String, Vec<(String, String)>);

fn write_table(out: &Path, modules: &[Module], ptxas: &str) {
    let mut t = String::from(
        "/// (module, [(target, image)]) for every kernels/*.cu: cubins `sm_XY`, PTX `compute_XY`.\n",
    );
    t.push_str("pub static IMAGES: &[(&str, Images)] = &[\n");
    for (stem, images) in modules {
        t.push_str(&format!("    (\"{stem}\", &[\n"));
        for (target, file) in images {
            t.push_str(&format!(
                "        (\"{target}\", include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{file}\"))),\n"
            ));
        }
        t.push_str("    ]),\n");
    }
    t.push_str("];\n");
    let (a, b) = PTX_ISA_FLOOR;
    t.push_str(&format!("const BUILD_PTX_ISA: &str = \"{a}.{b}\";\n"));
    t.push_str(&format!("const BUILD_PTXAS: &str = \"{ptxas}\";\n"));
    fs::write(out.join("images.rs"), t).expect("write images.rs");
}

fn main() {
    for var in [
        "CUDA_HOME",
        "CUDA_PATH",
        "RSLORA_FAST_SKIP_KERNELS",
        "RSLORA_FAST_NVCC_FLAGS",
        "RSLORA_FAST_PTXAS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-changed=kernels");
    let mut sources: Vec<PathBuf> = fs::read_dir("kernels")
        .expect("kernels/ directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")))
        .collect();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    sources.retain(|p| p.extension().and_then(|e| e.to_str()) == Some("cu"));

    if env::var("RSLORA_FAST_SKIP_KERNELS").as_deref() == Ok("1") {
        println!("cargo:warning=RSLORA_FAST_SKIP_KERNELS=1: building without CUDA kernels");
        write_table(&out, &[], "");
        return;
    }
    let Some(nvcc) = find_nvcc() else {
        eprintln!(
            "\nerror: nvcc not found. rslora_fast compiles its CUDA kernels at build time.\n\
             Install a CUDA toolkit (12.4 or newer) and set CUDA_HOME, or install the pinned PyPI\n\
             toolkit the CI uses:\n  python3 -m pip install --no-deps --target .cuda-toolkit \
             nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
             nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85\n  {PTXAS_PIP}\n  \
             export CUDA_HOME=$PWD/.cuda-toolkit/nvidia/cu13\n\
             (or set RSLORA_FAST_SKIP_KERNELS=1 for a CPU-only development build).\n"
        );
        std::process::exit(1);
    };
    let ptxas = find_floor_ptxas(&nvcc).unwrap_or_else(|seen| {
        eprintln!(
            "\nerror: no ptxas of CUDA 12.4-12.9 found (seen: {seen:?}). The kernels' SASS is \
             assembled by a CUDA 12 ptxas so that it loads on CUDA 12.4+ drivers. Install it with\n  \
             {PTXAS_PIP}\nor point RSLORA_FAST_PTXAS at one.\n"
        );
        std::process::exit(1);
    });
    println!("cargo:rerun-if-changed={}", ptxas.display());
    let (pa, pb) = ptxas_release(&ptxas).unwrap();
    // One thread per file: nvcc and ptxas are single-threaded.
    let modules: Vec<Module> = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| s.spawn(|| compile(src, &nvcc, &ptxas, &out)))
            .collect();
        sources
            .iter()
            .zip(handles)
            .map(|(src, h)| {
                let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
                (stem, h.join().expect("kernel compile thread"))
            })
            .collect()
    });
    write_table(&out, &modules, &format!("{pa}.{pb}"));
}
