//! NF4 / FP4 blockwise quantization, byte-compatible with bitsandbytes (see shared/reference.md §1).
