// Decode matvec: for a small batch x [B, K] (B <= 8 per launch; the launcher splits larger
// batches) and the members i of a projection group (q/k/v, gate/up: up to 4 layers reading x),
//   y_i[b, n] = sum_k x[b, k] W_i[n, k] (+ bias_i[n]) + s_i * sum_j xa[b, col_i + j] Bl_i[n, j]
// where W_i is a 4-bit NF4/FP4 weight in bitsandbytes' layout (docs/formats.md) read as it is
// stored and dequantized in registers, and xa = x A^T is the LoRA down-projection of every member
// computed before this launch (dm_xa below: one launch for the group's stacked A, columns col_i..
// of xa), so the LoRA up-projection Bl_i [N_i, r_i] and its scale s_i are applied in the
// epilogue. Accumulation in fp32. dm_lorab adds the same LoRA term in place to 16-bit members'
// outputs (their base matmuls run in torch), all members in one launch.
//
// Layout facts used: W_i flattened row-major, element e = n * K + k; packed byte e / 2 holds
// element e in its high nibble when e is even; the scale of element e is that of block
// e >> bs_log2 (block sizes are powers of two >= 32): float32 absmax[blk], or with double
// quantization ncode[q[blk]] * nested[blk >> 8] + offset (nested blocks of 256).
//
// Fast kernel (dm_split<S>_<dtype>, S = 1, 2, 4, 8; batches 1..8, K % 32 == 0, 16-byte aligned x
// and packed, one quantization type in the group). A 16-row tile of one member is one m-tile of
// mma.sync m16n8k16 (the batch is the n dimension, padded to 8), worked on by S warps that split
// its K: warp s of the tile takes the 128-element k-steps s, s + S, ... Why tensor cores even at
// batch 1: the weights are 4 bits, so the GPU must decode 2 elements per packed byte at HBM speed,
// and per warp instruction an mma consumes 256 decoded weights for every batch column, where a
// CUDA-core dot product spends a multiply-add per weight per batch row. Why split K: a group's
// tiles alone do not fill the resident warps (the q/k/v group of an 8B model has 384 tiles for
// about 2,100 warp slots on an H200), and the launcher picks the S that fills them once.
// In a k-step, lane (g = lane / 4, t = lane % 4) loads the 16 packed bytes of rows g and g + 8 at
// chunk c = 4 * step + t (32 elements, inside one quantization block as 32 divides the block size
// and the chunk start), every warp load 8 rows x 64 contiguous bytes, with L1 no-allocate so the
// weights, read once, do not evict x and the scale tables, which every step reads. A ring of D
// steps' loads (packed bytes and raw scales) stays in flight: each step's slot is refilled right
// after its arithmetic. The 8 mmas of a step use k-slots permuted so that each thread's registers
// hold its own chunk: mma j takes from thread t the chunk's elements 4 j + {0,1} (A/B registers of
// columns 2t, 2t+1) and 4 j + {2,3} (columns 2t+8, 2t+9), so its B fragment (x of batch row g) is
// 4 consecutive values of x and its A registers are packed bytes 2 j and 2 j + 1. A packed byte
// becomes an A register (two 16-bit values, the high nibble in the low half) by one lookup in a
// 256-entry table replicated per bank (entry b of lane l at word 32 b + l: conflict-free, 32 KB),
// then one packed multiply by the chunk's scale in the model dtype. Rows past a member's end load
// its last row and chunks past K load the last chunk with scale 0; batch columns past the batch
// read x's last row; none of them is stored. The S warps' accumulators are summed through shared
// memory and the first warp of the tile runs the epilogue from its registers.
//
// Generic kernel (dm_any_<dtype>; any K, any alignment, groups mixing NF4 and FP4; the correctness
// path): one warp per output row, lanes stride over k element by element, warp-shuffle reduction,
// same epilogue.
#include "common.cuh"

namespace {

__constant__ float kCodes[2][16] = {
    {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
     -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
     0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
     0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f},
    {0.0f, 0.0625f / 12.0f, 8.0f / 12.0f, 12.0f / 12.0f, 4.0f / 12.0f, 6.0f / 12.0f, 2.0f / 12.0f,
     3.0f / 12.0f, -0.0f, -0.0625f / 12.0f, -8.0f / 12.0f, -12.0f / 12.0f, -4.0f / 12.0f,
     -6.0f / 12.0f, -2.0f / 12.0f, -3.0f / 12.0f}};

constexpr int kMaxMembers = 4;
constexpr int kMaxBatch = 8;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = 16;
// k-steps of one warp in flight (packed bytes and raw scales), and the resident blocks per SM
// asked of ptxas (2: 128 registers hold the ring without spilling).
constexpr int kRing = 4;
constexpr int kSplitMinBlocks = 2;

// One layer of the group; must match `MemberParams` in src/kernels/decode_matvec.rs.
struct Member {
  const uint8_t* packed;
  const float* absmax;      // float32 scales, or null with double quantization
  const uint8_t* absmax_q;  // uint8 scale codes (double quantization), or null
  const float* nested;      // nested absmax [ceil(nblocks / 256)]
  const float* ncode;       // nested map [256]
  const void* bias;         // [n] or null
  const void* lora_b;       // [n, rank] or null
  void* y;                  // [batch, n] (this launch's first batch row)
  int64_t n;
  int64_t start;  // first tile (fast kernel) or row (generic kernel) of this member in the grid
  float offset;
  float scaling;
  int32_t rank;
  int32_t xa_col;
  int32_t bs_log2;
  int32_t quant_type;  // 0 nf4, 1 fp4
};

// One launch; must match `Params` in src/kernels/decode_matvec.rs.
struct Params {
  Member m[kMaxMembers];
  const void* x;   // [batch, k]
  const void* xa;  // [batch, xa_ld] or null
  int64_t k;
  int32_t batch;  // 1..8
  int32_t xa_ld;
  int32_t members;
  int32_t pad_;
};

// The member owning grid unit u (a tile or a row): the last one whose start is <= u.
__device__ __forceinline__ int member_of(const Params& p, int64_t u) {
  int i = 0;
#pragma unroll
  for (int j = 1; j < kMaxMembers; ++j) i = (j < p.members && p.m[j].start <= u) ? j : i;
  return i;
}

__device__ __forceinline__ float block_scale(const Member& m, int64_t blk) {
  if (m.absmax_q == nullptr) return __ldg(m.absmax + blk);
  const float c = __ldg(m.ncode + __ldg(m.absmax_q + blk));
  return __fadd_rn(__fmul_rn(c, __ldg(m.nested + (blk >> 8))), m.offset);
}

// y[b, n] = acc (+ bias) + s * <xa[b, col..col+r), Bl[n, :]>, stored in T.
template <typename T>
__device__ __forceinline__ void epilogue(const Params& p, const Member& m, int64_t n, int b,
                                         float acc) {
  if (m.bias != nullptr) acc += rf::to_f32(static_cast<const T*>(m.bias)[n]);
  if (m.lora_b != nullptr) {
    const T* xa = static_cast<const T*>(p.xa) + (int64_t)b * p.xa_ld + m.xa_col;
    const T* bl = static_cast<const T*>(m.lora_b) + n * m.rank;
    float l = 0.0f;
    for (int j = 0; j < m.rank; ++j) l = fmaf(rf::to_f32(xa[j]), rf::to_f32(bl[j]), l);
    acc = fmaf(m.scaling, l, acc);
  }
  static_cast<T*>(m.y)[(int64_t)b * m.n + n] = rf::from_f32<T>(acc);
}

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ static __forceinline__ uint32_t mul(uint32_t a, uint32_t s) {
    __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a),
                               *reinterpret_cast<__nv_bfloat162*>(&s));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct Mma<__half> {
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ static __forceinline__ uint32_t mul(uint32_t a, uint32_t s) {
    __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&s));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// ---------------------------------------------------------------------------- fast kernel
// Word m (0..3) of a 16-byte vector.
__device__ __forceinline__ uint32_t word_of(const uint4& v, int m) {
  return m == 0 ? v.x : m == 1 ? v.y : m == 2 ? v.z : v.w;
}

// The two values of a 32-bit word of T (element 2i in the low half) as fp32.
template <typename T> __device__ __forceinline__ void unpack2(uint32_t w, float& lo, float& hi);
template <>
__device__ __forceinline__ void unpack2<__nv_bfloat16>(uint32_t w, float& lo, float& hi) {
  lo = __uint_as_float(w << 16);
  hi = __uint_as_float(w & 0xFFFF0000u);
}
template <> __device__ __forceinline__ void unpack2<__half>(uint32_t w, float& lo, float& hi) {
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
  lo = f.x;
  hi = f.y;
}

// 16 bytes read once: not kept in L1 (L2 fetches 256-byte sectors for the neighbours).
__device__ __forceinline__ uint4 load_stream16(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t load_stream_u8(const uint8_t* p) {
  unsigned short v;
  asm volatile("ld.global.nc.L1::no_allocate.u8 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}

// Table word of byte m (0..15) of a 16-byte chunk: entry 32 * byte + lane, whose byte offset
// (byte << 7) | (lane << 2) is one shift and one and-or (the two fields do not overlap).
__device__ __forceinline__ uint32_t lut_word(const uint8_t* lut, uint32_t lane4, const uint4& w,
                                             int m) {
  const uint32_t word = word_of(w, m >> 2);
  const int sh = 8 * (m & 3);
  const uint32_t off = ((sh == 0 ? (word << 7) : (word >> (sh - 7))) & 0x7F80u) | lane4;
  return *reinterpret_cast<const uint32_t*>(lut + off);
}

// One row of a lane in a tile: where its packed bytes and scales are. Rows past the member's end
// read its last row (their outputs are not stored).
struct RowSrc {
  const uint4* w;      // the row's packed bytes as 16-byte chunks
  const uint8_t* q;    // double quantization: the row's first block's scale code
  const float* f;      // plain scales: the row's first block's absmax
  const float* nested; // the nested absmax of the row's first block
  int first;           // element offset of the row's start inside its first block
  int nested_first;    // index of the row's first block inside its nested block of 256
};

__device__ __forceinline__ RowSrc row_src(const Member& m, int64_t row, int64_t K) {
  const int64_t e = min(row, m.n - 1) * K;
  const int64_t blk = e >> m.bs_log2;
  RowSrc r;
  r.w = reinterpret_cast<const uint4*>(m.packed + (e >> 1));
  r.q = m.absmax_q != nullptr ? m.absmax_q + blk : nullptr;
  r.f = m.absmax_q != nullptr ? nullptr : m.absmax + blk;
  r.nested = m.absmax_q != nullptr ? m.nested + (blk >> 8) : nullptr;
  r.first = (int)(e & ((1 << m.bs_log2) - 1));
  r.nested_first = (int)(blk & 255);
  return r;
}

// The block of chunk c relative to the row's first block.
__device__ __forceinline__ int chunk_block(const RowSrc& r, int c, int bs_log2) {
  return (r.first + 32 * c) >> bs_log2;
}

// What one lane loads for one k-step: the chunk of rows g and g + 8 and their raw scales (the
// float32 absmax bits, or the uint8 code with double quantization).
struct StepLoads {
  uint4 w0, w1;
  uint32_t s0, s1;
};

__device__ __forceinline__ uint32_t raw_scale(const RowSrc& r, int blk) {
  return r.q != nullptr ? load_stream_u8(r.q + blk) : __float_as_uint(__ldg(r.f + blk));
}

__device__ __forceinline__ void load_step(StepLoads& ld, const RowSrc& a, const RowSrc& b, int c,
                                          int bs_log2) {
  ld.w0 = load_stream16(a.w + c);
  ld.w1 = load_stream16(b.w + c);
  ld.s0 = raw_scale(a, chunk_block(a, c, bs_log2));
  ld.s1 = raw_scale(b, chunk_block(b, c, bs_log2));
}

// The scale of a loaded chunk (the nested decode reads the block's code through the shared copy
// of ncode); 0 for a chunk past K, which then adds nothing.
__device__ __forceinline__ float chunk_scale(const RowSrc& r, uint32_t raw, int c, bool valid,
                                             int bs_log2, const float* s_ncode, float offset) {
  if (!valid) return 0.0f;
  if (r.q == nullptr) return __uint_as_float(raw);
  const int blk = chunk_block(r, c, bs_log2);
  return fmaf(s_ncode[raw], __ldg(r.nested + ((r.nested_first + blk) >> 8)), offset);
}

// A step's 8 mmas: chunk `ld` of rows g, g + 8 times x (32 values of batch row g in xv).
template <typename T>
__device__ __forceinline__ void step_mma(float (&c)[4], const StepLoads& ld, const uint4 (&xv)[4],
                                         uint32_t sa, uint32_t sb, const uint8_t* lut,
                                         uint32_t lane4) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    uint32_t a[4];
    a[0] = Mma<T>::mul(lut_word(lut, lane4, ld.w0, 2 * j), sa);
    a[1] = Mma<T>::mul(lut_word(lut, lane4, ld.w1, 2 * j), sb);
    a[2] = Mma<T>::mul(lut_word(lut, lane4, ld.w0, 2 * j + 1), sa);
    a[3] = Mma<T>::mul(lut_word(lut, lane4, ld.w1, 2 * j + 1), sb);
    const uint4& xq = xv[j >> 1];
    Mma<T>::mma(c, a, (j & 1) ? xq.z : xq.x, (j & 1) ? xq.w : xq.y);
  }
}

template <typename T, int S>
__device__ __forceinline__ void split_kernel(const Params& p) {
  __shared__ __align__(16) uint32_t s_lut[256 * 32];
  __shared__ float s_ncode[256];
  __shared__ float s_red[kWarps][4][32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3, ks = warp % S;
  const Member& last = p.m[p.members - 1];
  const int64_t tiles = last.start + (last.n + kTileRows - 1) / kTileRows;
  const int64_t my_tile = (int64_t)blockIdx.x * (kWarps / S) + warp / S;
  const bool live = my_tile < tiles;  // the last block's spare warps work on the last tile
  const int64_t tile = live ? my_tile : tiles - 1;
  const Member& m = p.m[member_of(p, tile)];
  const int64_t ra = (tile - m.start) * kTileRows + g, rb = ra + 8;
  const int64_t K = p.k;
  const int chunks = (int)(K >> 5), steps = (chunks + 3) >> 2;
  const int mine = steps > ks ? (steps - ks + S - 1) / S : 0;  // this warp's k-steps
  const int bsl = m.bs_log2;
  const RowSrc src_a = row_src(m, ra, K), src_b = row_src(m, rb, K);
  const auto chunk_of = [&](int i) { return 4 * (ks + S * i) + t; };

  // The first steps' loads go out before the block builds its tables.
  StepLoads ring[kRing];
#pragma unroll
  for (int u = 0; u < kRing; ++u) load_step(ring[u], src_a, src_b, min(chunk_of(u), chunks - 1), bsl);
  // Table: word 32 b + r holds the two values of byte b (high nibble in the low half); 4 copies
  // per 16-byte store, a warp writing 512 contiguous bytes per instruction. Every member has the
  // same quantization type (the launcher checks).
  const float* code = kCodes[p.m[0].quant_type];
  for (int i = tid; i < 256 * 8; i += kThreads) {
    const int b = i >> 3;
    const uint32_t v = Mma<T>::pack(code[b >> 4], code[b & 15]);
    reinterpret_cast<uint4*>(s_lut)[i] = make_uint4(v, v, v, v);
  }
  if (m.absmax_q != nullptr && tid < 256) s_ncode[tid] = __ldg(m.ncode + tid);
  __syncthreads();
  const uint32_t lane4 = lane << 2;
  const uint8_t* lut = reinterpret_cast<const uint8_t*>(s_lut);
  // Batch columns past the batch read x's last row: their outputs are never stored.
  const uint4* xr =
      reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + min(g, p.batch - 1) * K);

  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int i0 = 0; i0 < mine; i0 += kRing) {
#pragma unroll
    for (int u = 0; u < kRing; ++u) {
      const int i = i0 + u;
      if (i >= mine) break;  // warp-uniform
      const bool valid = chunk_of(i) < chunks;
      const int ch = min(chunk_of(i), chunks - 1);
      uint4 xv[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) xv[q] = __ldg(xr + 4 * ch + q);
      const float fa = chunk_scale(src_a, ring[u].s0, ch, valid, bsl, s_ncode, m.offset);
      const float fb = chunk_scale(src_b, ring[u].s1, ch, valid, bsl, s_ncode, m.offset);
      step_mma<T>(c, ring[u], xv, Mma<T>::pack(fa, fa), Mma<T>::pack(fb, fb), lut, lane4);
      if (i + kRing < mine) load_step(ring[u], src_a, src_b, min(chunk_of(i + kRing), chunks - 1), bsl);
    }
  }

  if (S > 1) {  // the tile's warps sum into its first warp
#pragma unroll
    for (int e = 0; e < 4; ++e) s_red[warp][e][lane] = c[e];
    __syncthreads();
    if (ks != 0) return;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
#pragma unroll
      for (int w = 1; w < S; ++w) c[e] += s_red[warp + w][e][lane];
    }
  }
  if (!live) return;
  // c[0], c[1]: row g, batch columns 2t, 2t + 1; c[2], c[3]: row g + 8.
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int b = 2 * t + (e & 1);
    const int64_t n = e < 2 ? ra : rb;
    if (b < p.batch && n < m.n) epilogue<T>(p, m, n, b, c[e]);
  }
}

// --------------------------------------------------------------------------- generic kernel
template <typename T>
__device__ __forceinline__ void any_kernel(const Params& p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * kWarps + (threadIdx.x >> 5);
  const int mi = member_of(p, row);
  const Member& m = p.m[mi];
  const int64_t n = row - m.start;
  if (n >= m.n) return;  // past the last member's rows
  const float* code = kCodes[m.quant_type];
  const T* x = static_cast<const T*>(p.x);
  float acc[kMaxBatch];
#pragma unroll
  for (int b = 0; b < kMaxBatch; ++b) acc[b] = 0.0f;
  for (int64_t k = lane; k < p.k; k += 32) {
    const int64_t e = n * p.k + k;
    const uint8_t byte = __ldg(m.packed + (e >> 1));
    const int nib = (e & 1) ? (byte & 15) : (byte >> 4);
    // The weight as the reference dequantizes it: code * scale in fp32, rounded to T.
    const float s = block_scale(m, e >> m.bs_log2);
    const float w = rf::to_f32(rf::from_f32<T>(__fmul_rn(code[nib], s)));
#pragma unroll
    for (int b = 0; b < kMaxBatch; ++b) {
      if (b < p.batch) acc[b] = fmaf(w, rf::to_f32(x[(int64_t)b * p.k + k]), acc[b]);
    }
  }
#pragma unroll
  for (int b = 0; b < kMaxBatch; ++b) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[b] += __shfl_xor_sync(0xffffffffu, acc[b], o);
  }
  if (lane < p.batch) {
    float mine = 0.0f;
#pragma unroll
    for (int b = 0; b < kMaxBatch; ++b) mine = b == lane ? acc[b] : mine;
    epilogue<T>(p, m, n, lane, mine);
  }
}

// -------------------------------------------------------------------- LoRA terms of 16-bit layers
// y[b, n] += s * sum_j xa[b, col + j] Bl[n, j] for the members' rows (a thread per row, all batch
// rows; members without LoRA are left as they are): the group's 16-bit members' LoRA
// up-projections in one launch after their base matmuls. Only n, start, y and the LoRA fields of
// each member are read.
template <typename T>
__device__ __forceinline__ void lora_b_kernel(const Params& p) {
  const int64_t row = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  const Member& last = p.m[p.members - 1];
  if (row >= last.start + last.n) return;
  const Member& m = p.m[member_of(p, row)];
  const int64_t n = row - m.start;
  if (m.lora_b == nullptr) return;
  for (int b = 0; b < p.batch; ++b) {
    epilogue<T>(p, m, n, b, rf::to_f32(static_cast<const T*>(m.y)[(int64_t)b * m.n + n]));
  }
}

// ------------------------------------------------------------------------------ LoRA x A^T
// xa[b, j] = sum_k x[b, k] A[j, k] for every LoRA row j of the group (all members' A stacked):
// a block of 1024 threads per row j (a row of K = 14336 is under 2 loads per thread, so the
// block waits on about one memory round trip), threads striding over k (8 elements per 16-byte
// load when `vec`), fp32 sums reduced by warp shuffles then shared memory, rounded to T as a
// matmul's output is.
constexpr int kXaThreads = 1024;
struct XaParams {
  const void* x;  // [batch, k]
  const void* a;  // [rows, k]
  void* xa;       // [batch, xa_ld]
  int64_t k;
  int32_t batch;  // 1..8
  int32_t xa_ld;
  int32_t vec;  // k % 8 == 0 and 16-byte aligned x and a
  int32_t pad_;
};

template <typename T>
__device__ __forceinline__ void xa_kernel(const XaParams& p) {
  __shared__ float s_sum[kXaThreads / 32][kMaxBatch];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t j = blockIdx.x, K = p.k;
  const T* x = static_cast<const T*>(p.x);
  const T* a = static_cast<const T*>(p.a) + j * K;
  float acc[kMaxBatch];
#pragma unroll
  for (int b = 0; b < kMaxBatch; ++b) acc[b] = 0.0f;
  if (p.vec) {
    for (int64_t k0 = 8 * (int64_t)tid; k0 < K; k0 += 8 * kXaThreads) {
      const uint4 av = __ldg(reinterpret_cast<const uint4*>(a + k0));
#pragma unroll
      for (int b = 0; b < kMaxBatch; ++b) {
        if (b >= p.batch) break;
        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + b * K + k0));
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          float a0, a1, x0, x1;
          unpack2<T>(word_of(av, m), a0, a1);
          unpack2<T>(word_of(xv, m), x0, x1);
          acc[b] = fmaf(a1, x1, fmaf(a0, x0, acc[b]));
        }
      }
    }
  } else {
    for (int64_t k = tid; k < K; k += kXaThreads) {
      const float av = rf::to_f32(a[k]);
#pragma unroll
      for (int b = 0; b < kMaxBatch; ++b) {
        if (b < p.batch) acc[b] = fmaf(av, rf::to_f32(x[b * K + k]), acc[b]);
      }
    }
  }
#pragma unroll
  for (int b = 0; b < kMaxBatch; ++b) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[b] += __shfl_xor_sync(0xffffffffu, acc[b], o);
    if (lane == 0) s_sum[warp][b] = acc[b];
  }
  __syncthreads();
  if (tid < p.batch) {
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kXaThreads / 32; ++w) v += s_sum[w][tid];
    static_cast<T*>(p.xa)[(int64_t)tid * p.xa_ld + j] = rf::from_f32<T>(v);
  }
}

}  // namespace

// __grid_constant__: the kernels index the members with a computed index; without it the
// compiler would copy the whole Params into each thread's local memory to take its address.
#define DM_ENTRY(SUFFIX, T)                                                                   \
  DM_SPLIT(SUFFIX, T, 1)                                                                      \
  DM_SPLIT(SUFFIX, T, 2)                                                                      \
  DM_SPLIT(SUFFIX, T, 4)                                                                      \
  DM_SPLIT(SUFFIX, T, 8)                                                                      \
  extern "C" __global__ void __launch_bounds__(kThreads)                                      \
      dm_any_##SUFFIX(const __grid_constant__ Params p) {                                     \
    any_kernel<T>(p);                                                                         \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(kXaThreads)                                    \
      dm_xa_##SUFFIX(const __grid_constant__ XaParams p) {                                    \
    xa_kernel<T>(p);                                                                          \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(kThreads)                                      \
      dm_lorab_##SUFFIX(const __grid_constant__ Params p) {                                   \
    lora_b_kernel<T>(p);                                                                      \
  }

// S warps per 16-row tile.
#define DM_SPLIT(SUFFIX, T, S)                                                                \
  extern "C" __global__ void __launch_bounds__(kThreads, kSplitMinBlocks)                     \
      dm_split##S##_##SUFFIX(const __grid_constant__ Params p) {                              \
    split_kernel<T, S>(p);                                                                    \
  }

DM_ENTRY(f16, __half)
DM_ENTRY(bf16, __nv_bfloat16)
