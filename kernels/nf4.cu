// NF4 / FP4 blockwise 4-bit dequantization and quantization, byte-compatible with bitsandbytes
// (format: shared/reference.md §1; the CPU twin is src/quant/blockwise.rs).
//
// Dequantize is memory-bound (0.5 B read, 2-4 B written per element): each 16-byte store unit
// (8 or 4 elements, never straddling a quantization block since blocks are >= 32 elements) is
// written by one thread, consecutive units by consecutive threads, with the 16-entry table and, for double quantization,
// the 256-entry nested map in shared memory. The block scale is loaded (and, with double
// quantization, rebuilt) once per unit (cached loads: neighbouring threads share a block).
//
// Float arithmetic uses the _rn intrinsics where bitsandbytes' result depends on a separate
// rounding (a fused multiply-add would change the bytes or the values).
#include "common.cuh"

namespace {

__constant__ float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

__constant__ float kFP4[16] = {
    0.0f, 0.0625f / 12.0f, 8.0f / 12.0f, 12.0f / 12.0f, 4.0f / 12.0f, 6.0f / 12.0f, 2.0f / 12.0f,
    3.0f / 12.0f, -0.0f, -0.0625f / 12.0f, -8.0f / 12.0f, -12.0f / 12.0f, -4.0f / 12.0f,
    -6.0f / 12.0f, -2.0f / 12.0f, -3.0f / 12.0f};

// Ascending order of the FP4 codes (+0 before -0, as bitsandbytes sorts them).
__constant__ unsigned char kFP4Order[16] = {11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3};

constexpr int kThreads = 256;
// Dequantize works in units of one 16-byte output store: 8 elements (4 packed bytes) for 16-bit
// outputs, 4 elements (2 packed bytes) for fp32. Consecutive threads take consecutive units, so a
// warp's loads and stores are each one contiguous span (full 32-byte sectors; a thread writing
// several adjacent vectors instead leaves every store instruction half-coalesced).
// The unrolled loop below takes kUnroll units per trip, loads first. Note what runs today: the
// launcher sizes the grid for 4 units per thread, so with kUnroll = 8 that loop never runs and each
// thread takes the plain grid-stride loop over its units. Measured on the H200 that was faster
// (78.3% of copy, DQ bf16) than the unrolled loop at kUnroll = 4 (76.9%); branch nf4-dq holds a
// redesign (warp-owned blocks, scales by shuffle) to be measured against it.
constexpr int kUnroll = 8;

// Scale of quantization block `b`: float32 absmax, or rebuilt from the nested statistics as
// map[q] * nested[b / 256] + offset (multiply, then add: two roundings like bitsandbytes).
__device__ __forceinline__ float block_scale(int64_t b, const float* __restrict__ absmax,
                                             const uint8_t* __restrict__ absmax_q,
                                             const float* __restrict__ nested,
                                             const float* s_ncode, float offset) {
  if (absmax_q == nullptr) return __ldg(absmax + b);
  float c = s_ncode[__ldg(absmax_q + b)];
  return __fadd_rn(__fmul_rn(c, __ldg(nested + (b >> 8))), offset);
}

template <typename T> struct Unit {
  static constexpr int N = rf::Vec<T>::N;  // elements per unit
  static constexpr int BYTES = N / 2;      // packed bytes per unit
  __device__ static __forceinline__ uint32_t load(const uint8_t* packed, int64_t u) {
    if constexpr (BYTES == 4) return __ldg(reinterpret_cast<const uint32_t*>(packed) + u);
    else return __ldg(reinterpret_cast<const unsigned short*>(packed) + u);
  }
};

// One unit: packed bytes (high nibble first, lowest address in the lowest bits) -> one store.
template <typename T>
__device__ __forceinline__ void emit_unit(T* dst, uint32_t word, float s, const float* code) {
  constexpr int N = Unit<T>::N;
  rf::Vec<T> o;
#pragma unroll
  for (int byte = 0; byte < N / 2; ++byte) {
    const uint32_t b = (word >> (8 * byte)) & 0xFFu;
    o.v[2 * byte] = rf::from_f32<T>(__fmul_rn(code[b >> 4], s));
    o.v[2 * byte + 1] = rf::from_f32<T>(__fmul_rn(code[b & 15u], s));
  }
  rf::store_vec(dst, o);
}

template <typename T>
__device__ void dequant(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                        const uint8_t* __restrict__ absmax_q, const float* __restrict__ nested,
                        const float* __restrict__ nested_code, float offset, int quant_type,
                        T* __restrict__ out, int64_t n, int bs_log2, int vec_ok) {
  __shared__ float s_code[16];
  __shared__ float s_ncode[256];
  if (threadIdx.x < 16) s_code[threadIdx.x] = quant_type == 0 ? kNF4[threadIdx.x] : kFP4[threadIdx.x];
  if (absmax_q != nullptr) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_ncode[i] = nested_code[i];
  }
  __syncthreads();

  constexpr int N = Unit<T>::N;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec_ok) {
    const int64_t units = n / N;
    int64_t u = tid;
    for (; u + (kUnroll - 1) * stride < units; u += kUnroll * stride) {
      uint32_t w[kUnroll];
      float sc[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) w[k] = Unit<T>::load(packed, u + k * stride);
#pragma unroll
      for (int k = 0; k < kUnroll; ++k)
        sc[k] = block_scale(((u + k * stride) * N) >> bs_log2, absmax, absmax_q, nested, s_ncode,
                            offset);
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) emit_unit<T>(out + (u + k * stride) * N, w[k], sc[k], s_code);
    }
    for (; u < units; u += stride) {
      emit_unit<T>(out + u * N, Unit<T>::load(packed, u),
                   block_scale((u * N) >> bs_log2, absmax, absmax_q, nested, s_ncode, offset),
                   s_code);
    }
    done = units * N;
  }
  // Tail (and unaligned buffers): one element per thread.
  for (int64_t i = done + tid; i < n; i += stride) {
    const uint8_t b = packed[i >> 1];
    const int c = (i & 1) ? (b & 15) : (b >> 4);
    const float s = block_scale(i >> bs_log2, absmax, absmax_q, nested, s_ncode, offset);
    out[i] = rf::from_f32<T>(__fmul_rn(s_code[c], s));
  }
}

// Midpoint encoder of a value already clamped to [-1, 1]: count of sorted-code midpoints strictly
// below x (ties go low), mapped back to the code index.
__device__ __forceinline__ uint8_t encode4(float x, const float* mids, int quant_type) {
  int slot = 0;
#pragma unroll
  for (int i = 0; i < 15; ++i) slot += x > mids[i];
  return quant_type == 0 ? (uint8_t)slot : kFP4Order[slot];
}

__device__ __forceinline__ float clamp1(float x) { return fminf(fmaxf(x, -1.0f), 1.0f); }

// One warp per quantization block (grid-stride over blocks): warp max-reduce of |x| (exact in
// any order), then each lane encodes pairs of elements into whole bytes.
template <typename T>
__device__ void quant(const T* __restrict__ src, uint8_t* __restrict__ packed,
                      float* __restrict__ absmax, int64_t n, int blocksize, int quant_type) {
  __shared__ float s_mid[15];
  if (threadIdx.x < 15) {
    int a = threadIdx.x, b = threadIdx.x + 1;
    float lo, hi;
    if (quant_type == 0) {
      lo = kNF4[a];
      hi = kNF4[b];
    } else {
      lo = kFP4[kFP4Order[a]];
      hi = kFP4[kFP4Order[b]];
    }
    s_mid[threadIdx.x] = __fdiv_rn(__fadd_rn(lo, hi), 2.0f);
  }
  __syncthreads();
  float mids[15];
#pragma unroll
  for (int i = 0; i < 15; ++i) mids[i] = s_mid[i];

  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x / 32);
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  for (int64_t blk = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; blk < nblocks;
       blk += warps) {
    const int64_t start = blk * blocksize;
    const int64_t end = min(start + (int64_t)blocksize, n);
    float am = 0.0f;
    for (int64_t i = start + lane; i < end; i += 32) am = fmaxf(am, fabsf(rf::to_f32(src[i])));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, o));
    const bool full = end - start == blocksize;
    const float den = fmaxf(am, 1e-38f);
    const float inv = __fdiv_rn(1.0f, den);
    if (lane == 0) absmax[blk] = full ? am : den;
    const uint8_t pad = encode4(0.0f, mids, quant_type);
    for (int64_t p = start + 2 * lane; p < end; p += 64) {
      float x0 = rf::to_f32(src[p]);
      float s0 = full ? __fmul_rn(x0, inv) : __fdiv_rn(x0, den);
      uint8_t hi = encode4(clamp1(s0), mids, quant_type);
      uint8_t lo = pad;
      if (p + 1 < end) {
        float x1 = rf::to_f32(src[p + 1]);
        float s1 = full ? __fmul_rn(x1, inv) : __fdiv_rn(x1, den);
        lo = encode4(clamp1(s1), mids, quant_type);
      }
      packed[p >> 1] = (uint8_t)((hi << 4) | lo);
    }
  }
}

}  // namespace

#define NF4_ENTRY(SUFFIX, T)                                                                    \
  extern "C" __global__ void __launch_bounds__(kThreads) nf4_dequant_##SUFFIX(                  \
      const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* nested, \
      const float* nested_code, float offset, int quant_type, T* out, int64_t n, int bs_log2,   \
      int vec_ok) {                                                                             \
    dequant<T>(packed, absmax, absmax_q, nested, nested_code, offset, quant_type, out, n,       \
               bs_log2, vec_ok);                                                                \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(kThreads) nf4_quant_##SUFFIX(                    \
      const T* src, uint8_t* packed, float* absmax, int64_t n, int blocksize, int quant_type) { \
    quant<T>(src, packed, absmax, n, blocksize, quant_type);                                    \
  }

NF4_ENTRY(f32, float)
NF4_ENTRY(f16, __half)
NF4_ENTRY(bf16, __nv_bfloat16)
