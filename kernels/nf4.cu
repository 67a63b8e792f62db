// NF4 / FP4 blockwise 4-bit dequantization and quantization, byte-compatible with bitsandbytes
// (format: docs/formats.md; the CPU twin is src/quant/blockwise.rs).
//
// Float arithmetic uses the _rn intrinsics where bitsandbytes' result depends on a separate
// rounding (a fused multiply-add would change the bytes or the values).
//
// Dequantize (nf4_dequant_<dtype>) is memory-bound: 0.5 B read, 2-4 B written per element. The
// work is cut into 16-byte store units (8 elements, 4 packed bytes, for 16-bit outputs; 4 and 2
// for fp32) and units into warp-owned chunks of 32 * 4 consecutive units (E = 1024 elements for
// 16-bit, 512 for fp32). Lane l of the owning warp writes units l, 32 + l, 64 + l, 96 + l, so
// every load and store instruction of the warp is one contiguous span (full sectors). A chunk
// spans at most E / 32 <= 32 quantization blocks (blocks are powers of two >= 32), so its scales
// are fetched once per warp: lane j loads the scale (float absmax, or the 8-bit code with double
// quantization) of block j of the chunk, one sector for the whole warp, rebuilds it, and each
// unit takes its scale from the owning lane by one shuffle. With double quantization a chunk lies
// inside one group of 256 blocks (256 * 32 >= 8192 > E), so one nested absmax serves the warp.
// The chunk's loads go out before the block waits for the 256-entry nested map to be staged in
// shared memory. The launcher sizes the grid for one chunk per warp; the kernel still loops over
// chunks so any grid is correct (RSLORA_FAST_MAX_WAVES caps it). After the whole chunks, the tail
// (fewer than E elements) goes by whole units, then single elements; buffers that are not aligned
// for the vector loads/stores (vec_ok = 0) go entirely by single elements.
//
// Why warp-owned chunks: one scale fetch and one nested absmax per warp instead of per unit, and
// every warp instruction a contiguous span; the variants measured against it are in
// docs/benchmarks.md ("NF4 dequantize").
#include "common.cuh"
#include <type_traits>

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
// Store units per lane per chunk (docs/benchmarks.md, "NF4 dequantize": 4 beats 8).
constexpr int kUnitsPerLane = 4;
// Resident blocks per SM asked of ptxas for dequantize: 8 pins 32 registers (full occupancy on
// sm_90, no spills).
constexpr int kDequantMinBlocks = 8;

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

// One 16-byte store unit of T: N elements from N / 2 packed bytes, read as one word.
template <typename T> struct Unit {
  static constexpr int N = rf::Vec<T>::N;  // elements per unit
  static constexpr int BYTES = N / 2;      // packed bytes per unit
  using Word = std::conditional_t<BYTES == 4, uint32_t, unsigned short>;
  __device__ static __forceinline__ uint32_t load(const uint8_t* packed, int64_t u) {
    return __ldg(reinterpret_cast<const Word*>(packed) + u);
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

// The loads of one warp-owned chunk (see the header), held in registers until emitted.
template <typename T> struct Chunk {
  static constexpr int U = kUnitsPerLane;
  static constexpr int N = Unit<T>::N;
  static constexpr int E = 32 * U * N;  // elements per chunk (a power of two)
  static_assert(U * N <= 32, "a chunk must span at most 32 quantization blocks (one per lane)");
  using Word = typename Unit<T>::Word;
  Word w[U];
  uint32_t q;  // scale code (double quant) or float absmax bits of the chunk's block `lane`
  float nest;  // nested absmax of the chunk's group (double quant only)

  __device__ __forceinline__ void load(const uint8_t* __restrict__ packed,
                                       const float* __restrict__ absmax,
                                       const uint8_t* __restrict__ absmax_q,
                                       const float* __restrict__ nested, int64_t c, int lane,
                                       int bs_log2) {
    // One base pointer per chunk; the U loads are immediate offsets from it.
    const Word* pw = reinterpret_cast<const Word*>(packed) + c * (32 * U) + lane;
#pragma unroll
    for (int k = 0; k < U; ++k) w[k] = __ldg(pw + 32 * k);
    const int64_t b0 = (c * E) >> bs_log2;
    const int nb = max(1, E >> bs_log2);  // blocks in the chunk
    q = 0;
    if (lane < nb) {
      if (absmax_q != nullptr) q = __ldg(absmax_q + b0 + lane);
      else q = __float_as_uint(__ldg(absmax + b0 + lane));
    }
    nest = absmax_q != nullptr ? __ldg(nested + (b0 >> 8)) : 0.0f;
  }

  // Converts and stores chunk c (whose loads this object holds).
  __device__ __forceinline__ void emit(T* __restrict__ out, int64_t c, int lane, int bs_log2,
                                       const float* s_code, const float* s_ncode, float offset,
                                       bool dq) const {
    // Scale of block `lane` of the chunk: map[q] * nested + offset (two roundings), or the float
    // absmax itself. Lanes past the chunk's blocks compute an unused value.
    const float sc = dq ? __fadd_rn(__fmul_rn(s_ncode[q], nest), offset) : __uint_as_float(q);
    T* dst = out + c * E + lane * N;
#pragma unroll
    for (int k = 0; k < U; ++k) {
      // Block of this lane's unit within the chunk (< 32, see the static_assert).
      const int rel = ((32 * k + lane) * N) >> bs_log2;
      const float s = __shfl_sync(0xffffffffu, sc, rel);
      emit_unit<T>(dst + 32 * k * N, static_cast<uint32_t>(w[k]), s, s_code);
    }
  }
};

template <typename T>
__device__ void dequant(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                        const uint8_t* __restrict__ absmax_q, const float* __restrict__ nested,
                        const float* __restrict__ nested_code, float offset, int quant_type,
                        T* __restrict__ out, int64_t n, int bs_log2, int vec_ok) {
  using C = Chunk<T>;
  constexpr int N = C::N;
  __shared__ float s_code[16];
  __shared__ float s_ncode[256];
  const bool dq = absmax_q != nullptr;
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
  int64_t c = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  // Unaligned buffers: no chunks and no units, every element by the scalar loop at the end.
  const int64_t nchunks = vec_ok ? n / C::E : 0;
  const int64_t units = vec_ok ? n / N : 0;

  // The first chunk's loads go out before the tables are staged and the block waits on them.
  C cur;
  if (c < nchunks) cur.load(packed, absmax, absmax_q, nested, c, lane, bs_log2);
  if (threadIdx.x < 16) s_code[threadIdx.x] = quant_type == 0 ? kNF4[threadIdx.x] : kFP4[threadIdx.x];
  if (dq) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_ncode[i] = __ldg(nested_code + i);
  }
  __syncthreads();

  // One trip per warp with the launcher's grid; more only when the grid was capped.
  while (c < nchunks) {
    cur.emit(out, c, lane, bs_log2, s_code, s_ncode, offset, dq);
    c += warps;
    if (c < nchunks) cur.load(packed, absmax, absmax_q, nested, c, lane, bs_log2);
  }

  // Tail after the last whole chunk (fewer than E elements): whole units, then elements.
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  for (int64_t u = nchunks * (C::E / N) + tid; u < units; u += stride) {
    emit_unit<T>(out + u * N, Unit<T>::load(packed, u),
                 block_scale((u * N) >> bs_log2, absmax, absmax_q, nested, s_ncode, offset),
                 s_code);
  }
  for (int64_t i = units * N + tid; i < n; i += stride) {
    const uint8_t b = packed[i >> 1];
    const int cd = (i & 1) ? (b & 15) : (b >> 4);
    const float s = block_scale(i >> bs_log2, absmax, absmax_q, nested, s_ncode, offset);
    out[i] = rf::from_f32<T>(__fmul_rn(s_code[cd], s));
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
  extern "C" __global__ void __launch_bounds__(kThreads, kDequantMinBlocks)                     \
      nf4_dequant_##SUFFIX(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, \
                           const float* nested, const float* nested_code, float offset,         \
                           int quant_type, T* out, int64_t n, int bs_log2, int vec_ok) {        \
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
