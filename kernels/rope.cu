// Rotary position embedding on q and k in one launch, in place (rotate_half convention):
//   forward:  o1 = x1*c1 - x2*s1,  o2 = x2*c2 + x1*s2
//   backward: d1 = g1*c1 + g2*s2,  d2 = g2*c2 - g1*s1   (the transpose of the forward map)
// where x1/x2 are the two halves of a head_dim row and c/s the matching halves of cos/sin. The
// backward is the exact transpose, so it is right even when cos/sin halves differ.
//
// q [B, Hq, S, D], k [B, Hk, S, D] with any batch/head/seq strides (last dim contiguous);
// cos/sin [B, S, D] with their own batch/seq strides (batch stride 0 broadcasts one table).
// One thread owns one chunk (16 bytes when `vec`, else one element) of the first half of a
// (b, s) row plus the matching chunk of the second half, loads cos/sin for it once, and applies
// them to HP heads: cos/sin traffic is cut by HP and all HP heads' loads are issued before any
// store (bytes in flight). Consecutive threads take consecutive chunks, so each warp reads
// contiguous spans. Math in fp32, each rounding step pinned (rot_lo/rot_hi), so both kernels
// below give the same bits.
//
// The fast kernel (`rope_vec_*`, `rope_scalar_*`): 3-D grid (sequence tiles x head groups x
// batch), 2-D block (x = chunk of the half row, y = position), sized by the launcher to cover the
// tensor in one pass, so each thread runs straight-line code without division; forward/backward
// is a template parameter. The fallback (`rope_loop_*`) is a flat grid-stride loop that splits the
// index with two 64-bit div/mods per thread; it runs only the shapes one pass of the fast grid
// cannot cover (more than 256 chunks per half row, batch over grid z).
//
// Why two heads per thread on a division-free grid: the index split dominated the grid-stride
// kernel's instructions, and two heads is the one setting at >= 80% of copy bandwidth in all three
// dtypes (docs/benchmarks.md, "RoPE").
#include "common.cuh"

namespace {

constexpr int HP = 2;  // heads per thread (docs/benchmarks.md, "RoPE": 4 is slower in bf16)

// Must match `RopeParams` in src/kernels/rope.rs (repr(C)); strides are in elements.
struct RopeParams {
  void* q;
  void* k;
  const void* cos;
  const void* sin;
  int64_t batch, seq, q_heads, k_heads, half;
  int64_t q_sb, q_sh, q_ss, k_sb, k_sh, k_ss;
  int64_t c_sb, c_ss, s_sb, s_ss;
  int32_t backward;
};

// W consecutive elements kept in their storage type (registers stay packed until the math):
// one 16-byte access when W is the vector width, else scalar.
template <typename T, int W> struct Chunk {
  T v[W];
};

template <typename T, int W>
__device__ __forceinline__ Chunk<T, W> load_chunk(const T* p) {
  Chunk<T, W> c;
  if constexpr (W == rf::Vec<T>::N) {
    rf::Vec<T> v = rf::load_vec(p);
#pragma unroll
    for (int j = 0; j < W; ++j) c.v[j] = v.v[j];
  } else {
#pragma unroll
    for (int j = 0; j < W; ++j) c.v[j] = p[j];
  }
  return c;
}

template <typename T, int W>
__device__ __forceinline__ void store_chunk(T* p, const Chunk<T, W>& c) {
  if constexpr (W == rf::Vec<T>::N) {
    rf::Vec<T> v;
#pragma unroll
    for (int j = 0; j < W; ++j) v.v[j] = c.v[j];
    rf::store_vec(p, v);
  } else {
#pragma unroll
    for (int j = 0; j < W; ++j) p[j] = c.v[j];
  }
}

// The two outputs of one rotation with the rounding steps pinned (no compiler contraction
// choice left), so both kernels produce the same bits: o1 = a*c - b*s, o2 = b*c + a*s.
__device__ __forceinline__ float rot_lo(float a, float b, float c, float s) {
  return __fmaf_rn(a, c, -__fmul_rn(b, s));
}
__device__ __forceinline__ float rot_hi(float a, float b, float c, float s) {
  return __fmaf_rn(a, s, __fmul_rn(b, c));
}

// One (position, chunk) of heads h0 .. h0 + HP - 1 (those below `total_heads`): every head's two
// halves are loaded before any math (bytes in flight), then rotated and stored. `row_of(h)` is
// head h's chunk in the first half; `signed_sin(x)` gives the sine as this direction uses it.
template <typename T, int W, typename RowOf, typename SignedSin>
__device__ __forceinline__ void rotate_heads(int64_t h0, int64_t total_heads, int64_t half,
                                             RowOf row_of, const Chunk<T, W>& c1,
                                             const Chunk<T, W>& c2, const Chunk<T, W>& sa,
                                             const Chunk<T, W>& sb, SignedSin signed_sin) {
  T* rows[HP];
  Chunk<T, W> x1[HP], x2[HP];
#pragma unroll
  for (int i = 0; i < HP; ++i) {
    const int64_t h = h0 + i;
    rows[i] = nullptr;
    if (h < total_heads) {
      rows[i] = row_of(h);
      x1[i] = load_chunk<T, W>(rows[i]);
      x2[i] = load_chunk<T, W>(rows[i] + half);
    }
  }
#pragma unroll
  for (int i = 0; i < HP; ++i) {
    if (rows[i] == nullptr) continue;
    Chunk<T, W> o1, o2;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const float a = rf::to_f32(x1[i].v[j]), bv = rf::to_f32(x2[i].v[j]);
      const float s_a = signed_sin(rf::to_f32(sa.v[j]));
      const float s_b = signed_sin(rf::to_f32(sb.v[j]));
      o1.v[j] = rf::from_f32<T>(rot_lo(a, bv, rf::to_f32(c1.v[j]), s_a));
      o2.v[j] = rf::from_f32<T>(rot_hi(a, bv, rf::to_f32(c2.v[j]), s_b));
    }
    store_chunk<T, W>(rows[i], o1);
    store_chunk<T, W>(rows[i] + half, o2);
  }
}

// The fallback: grid-stride loop over (batch, seq, chunk), blockIdx.y picks the head group.
template <typename T, int W>
__device__ void rope_loop_body(const RopeParams& p) {
  const int64_t chunks = p.half / W;
  const int64_t items = p.batch * p.seq * chunks;
  const int64_t total_heads = p.q_heads + p.k_heads;
  const int64_t h0 = (int64_t)blockIdx.y * HP;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  // Backward uses the other half of sin with the opposite sign (see the header).
  const float sign = p.backward ? -1.0f : 1.0f;
  const int64_t sa_off = p.backward ? p.half : 0;  // sin half that multiplies x2 into o1
  const int64_t sb_off = p.backward ? 0 : p.half;  // sin half that multiplies x1 into o2
  const T* cos = static_cast<const T*>(p.cos);
  const T* sin = static_cast<const T*>(p.sin);
  T* q = static_cast<T*>(p.q);
  T* k = static_cast<T*>(p.k);
  for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < items; idx += stride) {
    const int64_t c = idx % chunks;
    const int64_t bs = idx / chunks;
    const int64_t s = bs % p.seq;
    const int64_t b = bs / p.seq;
    const int64_t col = c * W;
    const T* cp = cos + b * p.c_sb + s * p.c_ss + col;
    const T* sp = sin + b * p.s_sb + s * p.s_ss + col;
    const Chunk<T, W> c1 = load_chunk<T, W>(cp), c2 = load_chunk<T, W>(cp + p.half);
    const Chunk<T, W> sa = load_chunk<T, W>(sp + sa_off), sb = load_chunk<T, W>(sp + sb_off);
    auto row_of = [&](int64_t h) {
      return h < p.q_heads ? q + b * p.q_sb + h * p.q_sh + s * p.q_ss + col
                           : k + b * p.k_sb + (h - p.q_heads) * p.k_sh + s * p.k_ss + col;
    };
    rotate_heads<T, W>(h0, total_heads, p.half, row_of, c1, c2, sa, sb,
                       [sign](float x) { return sign * x; });
  }
}

// The fast kernel: the same per-thread work and rounding as `rope_loop_body`, one pass (the
// launcher's grid covers every position, head group and batch), no division.
template <typename T, int W, bool BWD>
__device__ void rope_fast_body(const RopeParams& p) {
  const int64_t s = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
  const int64_t h0 = (int64_t)blockIdx.y * HP;
  const int64_t b = blockIdx.z;
  const int64_t col = (int64_t)threadIdx.x * W;
  if (s >= p.seq || col >= p.half) return;
  const int64_t total_heads = p.q_heads + p.k_heads;
  const int64_t sa_off = BWD ? p.half : 0;
  const int64_t sb_off = BWD ? 0 : p.half;
  const T* cp = static_cast<const T*>(p.cos) + b * p.c_sb + s * p.c_ss + col;
  const T* sp = static_cast<const T*>(p.sin) + b * p.s_sb + s * p.s_ss + col;
  T* q = static_cast<T*>(p.q) + b * p.q_sb + s * p.q_ss + col;
  T* k = static_cast<T*>(p.k) + b * p.k_sb + s * p.k_ss + col;
  const Chunk<T, W> c1 = load_chunk<T, W>(cp), c2 = load_chunk<T, W>(cp + p.half);
  const Chunk<T, W> sa = load_chunk<T, W>(sp + sa_off), sb = load_chunk<T, W>(sp + sb_off);
  auto row_of = [&](int64_t h) {
    return h < p.q_heads ? q + h * p.q_sh : k + (h - p.q_heads) * p.k_sh;
  };
  rotate_heads<T, W>(h0, total_heads, p.half, row_of, c1, c2, sa, sb,
                     [](float x) { return BWD ? -x : x; });
}

template <typename T, int W>
__device__ __forceinline__ void rope_fast(const RopeParams& p) {
  if (p.backward) {
    rope_fast_body<T, W, true>(p);
  } else {
    rope_fast_body<T, W, false>(p);
  }
}

}  // namespace

// One entry per kernel, dtype and access width (separate kernels keep each one's register count
// low). The fast vector entries are capped for 4 blocks of 256 per SM, the fallback vector ones
// for 3 (ptxas meets both without spills).
#define ROPE_ENTRY(SUFFIX, T)                                                                    \
  extern "C" __global__ void __launch_bounds__(256, 4) rope_vec_##SUFFIX(RopeParams p) {         \
    rope_fast<T, rf::Vec<T>::N>(p);                                                              \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(256) rope_scalar_##SUFFIX(RopeParams p) {         \
    rope_fast<T, 1>(p);                                                                          \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(256, 3) rope_loop_vec_##SUFFIX(RopeParams p) {    \
    rope_loop_body<T, rf::Vec<T>::N>(p);                                                         \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(256) rope_loop_scalar_##SUFFIX(RopeParams p) {    \
    rope_loop_body<T, 1>(p);                                                                     \
  }

ROPE_ENTRY(f32, float)
ROPE_ENTRY(f16, __half)
ROPE_ENTRY(bf16, __nv_bfloat16)
