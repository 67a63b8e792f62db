//! NF4 / FP4 blockwise quantization, byte-compatible with bitsandbytes (format: docs/formats.md).
//!
//! - [`codebook`]: the NF4 and FP4 tables, the signed 8-bit dynamic map, and bitsandbytes'
//!   exact encoders for each.
//! - [`blockwise`]: multi-threaded CPU quantize / dequantize and double quantization.
//! - [`state`]: `QuantState` (the `quant_state` JSON), the key layout, `QuantizedTensor`.
//!
//! Nothing here knows Python or CUDA; GPU copies of the bytes are torch tensors and the kernels
//! live in `kernels/nf4.cu`.

pub mod blockwise;
pub mod codebook;
pub mod state;

pub use blockwise::{
    check_blocksize, dequant_scales, dequantize_4bit, double_quant, double_quant_into,
    double_quant_with_offset, num_blocks, packed_len, quantize_4bit, NestedScales,
    NESTED_BLOCKSIZE,
};
pub use codebook::{dynamic_map, QuantType, FP4, NF4};
pub use state::{bnb_key_suffixes, python_float_repr, QuantState, QuantizedTensor, Scales};
