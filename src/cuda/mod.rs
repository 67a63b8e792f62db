//! The GPU bridge: the primary context of a device (the one PyTorch uses), the embedded kernel
//! modules (loaded once per device: the device's SASS, else PTX the driver JIT-compiles; see
//! `images`), raw-stream launches and events.
//!
//! Rules we keep: never create or destroy a context, never own PyTorch's stream or
//! memory (streams and pointers arrive as plain integers), check every driver call. We use cudarc's
//! `sys` layer because its safe types would take ownership of what PyTorch owns.

use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::hash::Hash;
use std::sync::{Mutex, OnceLock};

use cudarc::driver::sys;

use crate::{Error, Result};

pub mod images;

/// A CUDA stream handle borrowed from PyTorch (`torch.cuda.current_stream().cuda_stream`).
/// `0` is the legacy default stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawStream(pub usize);

impl RawStream {
    fn as_sys(self) -> sys::CUstream {
        self.0 as sys::CUstream
    }
}

/// Turn a driver result into our error, naming the operation.
pub fn check(res: sys::CUresult, context: &str) -> Result<()> {
    if res == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    Err(Error::Cuda {
        context: context.to_string(),
        code: res as i32,
        message: error_text(res),
    })
}

fn error_text(res: sys::CUresult) -> String {
    let mut name: *const std::ffi::c_char = std::ptr::null();
    let mut text: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: the driver writes pointers to static strings (or leaves them null on failure).
    unsafe {
        sys::cuGetErrorName(res, &mut name);
        sys::cuGetErrorString(res, &mut text);
    }
    let read = |p: *const std::ffi::c_char| {
        if p.is_null() {
            None
        } else {
            // SAFETY: non-null pointers from the driver are NUL-terminated static strings.
            Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        }
    };
    match (read(name), read(text)) {
        (Some(n), Some(t)) => format!("{n}: {t}"),
        (Some(n), None) => n,
        _ => format!("unknown CUDA error {}", res as i32),
    }
}

/// Load the driver library and run `cuInit` once per process.
pub fn init() -> Result<()> {
    static INIT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        // SAFETY: only checks whether libcuda can be opened.
        if !unsafe { sys::is_culib_present() } {
            return Err("libcuda.so could not be loaded (no NVIDIA driver on this machine)".into());
        }
        // SAFETY: cuInit has no preconditions; it is idempotent.
        check(unsafe { sys::cuInit(0) }, "cuInit").map_err(|e| e.to_string())
    })
    .clone()
    .map_err(Error::CudaUnavailable)
}

/// Number of CUDA devices, or 0 when there is no driver.
pub fn device_count() -> i32 {
    if init().is_err() {
        return 0;
    }
    let mut n = 0;
    // SAFETY: writes one int.
    match check(unsafe { sys::cuDeviceGetCount(&mut n) }, "cuDeviceGetCount") {
        Ok(()) => n,
        Err(_) => 0,
    }
}

/// The driver's CUDA version as `major * 1000 + minor * 10` (e.g. 13000).
pub fn driver_version() -> Result<i32> {
    init()?;
    let mut v = 0;
    // SAFETY: writes one int.
    check(
        unsafe { sys::cuDriverGetVersion(&mut v) },
        "cuDriverGetVersion",
    )?;
    Ok(v)
}

fn device_handle(ordinal: i32) -> Result<sys::CUdevice> {
    init()?;
    let n = device_count();
    if ordinal < 0 || ordinal >= n {
        return Err(Error::invalid(format!(
            "CUDA device index {ordinal} out of range: this machine has {n} device(s)"
        )));
    }
    let mut dev: sys::CUdevice = 0;
    // SAFETY: ordinal was range-checked; writes one handle.
    check(
        unsafe { sys::cuDeviceGet(&mut dev, ordinal) },
        "cuDeviceGet",
    )?;
    Ok(dev)
}

/// Name and compute capability of a device.
pub fn device_info(ordinal: i32) -> Result<(String, i32, i32)> {
    let dev = device_handle(ordinal)?;
    let mut buf = [0 as std::ffi::c_char; 256];
    // SAFETY: the buffer holds 256 bytes and the driver NUL-terminates within `len`.
    check(
        unsafe { sys::cuDeviceGetName(buf.as_mut_ptr(), buf.len() as i32, dev) },
        "cuDeviceGetName",
    )?;
    // SAFETY: NUL-terminated by the driver.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let attr = |a: sys::CUdevice_attribute| -> Result<i32> {
        let mut v = 0;
        // SAFETY: writes one int for a valid device and attribute.
        check(
            unsafe { sys::cuDeviceGetAttribute(&mut v, a, dev) },
            "cuDeviceGetAttribute",
        )?;
        Ok(v)
    };
    let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    Ok((name, major, minor))
}

/// Primary contexts we retained, by device ordinal. Retained once and kept for the life of the
/// process (PyTorch does the same), so we never destroy what PyTorch is using.
fn primary_contexts() -> &'static Mutex<HashMap<i32, usize>> {
    static CTX: OnceLock<Mutex<HashMap<i32, usize>>> = OnceLock::new();
    CTX.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Restores the thread's previous CUDA context when dropped (see [`bind_device`]).
#[must_use = "the previous context is restored when the guard is dropped"]
pub struct ContextGuard {
    previous: Option<usize>,
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        if let Some(prev) = self.previous.take() {
            // SAFETY: `prev` was the thread's current context (possibly null) when we switched.
            // A failure can only mean that context is gone; there is nothing better to restore.
            let _ = unsafe { sys::cuCtxSetCurrent(prev as sys::CUcontext) };
        }
    }
}

/// Make the primary context of `ordinal` current on this thread until the returned guard drops.
///
/// The CUDA runtime (and so `torch.cuda.current_device()`) follows the driver's current context,
/// so a launch on another device than torch's current one must not leave its context behind.
/// When the context is already current (the usual case) nothing is switched.
pub fn bind_device(ordinal: i32) -> Result<ContextGuard> {
    let ctx = {
        let mut map = primary_contexts()
            .lock()
            .map_err(|_| Error::invalid("context table poisoned"))?;
        match map.get(&ordinal) {
            Some(&c) => c,
            None => {
                let dev = device_handle(ordinal)?;
                let mut ctx: sys::CUcontext = std::ptr::null_mut();
                // SAFETY: retains (never creates anew) the device's primary context.
                check(
                    unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) },
                    "cuDevicePrimaryCtxRetain",
                )?;
                map.insert(ordinal, ctx as usize);
                ctx as usize
            }
        }
    };
    let mut current: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: writes one context handle (null when the thread has none).
    check(
        unsafe { sys::cuCtxGetCurrent(&mut current) },
        "cuCtxGetCurrent",
    )?;
    if current as usize == ctx {
        return Ok(ContextGuard { previous: None });
    }
    // SAFETY: `ctx` is a retained primary context, valid for the life of the process.
    check(
        unsafe { sys::cuCtxSetCurrent(ctx as sys::CUcontext) },
        "cuCtxSetCurrent",
    )?;
    Ok(ContextGuard {
        previous: Some(current as usize),
    })
}

/// A new stream of the current context that never waits for the legacy default stream
/// (`CU_STREAM_NON_BLOCKING`, so it does not serialize with PyTorch's streams either). The caller
/// owns it and destroys it (`cuStreamDestroy`); `context` names the call in the error.
pub fn create_stream(context: &str) -> Result<sys::CUstream> {
    let mut stream: sys::CUstream = std::ptr::null_mut();
    // SAFETY: writes one stream handle; without a current context the driver reports an error.
    check(
        unsafe {
            sys::cuStreamCreate(
                &mut stream,
                sys::CUstream_flags_enum::CU_STREAM_NON_BLOCKING as u32,
            )
        },
        context,
    )?;
    Ok(stream)
}

/// The value `table` holds for `key`, else the one `make` returns, then kept there. The lock is
/// not held while `make` runs (it may fill other tables); `poisoned` is the error when an earlier
/// panic poisoned the lock.
fn cached<K: Eq + Hash, V: Copy>(
    table: &Mutex<HashMap<K, V>>,
    key: K,
    poisoned: &'static str,
    make: impl FnOnce() -> Result<V>,
) -> Result<V> {
    let lock = || table.lock().map_err(|_| Error::invalid(poisoned));
    if let Some(&v) = lock()?.get(&key) {
        return Ok(v);
    }
    let v = make()?;
    lock()?.insert(key, v);
    Ok(v)
}

/// A loaded kernel function handle, cached per (device, kernel).
#[derive(Clone, Copy)]
struct Function(usize);

fn function_cache() -> &'static Mutex<HashMap<(i32, &'static str), Function>> {
    static F: OnceLock<Mutex<HashMap<(i32, &'static str), Function>>> = OnceLock::new();
    F.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Loaded modules by (device, module): the module handle and the image target it came from.
type ModuleTable = Mutex<HashMap<(i32, &'static str), (usize, &'static str)>>;

fn module_cache() -> &'static ModuleTable {
    static M: OnceLock<ModuleTable> = OnceLock::new();
    M.get_or_init(|| Mutex::new(HashMap::new()))
}

/// `cuModuleLoadData` of one embedded image (a cubin, or PTX text that the driver JIT-compiles).
fn load_image(image: &[u8]) -> std::result::Result<sys::CUmodule, Error> {
    // The driver wants the image aligned (`include_bytes!` gives no alignment guarantee) and PTX
    // NUL-terminated: copy into zeroed u64 words with at least one spare byte.
    let mut aligned = vec![0u64; (image.len() + 1).div_ceil(8)];
    // SAFETY: `aligned` has more than `image.len()` bytes; the regions do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(image.as_ptr(), aligned.as_mut_ptr() as *mut u8, image.len())
    };
    let mut m: sys::CUmodule = std::ptr::null_mut();
    // SAFETY: a context is current (bind_device); the image is a cubin or NUL-terminated PTX.
    check(
        unsafe { sys::cuModuleLoadData(&mut m, aligned.as_ptr() as *const c_void) },
        "cuModuleLoadData",
    )?;
    Ok(m)
}

/// Load (once per device) the module compiled from `kernels/<module>.cu`, trying the device's
/// images best first; the error names every image tried, the driver and what to do.
fn load_module(ordinal: i32, module: &'static str) -> Result<sys::CUmodule> {
    let mut cache = module_cache()
        .lock()
        .map_err(|_| Error::invalid("module table poisoned"))?;
    if let Some(&(m, _)) = cache.get(&(ordinal, module)) {
        return Ok(m as sys::CUmodule);
    }
    let mode = images::mode()?;
    if mode == images::Mode::Off {
        return Err(Error::KernelsUnavailable(
            "turned off by RSLORA_FAST_KERNEL_IMAGE=off".into(),
        ));
    }
    let (_, major, minor) = device_info(ordinal)?;
    let mut tried = Vec::new();
    for (target, image) in images::candidates(module, (major, minor), mode)? {
        match load_image(image) {
            Ok(m) => {
                cache.insert((ordinal, module), (m as usize, target));
                return Ok(m);
            }
            Err(e) => tried.push(format!("{target}: {e}")),
        }
    }
    let driver = driver_version()
        .map(|v| format!("CUDA {}.{}", v / 1000, (v % 1000) / 10))
        .unwrap_or_else(|_| "unknown".into());
    Err(Error::KernelsUnavailable(format!(
        "kernel module {module} does not load on device {ordinal} (sm_{major}{minor}, driver \
         {driver}); tried [{}] of the shipped [{}]. The kernels need compute capability 8.0+ and \
         a driver for CUDA {} or newer (Linux driver 550+): update the NVIDIA driver",
        if tried.is_empty() {
            "none fits".into()
        } else {
            tried.join("; ")
        },
        images::targets(),
        images::DRIVER_FLOOR_CUDA,
    )))
}

fn function(ordinal: i32, module: &'static str, kernel: &'static str) -> Result<sys::CUfunction> {
    let f = cached(
        function_cache(),
        (ordinal, kernel),
        "function table poisoned",
        || {
            let m = load_module(ordinal, module)?;
            let cname = CString::new(kernel).map_err(|_| Error::invalid("kernel name has NUL"))?;
            let mut f: sys::CUfunction = std::ptr::null_mut();
            // SAFETY: `m` is a loaded module; `cname` is NUL-terminated.
            check(
                unsafe { sys::cuModuleGetFunction(&mut f, m, cname.as_ptr()) },
                &format!("cuModuleGetFunction({kernel})"),
            )?;
            Ok(Function(f as usize))
        },
    )?;
    Ok(f.0 as sys::CUfunction)
}

/// Grid / block shape and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

impl LaunchConfig {
    /// A 1-D launch of `blocks` blocks of `threads` threads.
    pub fn linear(blocks: u32, threads: u32) -> Self {
        LaunchConfig {
            grid: (blocks.max(1), 1, 1),
            block: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Launch `kernel` from `kernels/<module>.cu` on a borrowed stream of device `ordinal`.
///
/// # Safety
/// `args` must point to values whose types and count match the kernel's parameters exactly, and
/// every device pointer among them must be valid for the accesses the kernel makes on `ordinal`.
pub unsafe fn launch(
    ordinal: i32,
    stream: RawStream,
    module: &'static str,
    kernel: &'static str,
    cfg: LaunchConfig,
    args: &mut [*mut c_void],
) -> Result<()> {
    let _ctx = bind_device(ordinal)?;
    let f = function(ordinal, module, kernel)?;
    // SAFETY: the caller guarantees `args` matches the kernel signature; the stream is borrowed.
    let res = unsafe {
        sys::cuLaunchKernel(
            f,
            cfg.grid.0,
            cfg.grid.1,
            cfg.grid.2,
            cfg.block.0,
            cfg.block.1,
            cfg.block.2,
            cfg.shared_mem_bytes,
            stream.as_sys(),
            args.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    };
    check(res, &format!("launch of kernel {kernel}"))
}

/// Number of streaming multiprocessors of a device (for grid sizing), cached.
pub fn sm_count(ordinal: i32) -> Result<u32> {
    static SMS: OnceLock<Mutex<HashMap<i32, u32>>> = OnceLock::new();
    let map = SMS.get_or_init(|| Mutex::new(HashMap::new()));
    cached(map, ordinal, "poisoned", || {
        let dev = device_handle(ordinal)?;
        let mut v = 0;
        // SAFETY: writes one int.
        check(
            unsafe {
                sys::cuDeviceGetAttribute(
                    &mut v,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                    dev,
                )
            },
            "cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)",
        )?;
        Ok(v.max(1) as u32)
    })
}

/// Blocks of `threads` threads that can be resident at once on the whole device for `kernel`
/// (SM count x occupancy), cached. Grid-stride kernels launched with exactly this many blocks run
/// in one wave, so no partial second wave leaves most SMs idle at the end.
pub fn resident_blocks(
    ordinal: i32,
    module: &'static str,
    kernel: &'static str,
    threads: u32,
) -> Result<u32> {
    type Key = (i32, &'static str, u32);
    static OCC: OnceLock<Mutex<HashMap<Key, u32>>> = OnceLock::new();
    let map = OCC.get_or_init(|| Mutex::new(HashMap::new()));
    cached(map, (ordinal, kernel, threads), "poisoned", || {
        let _ctx = bind_device(ordinal)?;
        let f = function(ordinal, module, kernel)?;
        let mut per_sm = 0;
        // SAFETY: `f` is a loaded function; writes one int.
        check(
            unsafe {
                sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut per_sm, f, threads as i32, 0)
            },
            &format!("cuOccupancyMaxActiveBlocksPerMultiprocessor({kernel})"),
        )?;
        Ok(sm_count(ordinal)? * (per_sm.max(1) as u32))
    })
}

/// Which kernel modules this build carries (for `info`).
pub fn kernel_modules() -> Vec<&'static str> {
    images::IMAGES.iter().map(|(name, _)| *name).collect()
}

/// Load every module on `ordinal` to check the kernels run on this GPU; returns each module with
/// the image target it loaded from (e.g. `("swiglu", "sm_90")`, `"compute_90"` for JIT-ed PTX).
pub fn load_all_modules(ordinal: i32) -> Result<Vec<(&'static str, &'static str)>> {
    let _ctx = bind_device(ordinal)?;
    let mut loaded = Vec::new();
    for (name, _) in images::IMAGES {
        load_module(ordinal, name)?;
        let cache = module_cache()
            .lock()
            .map_err(|_| Error::invalid("module table poisoned"))?;
        loaded.push((*name, cache.get(&(ordinal, *name)).map_or("?", |e| e.1)));
    }
    Ok(loaded)
}
