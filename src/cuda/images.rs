//! The kernel images compiled by `build.rs`, embedded as bytes: per `kernels/*.cu`, SASS cubins
//! (`sm_80`, `sm_86`, `sm_89`, `sm_90`, assembled by a CUDA 12 ptxas) and PTX (`compute_80`,
//! `compute_90`, ISA 8.4), and the choice of which one a device loads.

use crate::{Error, Result};

/// The images of one module: (target, bytes) pairs.
pub type Images = &'static [(&'static str, &'static [u8])];

include!(concat!(env!("OUT_DIR"), "/images.rs"));

/// The PTX ISA version every embedded PTX declares at most (`"8.4"`: CUDA 12.4 drivers JIT it).
pub const PTX_ISA: &str = BUILD_PTX_ISA;
/// The oldest driver's CUDA version the embedded images load on (PTX ISA 8.4 is CUDA 12.4's).
pub const DRIVER_FLOOR_CUDA: &str = "12.4";
/// The ptxas release that assembled the cubins (e.g. `"12.4"`), empty without kernels.
pub const PTXAS_RELEASE: &str = BUILD_PTXAS;

/// How `RSLORA_FAST_KERNEL_IMAGE` asks kernels to be loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The device's SASS when shipped, else PTX (the default).
    Auto,
    /// PTX only, JIT-compiled by the driver (to test that path on a GPU we ship SASS for).
    Ptx,
    /// No kernels: every op runs its plain-torch path.
    Off,
}

/// The mode from `RSLORA_FAST_KERNEL_IMAGE` (`auto`, `ptx`, `off`; unset means `auto`).
pub fn mode() -> Result<Mode> {
    match std::env::var("RSLORA_FAST_KERNEL_IMAGE").as_deref() {
        Err(_) | Ok("") | Ok("auto") => Ok(Mode::Auto),
        Ok("ptx") => Ok(Mode::Ptx),
        Ok("off") => Ok(Mode::Off),
        Ok(other) => Err(Error::invalid(format!(
            "RSLORA_FAST_KERNEL_IMAGE={other:?} is not understood; expected auto, ptx or off"
        ))),
    }
}

/// `(8, 6)` from `"sm_86"` or `"compute_86"`.
pub fn target_capability(target: &str) -> Option<(i32, i32)> {
    let digits = target
        .strip_prefix("sm_")
        .or_else(|| target.strip_prefix("compute_"))?;
    let n: i32 = digits.parse().ok()?;
    Some((n / 10, n % 10))
}

/// Every (target, image) of `kernels/<module>.cu`.
pub fn module_images(module: &str) -> Result<Images> {
    if IMAGES.is_empty() {
        return Err(Error::KernelsUnavailable(
            "this build has no CUDA kernels (it was built with RSLORA_FAST_SKIP_KERNELS=1); \
             rebuild with nvcc available (see README)"
                .into(),
        ));
    }
    IMAGES
        .iter()
        .find(|(name, _)| *name == module)
        .map(|(_, images)| *images)
        .ok_or_else(|| Error::KernelsUnavailable(format!("no kernel module named {module}")))
}

/// The images a device of compute capability `cc` can load, best first: SASS of the same major
/// and the highest minor not above the device's (SASS runs on later minors of its major), then
/// the PTX of the highest capability not above the device's (the driver JIT-compiles it).
pub fn candidates(
    module: &str,
    cc: (i32, i32),
    mode: Mode,
) -> Result<Vec<(&'static str, &'static [u8])>> {
    let images = module_images(module)?;
    let best = |prefix: &str, fits: &dyn Fn((i32, i32)) -> bool| {
        images
            .iter()
            .filter(|(t, _)| t.starts_with(prefix))
            .filter_map(|&(t, b)| Some((target_capability(t)?, t, b)))
            .filter(|(c, _, _)| fits(*c))
            .max_by_key(|(c, _, _)| *c)
            .map(|(_, t, b)| (t, b))
    };
    let mut out = Vec::new();
    if mode == Mode::Auto {
        out.extend(best("sm_", &|c| c.0 == cc.0 && c.1 <= cc.1));
    }
    if mode != Mode::Off {
        out.extend(best("compute_", &|c| c <= cc));
    }
    Ok(out)
}

/// Every target shipped, e.g. `"sm_80,sm_86,sm_89,sm_90,compute_80,compute_90"`.
pub fn targets() -> String {
    let mut sass: Vec<&str> = Vec::new();
    let mut ptx: Vec<&str> = Vec::new();
    for (t, _) in IMAGES.first().map(|(_, i)| *i).unwrap_or(&[]) {
        if t.starts_with("sm_") {
            sass.push(t);
        } else {
            ptx.push(t);
        }
    }
    sass.extend(ptx);
    sass.join(",")
}
