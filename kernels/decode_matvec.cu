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
// Stream kernel (dm_stream<NB>_<dtype>, NB = 1, 2, 4: batches up to 4, padded to NB; K % 32 == 0,
// 16-byte aligned x and packed, one quantization type in the group). Why: at batch 1 the work is a
// stream of packed bytes, so the kernel is built to keep HBM busy: a persistent grid of 4-warp
// blocks (the blocks resident at once, striding over work) builds its code table once per block,
// and each warp owns a tile of 4 rows of one member: lane l takes the 16-byte chunks c = l, l + 32,
// ... (32 elements, inside one quantization block) of all 4 rows, so every warp load is 512
// contiguous bytes, and a ring of DEPTH k-steps' loads (4 x 16 bytes and 4 raw scales each) stays
// in flight during a step's arithmetic (DEPTH 2 at NB = 1, 1 above: the deepest that fits 128
// registers). A packed byte becomes its two codes in T (high nibble = even element) by one lookup
// in a 256-entry table replicated per lane (word 32 v + lane: conflict-free, 32 KB), then fp32
// multiply-adds with x (read through L1, shared by the 4 rows) into a per-chunk partial that is
// scaled once per chunk (nested scales decoded once per chunk). Warp-shuffle sums; lane r * NB + b
// runs the epilogue. Batch rows share each weight load (read once for B <= 4).
//
// Tensor-core kernel (dm_mma_<dtype>; batches 5..8, or a group mixing NF4 and FP4; same K and
// alignment conditions): why tensor cores at batch 8: the weights are 4 bits, so the GPU must
// dequantize 2 elements per packed byte at HBM speed; a CUDA-core dot product costs a table lookup
// and an FMA per element per batch row, 8 FMAs per element at batch 8, while one mma.sync m16n8k16
// takes 256 weight elements and all 8 batch columns per warp instruction. A block owns 16 rows of
// one member (one m-tile) and its 8 warps split K: warp w takes 128-wide k-steps w, w + 8, ... In a
// k-step, lane (g = lane / 4, t = lane % 4) loads the 16 packed bytes of rows g and g + 8 at chunk
// c = 4 * step + t (32 elements, inside one quantization block as 32 divides the block size and the
// chunk start), i.e. every warp load is 8 rows x 64 contiguous bytes. The 8 mmas of the step use
// k-slots permuted so that each thread's registers hold its own chunk: mma j takes from thread t
// the chunk's elements 4 j + {0,1} (A/B registers of columns 2t, 2t+1) and 4 j + {2,3} (columns
// 2t+8, 2t+9), so its B fragment (x of batch row g) is 4 consecutive values of x and its A
// registers are packed bytes 2 j and 2 j + 1. A packed byte becomes an A register (two 16-bit
// values, the high nibble in the low half) by one lookup in a 256-entry table replicated per bank
// (entry b of lane l at word 32 b + l: conflict-free, 32 KB), then one packed multiply by the
// chunk's scale in the model dtype. A warp's first loads go out before the block builds the table
// (16-byte stores) and waits for it. The warps' accumulators are summed through shared memory and
// 128 threads (16 rows x 8 batch columns) run the epilogue.
//
// Generic kernel (dm_any_<dtype>; any K, any alignment; the correctness path): one warp per
// output row, lanes stride over k element by element, warp-shuffle reduction, same epilogue.
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
// k-steps of one warp whose loads are issued together (4 x 2 x 16 bytes in flight per lane).
constexpr int kUnroll = 4;
// Resident blocks per SM asked of ptxas for the fast kernel: 3 caps it at 85 registers, so the
// q/k/v group of an 8B model (384 tiles) runs in one wave on 132 SMs (97 registers gave 2).
constexpr int kMmaMinBlocks = 3;

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

// ------------------------------------------------------------------------------ fast kernel
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

// Table word of byte m (0..15) of a 16-byte chunk: entry 32 * byte + lane, whose byte offset
// (byte << 7) | (lane << 2) is one shift and one and-or (the two fields do not overlap).
__device__ __forceinline__ uint32_t lut_word(const uint32_t* lut, uint32_t lane4, const uint4& w,
                                             int m) {
  const uint32_t word = m < 4 ? w.x : m < 8 ? w.y : m < 12 ? w.z : w.w;
  const int sh = 8 * (m & 3);
  const uint32_t off = ((sh == 0 ? (word << 7) : (word >> (sh - 7))) & 0x7F80u) | lane4;
  return *reinterpret_cast<const uint32_t*>(reinterpret_cast<const uint8_t*>(lut) + off);
}

// The loads of one k-step for one lane: rows g and g + 8 of chunk c, and their scales.
struct StepLoads {
  uint4 w0, w1;
  float s0, s1;
};

// Loads of the kUnroll k-steps s0, s0 + 8, ... (zeros, and no access, past K or the rows).
__device__ __forceinline__ void load_steps(StepLoads (&ld)[kUnroll], const Member& m, int64_t s0,
                                           int64_t steps, int64_t chunks, int t, int64_t ra,
                                           int64_t rb, bool va, bool vb, const uint4* pa,
                                           const uint4* pb, int64_t K) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t ch = 4 * (s0 + (int64_t)kWarps * u) + t;
    const bool vc = s0 + kWarps * u < steps && ch < chunks;
    ld[u].w0 = make_uint4(0, 0, 0, 0);
    ld[u].w1 = ld[u].w0;
    ld[u].s0 = 0.0f;
    ld[u].s1 = 0.0f;
    if (vc && va) {
      ld[u].w0 = __ldg(pa + ch);
      ld[u].s0 = block_scale(m, (ra * K + 32 * ch) >> m.bs_log2);
    }
    if (vc && vb) {
      ld[u].w1 = __ldg(pb + ch);
      ld[u].s1 = block_scale(m, (rb * K + 32 * ch) >> m.bs_log2);
    }
  }
}

template <typename T>
__device__ __forceinline__ void mma_kernel(const Params& p) {
  __shared__ __align__(16) uint32_t s_lut[256 * 32];
  __shared__ float s_red[kWarps][kTileRows][kMaxBatch];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int mi = member_of(p, blockIdx.x);
  const Member& m = p.m[mi];
  const int64_t row0 = (blockIdx.x - m.start) * kTileRows;
  const int64_t ra = row0 + g, rb = row0 + g + 8;
  const bool va = ra < m.n, vb = rb < m.n;
  const int64_t K = p.k, chunks = K >> 5, steps = (chunks + 3) >> 2;
  const uint4* pa = reinterpret_cast<const uint4*>(m.packed + ra * (K >> 1));
  const uint4* pb = reinterpret_cast<const uint4*>(m.packed + rb * (K >> 1));
  const bool vx = g < p.batch;
  const uint4* px = reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + g * K);

  // The first k-steps' loads go out before the block builds the table and waits for it.
  StepLoads ld[kUnroll];
  load_steps(ld, m, warp, steps, chunks, t, ra, rb, va, vb, pa, pb, K);

  // Table: word 32 b + r holds the two values of byte b (high nibble in the low half); 4 copies
  // per 16-byte store, a warp writing 512 contiguous bytes per instruction.
  const float* code = kCodes[m.quant_type];
  for (int i = tid; i < 256 * 8; i += kThreads) {
    const int b = i >> 3;
    const uint32_t v = Mma<T>::pack(code[b >> 4], code[b & 15]);
    reinterpret_cast<uint4*>(s_lut)[i] = make_uint4(v, v, v, v);
  }
  __syncthreads();
  const uint32_t lane4 = lane << 2;

  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t s0 = warp; s0 < steps;) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t ch = 4 * (s0 + (int64_t)kWarps * u) + t;
      const bool vc = s0 + kWarps * u < steps && ch < chunks;
      // x of batch row g for this chunk: 32 values, 4 vectors (zeros past the batch or K).
      uint4 xv[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        xv[q] = (vc && vx) ? __ldg(px + 4 * ch + q) : make_uint4(0, 0, 0, 0);
      }
      const uint32_t sa = Mma<T>::pack(ld[u].s0, ld[u].s0);
      const uint32_t sb = Mma<T>::pack(ld[u].s1, ld[u].s1);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        uint32_t a[4];
        a[0] = Mma<T>::mul(lut_word(s_lut, lane4, ld[u].w0, 2 * j), sa);
        a[1] = Mma<T>::mul(lut_word(s_lut, lane4, ld[u].w1, 2 * j), sb);
        a[2] = Mma<T>::mul(lut_word(s_lut, lane4, ld[u].w0, 2 * j + 1), sa);
        a[3] = Mma<T>::mul(lut_word(s_lut, lane4, ld[u].w1, 2 * j + 1), sb);
        const uint4& xq = xv[j >> 1];
        const uint32_t b0 = (j & 1) ? xq.z : xq.x;
        const uint32_t b1 = (j & 1) ? xq.w : xq.y;
        Mma<T>::mma(c, a, b0, b1);
      }
    }
    s0 += kWarps * kUnroll;
    if (s0 < steps) load_steps(ld, m, s0, steps, chunks, t, ra, rb, va, vb, pa, pb, K);
  }

  // c[0], c[1]: row g, batch columns 2t, 2t + 1; c[2], c[3]: row g + 8.
  s_red[warp][g][2 * t] = c[0];
  s_red[warp][g][2 * t + 1] = c[1];
  s_red[warp][g + 8][2 * t] = c[2];
  s_red[warp][g + 8][2 * t + 1] = c[3];
  __syncthreads();
  if (tid < kTileRows * kMaxBatch) {
    const int r = tid >> 3, b = tid & 7;
    const int64_t n = row0 + r;
    if (n < m.n && b < p.batch) {
      float acc = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) acc += s_red[w][r][b];
      epilogue<T>(p, m, n, b, acc);
    }
  }
}

// ---------------------------------------------------------------------------- stream kernel
constexpr int kStreamRows = 4;  // rows of one warp tile
// Threads of a stream block: 4 warps, so a small group's tiles spread over every SM in blocks of
// even size (its 32 KB table is built by 128 threads in 16 stores each).
constexpr int kStreamThreads = 128;
constexpr int kStreamWarps = kStreamThreads / 32;

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

// The bits of v rounded to T.
template <typename T> __device__ __forceinline__ uint32_t bits16(float v);
template <> __device__ __forceinline__ uint32_t bits16<__nv_bfloat16>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
template <> __device__ __forceinline__ uint32_t bits16<__half>(float v) {
  return __half_as_ushort(__float2half_rn(v));
}

// What one lane loads for one k-step of its tile: chunk c (16 packed bytes) of each row and the
// raw scale of that chunk (the float32 absmax bits, or the uint8 code with double quantization).
struct StreamLoads {
  uint4 w[kStreamRows];
  uint32_t s[kStreamRows];
};

__device__ __forceinline__ void stream_load(StreamLoads& ld, const Member& m, int64_t row0,
                                            int64_t c, int64_t chunks, int64_t K) {
#pragma unroll
  for (int r = 0; r < kStreamRows; ++r) {
    ld.w[r] = make_uint4(0, 0, 0, 0);
    ld.s[r] = 0;
    const int64_t row = row0 + r;
    if (c < chunks && row < m.n) {
      ld.w[r] = __ldg(reinterpret_cast<const uint4*>(m.packed + row * (K >> 1)) + c);
      const int64_t blk = (row * K + 32 * c) >> m.bs_log2;
      ld.s[r] = m.absmax_q != nullptr ? (uint32_t)__ldg(m.absmax_q + blk)
                                      : __float_as_uint(__ldg(m.absmax + blk));
    }
  }
}

// The scale of row0 + r's chunk c from its raw load (the nested decode reads L1-resident tables).
__device__ __forceinline__ float stream_scale(const Member& m, uint32_t raw, int64_t row, int64_t c,
                                              int64_t K) {
  if (m.absmax_q == nullptr) return __uint_as_float(raw);
  const int64_t blk = (row * K + 32 * c) >> m.bs_log2;
  return __fadd_rn(__fmul_rn(__ldg(m.ncode + raw), __ldg(m.nested + (blk >> 8))), m.offset);
}

// One k-step of a warp tile: chunk c of the 4 rows (loaded in `cur`) times x, into acc.
template <typename T, int NB>
__device__ __forceinline__ void stream_step(float (&acc)[kStreamRows][NB], const StreamLoads& cur,
                                            const Params& p, const Member& m, int64_t row0,
                                            int64_t c, int64_t chunks, int64_t K,
                                            const uint8_t* lut, uint32_t lane4) {
  float part[kStreamRows][NB];
#pragma unroll
  for (int r = 0; r < kStreamRows; ++r)
#pragma unroll
    for (int b = 0; b < NB; ++b) part[r][b] = 0.0f;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    // x[b, 32 c + 8 q .. + 8): 8 values per batch row (zeros past K or the batch).
    uint4 xv[NB];
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      xv[b] = (c < chunks && b < p.batch)
                  ? __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + b * K +
                                                         32 * c + 8 * q))
                  : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // Packed byte 4 q + j of the chunk: elements 8 q + 2 j (high nibble) and + 1.
      float xe[NB], xo[NB];
#pragma unroll
      for (int b = 0; b < NB; ++b) unpack2<T>(word_of(xv[b], j), xe[b], xo[b]);
#pragma unroll
      for (int r = 0; r < kStreamRows; ++r) {
        const uint32_t wd = word_of(cur.w[r], q);
        const uint32_t off = ((j == 0 ? (wd << 7) : (wd >> (8 * j - 7))) & 0x7F80u) | lane4;
        const uint32_t t = *reinterpret_cast<const uint32_t*>(lut + off);
        float we, wo;
        unpack2<T>(t, we, wo);
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          part[r][b] = fmaf(we, xe[b], part[r][b]);
          part[r][b] = fmaf(wo, xo[b], part[r][b]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kStreamRows; ++r) {
    const float s =
        c < chunks && row0 + r < m.n ? stream_scale(m, cur.s[r], row0 + r, c, K) : 0.0f;
#pragma unroll
    for (int b = 0; b < NB; ++b) acc[r][b] = fmaf(s, part[r][b], acc[r][b]);
  }
}

template <typename T, int NB, int D>
__device__ __forceinline__ void stream_kernel(const Params& p) {
  __shared__ __align__(16) uint32_t s_lut[256 * 32];
  const int tid = threadIdx.x, lane = tid & 31;
  // Table: word 32 v + l holds byte v's two codes in T (high nibble, the even element, in the
  // low half), one copy per lane so any 32 lookups hit 32 banks. Every member has the same
  // quantization type (the launcher checks).
  {
    const float* code = kCodes[p.m[0].quant_type];
    for (int i = tid; i < 256 * 8; i += kStreamThreads) {
      const int v = i >> 3;
      const uint32_t w = bits16<T>(code[v >> 4]) | (bits16<T>(code[v & 15]) << 16);
      reinterpret_cast<uint4*>(s_lut)[i] = make_uint4(w, w, w, w);
    }
  }
  __syncthreads();
  const uint32_t lane4 = lane << 2;
  const uint8_t* lut = reinterpret_cast<const uint8_t*>(s_lut);
  const int64_t K = p.k, chunks = K >> 5, steps = (chunks + 31) >> 5;
  const int64_t tiles = p.m[p.members - 1].start +
                        (p.m[p.members - 1].n + kStreamRows - 1) / kStreamRows;
  const int64_t stride = (int64_t)gridDim.x * kStreamWarps;

  for (int64_t tile = (int64_t)blockIdx.x * kStreamWarps + (tid >> 5); tile < tiles;
       tile += stride) {
    const Member& m = p.m[member_of(p, tile)];
    const int64_t row0 = (tile - m.start) * kStreamRows;
    float acc[kStreamRows][NB];
#pragma unroll
    for (int r = 0; r < kStreamRows; ++r)
#pragma unroll
      for (int b = 0; b < NB; ++b) acc[r][b] = 0.0f;

    // A ring of D k-steps' loads: step i's registers are taken, the slot refilled with step
    // i + D, then step i's arithmetic runs with D steps' loads in flight.
    StreamLoads ring[D];
#pragma unroll
    for (int u = 0; u < D; ++u) {
      stream_load(ring[u], m, row0, 32 * u + lane, u < steps ? chunks : 0, K);
    }
    for (int64_t i0 = 0; i0 < steps; i0 += D) {
#pragma unroll
      for (int u = 0; u < D; ++u) {
        const int64_t i = i0 + u;
        if (i >= steps) break;  // warp-uniform
        const StreamLoads cur = ring[u];
        stream_load(ring[u], m, row0, 32 * (i + D) + lane, i + D < steps ? chunks : 0, K);
        stream_step<T, NB>(acc, cur, p, m, row0, 32 * i + lane, chunks, K, lut, lane4);
      }
    }

    // Warp sums; lane r * NB + b then runs the epilogue of row0 + r, batch row b.
    float mine = 0.0f;
#pragma unroll
    for (int r = 0; r < kStreamRows; ++r)
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        float v = acc[r][b];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        mine = lane == r * NB + b ? v : mine;
      }
    const int r = lane / NB, b = lane % NB;
    if (r < kStreamRows && b < p.batch && row0 + r < m.n) epilogue<T>(p, m, row0 + r, b, mine);
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
  extern "C" __global__ void __launch_bounds__(kThreads, kMmaMinBlocks)                       \
      dm_mma_##SUFFIX(const __grid_constant__ Params p) {                                     \
    mma_kernel<T>(p);                                                                         \
  }                                                                                           \
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
  }                                                                                           \
  DM_STREAM(SUFFIX, T, 1, 2, 4)                                                               \
  DM_STREAM(SUFFIX, T, 2, 1, 4)                                                               \
  DM_STREAM(SUFFIX, T, 4, 1, 4)

// (batch padding NB, k-steps in flight DEPTH, resident blocks per SM asked of ptxas MINB): the
// deepest ring that fits 128 registers (4 blocks of 4 warps per SM) without spilling, checked
// with ptxas -v.
#define DM_STREAM(SUFFIX, T, NB, DEPTH, MINB)                                                 \
  extern "C" __global__ void __launch_bounds__(kStreamThreads, MINB)                          \
      dm_stream##NB##_##SUFFIX(const __grid_constant__ Params p) {                            \
    stream_kernel<T, NB, DEPTH>(p);                                                           \
  }

DM_ENTRY(f16, __half)
DM_ENTRY(bf16, __nv_bfloat16)
