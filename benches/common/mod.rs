//! What the criterion benches share: the GPU gate (run the `cuda` groups, or say in one line why
//! not), owned driver resources for bench buffers, and the ratio summary printed at the end
//! (criterion prints each bench alone, so "ours against the plain copy" is computed here).
//!
//! Each bench binary includes this module and uses part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::Mutex;
use std::time::Duration;

use cudarc::driver::sys;
use rslora_fast::cuda::{self, check, ContextGuard, RawStream};

/// Why the `cuda` groups cannot run in this process, or `None` when device 0 can be used.
pub fn gpu_unavailable() -> Option<String> {
    if let Err(e) = cuda::init() {
        return Some(e.to_string());
    }
    match cuda::device_count() {
        0 => Some("the driver reports no CUDA device".into()),
        _ => None,
    }
}

/// Print the one line saying a group was skipped, and why.
pub fn skip(group: &str, why: &str) {
    println!("{group}: skipped ({why})");
}

/// Panic with the driver's message when a bench-side driver call fails.
pub fn ok(res: sys::CUresult, what: &str) {
    if let Err(e) = check(res, what) {
        panic!("{e}");
    }
}

/// The primary context of device 0 made current on this (the bench) thread, for as long as the
/// value lives. Criterion runs every bench on the main thread, which otherwise has no context,
/// so the bench's own `cuMemAlloc` / `cuStreamCreate` calls would fail with
/// `CUDA_ERROR_INVALID_CONTEXT`.
pub struct Gpu {
    _ctx: ContextGuard,
}

impl Gpu {
    pub fn bind() -> Gpu {
        let ctx = cuda::bind_device(0).unwrap_or_else(|e| panic!("binding device 0: {e}"));
        Gpu { _ctx: ctx }
    }
}

/// Device memory of `bytes`, freed on drop (the context must still be current then).
pub struct DevBuf {
    pub ptr: sys::CUdeviceptr,
    pub bytes: usize,
}

impl DevBuf {
    pub fn new(bytes: usize) -> DevBuf {
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: a context is current (see `Gpu`); writes one device pointer.
        ok(unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes) }, "cuMemAlloc");
        // SAFETY: `ptr` holds `bytes` bytes; fills them with a non-zero word pattern.
        ok(
            unsafe { sys::cuMemsetD32_v2(ptr, 0x3C00_3C00, bytes / 4) },
            "cuMemsetD32",
        );
        // The memset runs on the legacy stream, which our non-blocking streams do not follow.
        // SAFETY: a context is current.
        ok(unsafe { sys::cuCtxSynchronize() }, "cuCtxSynchronize");
        DevBuf { ptr, bytes }
    }

    /// Device address `offset` bytes in, checked against the size.
    pub fn at(&self, offset: usize, len: usize) -> usize {
        assert!(offset + len <= self.bytes, "bench slice out of range");
        self.ptr as usize + offset
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by us, freed once; every bench synchronizes its streams first.
        unsafe { sys::cuMemFree_v2(self.ptr) };
    }
}

/// Page-locked host memory of `bytes`, freed on drop.
pub struct Pinned {
    pub ptr: *mut c_void,
    pub bytes: usize,
}

impl Pinned {
    pub fn new(bytes: usize) -> Pinned {
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: writes one host pointer; the same flags as the offload pool's blocks.
        ok(
            unsafe { sys::cuMemHostAlloc(&mut ptr, bytes, sys::CU_MEMHOSTALLOC_PORTABLE) },
            "cuMemHostAlloc",
        );
        Pinned { ptr, bytes }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: allocated by us, freed once, after the copies touching it were synchronized.
        unsafe { sys::cuMemFreeHost(self.ptr) };
    }
}

/// A non-blocking stream of our own (the kind the offload transport copies on), destroyed on drop.
pub struct Stream(pub sys::CUstream);

impl Stream {
    pub fn new() -> Stream {
        // A context is current (see `Gpu`).
        let s = cuda::create_stream("cuStreamCreate").unwrap_or_else(|e| panic!("{e}"));
        Stream(s)
    }

    pub fn raw(&self) -> RawStream {
        RawStream(self.0 as usize)
    }

    pub fn sync(&self) {
        // SAFETY: our live stream.
        ok(
            unsafe { sys::cuStreamSynchronize(self.0) },
            "cuStreamSynchronize",
        );
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: our stream, drained before it is destroyed.
        unsafe {
            sys::cuStreamSynchronize(self.0);
            sys::cuStreamDestroy_v2(self.0);
        }
    }
}

/// Bytes per second of every timed call, by bench id (warm-up calls included).
fn rates() -> &'static Mutex<BTreeMap<String, Vec<f64>>> {
    static R: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::new(BTreeMap::new());
    &R
}

/// Record one timed call of bench `id`: `iters` rounds of `bytes` each took `elapsed`.
/// Returns `elapsed`, so an `iter_custom` routine can end with it.
pub fn record(id: &str, bytes: u64, iters: u64, elapsed: Duration) -> Duration {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        let mut r = rates().lock().unwrap_or_else(|p| p.into_inner());
        r.entry(id.to_string())
            .or_default()
            .push((bytes * iters) as f64 / secs);
    }
    elapsed
}

fn median_gib_s(id: &str) -> Option<f64> {
    let r = rates().lock().unwrap_or_else(|p| p.into_inner());
    let mut v = r.get(id)?.clone();
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2] / (1u64 << 30) as f64)
}

/// One line of the summary: `subject` against `baseline` (bench ids), under `label`.
pub struct Pair {
    pub label: String,
    pub subject: String,
    pub baseline: String,
}

/// Whether criterion measures (`cargo bench`), as opposed to running each bench once as a test
/// (`cargo test --benches`, `-- --test`) or listing them: the same rule criterion applies.
fn measuring() -> bool {
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    has("--bench") && !has("--test") && !has("--list")
}

/// Print "label: X GiB/s vs Y GiB/s = ratio" for every pair whose two benches both ran (a
/// filtered run prints only what it measured). Rates are medians over the timed calls. Nothing
/// is printed when criterion only tested the benches (one unmeasured call each).
pub fn print_summary(title: &str, pairs: &[Pair]) {
    if !measuring() {
        return;
    }
    let lines: Vec<String> = pairs
        .iter()
        .filter_map(|p| {
            let s = median_gib_s(&p.subject)?;
            let b = median_gib_s(&p.baseline)?;
            Some(format!(
                "{:<44} {:>8.2} GiB/s  plain {:>8.2} GiB/s  ratio {:.3}",
                p.label,
                s,
                b,
                s / b
            ))
        })
        .collect();
    if lines.is_empty() {
        return;
    }
    println!("\n== {title} (median GiB/s over timed calls; ratio = ours / plain)");
    for l in lines {
        println!("{l}");
    }
}
