//! rslora_fast core: NF4 quantized storage (`quant`), the activation-offload scheduler
//! (`offload`), the CUDA bridge (`cuda`) and typed kernel launchers (`kernels`).
//!
//! The PyO3 bindings live in `python` behind the `python` feature, so `cargo test` and
//! `cargo bench` need neither Python nor a GPU.

pub mod args;
pub mod cuda;
pub mod error;
pub mod kernels;
pub mod offload;
pub mod quant;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
