// Cross-entropy rows for large vocabularies: one block per row of `logits [rows, V]` (row stride
// `ld` elements, last dim contiguous), fp32 math, never an fp32 copy of the row.
//   forward:  lse_i = m_i + log s_i (row max m_i, s_i = sum_j e^{l_ij - m_i}) with an online max/sum
//             in one pass over the row; loss_i = (m_i - l_{i,t_i}) + log s_i, 0 where t_i == ignore
//             (NaN for a target outside [0, V)). Not lse_i - l_{i,t_i}: at |l| ~ 1e38 lse rounds
//             to m in fp32 and that difference cancels to 0 (100 tied logits of 2e38: ln 100).
//   backward, in place: l_ij <- T((e^{l_ij - lse_i} - [j == t_i]) * scale_i).
// Each row is walked as a scalar head up to the first 16-byte boundary, then 16-byte vectors
// (consecutive threads on consecutive vectors: coalesced), then a scalar tail; so any row stride
// and any vocabulary size take the vector path for nearly all of the row.
//
// The forward is issue-bound at 16 bits, not memory-bound: a plain loop (two vectors per trip,
// to_f32 + fmaxf + __expf per element; "v1") is 5.75 sm_90 instructions per bf16 byte against
// fp32's 2.97. So it holds four vectors per thread per trip, takes the group max in packed
// bf16x2 / f16x2 (VHMNMX; exact: a max only picks), unpacks bf16 with one SHF or LOP3 and fp16
// with one HADD2.F32 per element, and computes e^(x - m) as ex2.approx.ftz((x - m) * log2e):
// 204 instructions per 64-byte trip, 3.19 per byte, the same for bf16 and fp16 (nvcc 13.0).
// H200, benches/kernels.py, [4096, 128256] in fused_ce chunks, % of device copy bandwidth:
//                  bf16   fp16   fp32
//   v1             76.3   79.9   93.2   run 1
//   v2x4, fused    80.7   80.2   93.7   run 1 (the fused exponent below)
//   v1             76.6   60.5   94.5   run 2 (fp16 low for both kernels in that run only; the
//   v2x4 (this)    81.4   55.1   94.1   run 2  fp16 backward right after it read a normal 82.2)
// Do not fold the subtraction into one FFMA, 2^(x log2e - m log2e) (run 1's v2x4): dropped for
// its precision, not its speed. m log2e rounds by up to |m| 2^-24 in the exponent, a relative
// error in every term that grows with |m| (7e-4 in the loss at |m| ~ 3e4 on the H200; the tests
// at large maxima catch it), and m log2e overflows for |m| above 2.4e38. x - m is exact near the
// max; the FADD it costs per element did not show (bf16 81.4 in run 2 against 80.7).
#include <math.h>

#include "common.cuh"

namespace {

constexpr int MAX_THREADS = 512;

// Running (max, sum of e^{x - max}) pair. `m == -inf` means "nothing finite seen": its sum is 0.
struct MaxSum {
  float m;
  float s;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  // Both without a finite max: the sums are 0, or NaN when a NaN was folded in (fmaxf skips NaN,
  // so only the sum carries it); adding keeps the NaN and avoids -inf - -inf.
  if (m == -INFINITY) return {m, a.s + b.s};
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

// Fold one value into the running pair (the scalar head and tail).
__device__ __forceinline__ void fold_one(MaxSum& acc, float x) {
  if (x > acc.m) {
    acc.s *= __expf(acc.m - x);  // acc.m = -inf gives 0 * e^-inf = 0
    acc.m = x;
  }
  // all -inf so far: the term is 0 (and a NaN x passes through to the sum)
  acc.s += __expf(x - (acc.m == -INFINITY ? 0.0f : acc.m));
}

// Number of leading elements of a row before its first 16-byte boundary (at most `cols`).
template <typename T>
__device__ __forceinline__ int64_t head_len(const T* row, int64_t cols) {
  const int64_t mis = (int64_t)(reinterpret_cast<uintptr_t>(row) & 15);
  const int64_t head = mis == 0 ? 0 : (16 - mis) / (int64_t)sizeof(T);
  return head < cols ? head : cols;
}

// Block-wide combine of every thread's pair; thread 0 gets the row's result.
__device__ __forceinline__ MaxSum block_combine(MaxSum v, float* sm, float* ss) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum w = {__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = combine(v, w);
  }
  const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (nw == 1) return v;
  __syncthreads();  // the previous row's readers of sm/ss are done
  if ((threadIdx.x & 31) == 0) {
    sm[warp] = v.m;
    ss[warp] = v.s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    MaxSum t = {sm[0], ss[0]};
    for (int i = 1; i < nw; ++i) t = combine(t, MaxSum{sm[i], ss[i]});
    v = t;
  }
  return v;
}

// The block's pairs combined; thread 0 writes the row's lse and loss.
template <typename T>
__device__ __forceinline__ void finish_row(MaxSum acc, float* sm, float* ss, const T* row, int64_t r,
                                           const int64_t* __restrict__ tgt, float* __restrict__ lse,
                                           float* __restrict__ loss, int64_t cols, int64_t ignore) {
  acc = block_combine(acc, sm, ss);
  if (threadIdx.x == 0) {
    const float ls = logf(acc.s);
    const float l = isnan(acc.s) ? NAN : (acc.m == -INFINITY ? -INFINITY : acc.m + ls);
    const int64_t t = tgt[r];
    float out = 0.0f;
    // m - x_t first (exact for nearby values), then log s: no cancellation against a huge m.
    // NaN stays NaN (ls); an all -inf row gives -inf - -inf = NaN, as lse - x_t did.
    if (t != ignore) out = (t >= 0 && t < cols) ? (acc.m - rf::to_f32(row[t])) + ls : NAN;
    lse[r] = l;
    loss[r] = out;
  }
}

// ---- Forward (see the top of the file for why it looks like this).
// 16-byte vectors per thread per trip (all loads in flight before the math); the launcher's
// thread count assumes the same (FWD_VECS in src/kernels/cross_entropy.rs).
constexpr int FWD_VECS = 4;
constexpr float LOG2E = 1.4426950408889634f;

// 2^x with the bare MUFU.EX2. Flushing results below 2^-126 to 0 changes nothing: every term is
// taken against the running max, so the sum it joins already holds about 1.
__device__ __forceinline__ float ex2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// A 32-bit word of T: `PER` elements (`NEG_INF`: all of them -inf), their packed max
// (NaN-skipping like fmaxf, exact), unpacked to float exactly as rf::to_f32 does.
template <typename T> struct Word;
template <> struct Word<float> {
  static constexpr int PER = 1;
  static constexpr uint32_t NEG_INF = 0xff800000u;
  static __device__ __forceinline__ uint32_t max(uint32_t a, uint32_t b) {
    return __float_as_uint(fmaxf(__uint_as_float(a), __uint_as_float(b)));
  }
  static __device__ __forceinline__ void unpack(uint32_t w, float (&f)[1]) { f[0] = __uint_as_float(w); }
};
// The 16-bit types: two elements a word, whose packed max is __hmax2 on the pair type `T2`
// (PTX max.f16x2 / max.bf16x2).
template <typename T2> struct PairWord {
  static constexpr int PER = 2;
  static __device__ __forceinline__ uint32_t max(uint32_t a, uint32_t b) {
    const T2 r = __hmax2(*reinterpret_cast<const T2*>(&a), *reinterpret_cast<const T2*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
};
template <> struct Word<__half> : PairWord<__half2> {
  static constexpr uint32_t NEG_INF = 0xfc00fc00u;
  static __device__ __forceinline__ void unpack(uint32_t w, float (&f)[2]) {
    f[0] = __half2float(__ushort_as_half((unsigned short)(w & 0xffffu)));
    f[1] = __half2float(__ushort_as_half((unsigned short)(w >> 16)));
  }
};
template <> struct Word<__nv_bfloat16> : PairWord<__nv_bfloat162> {
  static constexpr uint32_t NEG_INF = 0xff80ff80u;
  // bf16 is the high half of a float: a shift and a mask, one instruction each.
  static __device__ __forceinline__ void unpack(uint32_t w, float (&f)[2]) {
    f[0] = __uint_as_float(w << 16);
    f[1] = __uint_as_float(w & 0xffff0000u);
  }
};

// Fold the `W` words' elements into the running pair (as fold_one, per group, with the bare ex2).
template <typename T, int W>
__device__ __forceinline__ void fold_words(MaxSum& acc, const uint32_t (&w)[W]) {
  using Wd = Word<T>;
  constexpr int P = Wd::PER;
  // Two chains (half the dependent steps, one register more: a tree would hold W copies).
  uint32_t m0 = w[0], m1 = w[1];
#pragma unroll
  for (int k = 2; k < W; k += 2) {
    m0 = Wd::max(m0, w[k]);
    m1 = Wd::max(m1, w[k + 1]);
  }
  float mf[P];
  Wd::unpack(Wd::max(m0, m1), mf);
  float mx = mf[0];
#pragma unroll
  for (int j = 1; j < P; ++j) mx = fmaxf(mx, mf[j]);
  if (mx > acc.m) {
    acc.s *= ex2_ftz((acc.m - mx) * LOG2E);  // acc.m = -inf gives 0 * 0 = 0
    acc.m = mx;
  }
  const float base = acc.m == -INFINITY ? 0.0f : acc.m;  // all -inf so far: every term is 0
  float t0 = -0.0f, t1 = -0.0f;  // two chains (half the dependent adds); -0 + e folds to e
#pragma unroll
  for (int k = 0; k < W; ++k) {
    float f[P];
    Wd::unpack(w[k], f);
#pragma unroll
    for (int j = 0; j < P; ++j) {
      // Subtract first (exact near the max; x - m overflowing to -inf gives 0), then scale.
      const float e = ex2_ftz((f[j] - base) * LOG2E);
      if ((k * P + j) & 1) t1 += e; else t0 += e;
    }
  }
  acc.s += t0 + t1;
}

// One 16-byte vector as 4 words.
__device__ __forceinline__ void words_of(const uint4& q, uint32_t* w) {
  w[0] = q.x;
  w[1] = q.y;
  w[2] = q.z;
  w[3] = q.w;
}

// Forward with `V` 16-byte vectors per thread per trip.
template <typename T, int V>
__device__ void ce_fwd(const T* __restrict__ logits, int64_t ld, const int64_t* __restrict__ tgt,
                       float* __restrict__ lse, float* __restrict__ loss, int64_t rows, int64_t cols,
                       int64_t ignore) {
  constexpr int N = rf::Vec<T>::N;
  __shared__ float sm[MAX_THREADS / 32], ss[MAX_THREADS / 32];
  const int64_t step = blockDim.x;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = logits + r * ld;
    const int64_t head = head_len(row, cols);
    const uint4* __restrict__ body = reinterpret_cast<const uint4*>(row + head);
    const int64_t nvec = (cols - head) / N;
    MaxSum acc = {-INFINITY, 0.0f};
    int64_t v = threadIdx.x;
    for (; v + (V - 1) * step < nvec; v += V * step) {
      uint4 q[V];
#pragma unroll
      for (int i = 0; i < V; ++i) q[i] = body[v + i * step];
      uint32_t w[4 * V];
#pragma unroll
      for (int i = 0; i < V; ++i) words_of(q[i], w + 4 * i);
      fold_words<T, 4 * V>(acc, w);
    }
    // Fewer than V of this thread's vectors left: one more trip, all loads in flight at once,
    // the missing vectors read as -inf (no term, no effect on the max).
    if (v < nvec) {
      uint32_t w[4 * V];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const uint32_t pad = Word<T>::NEG_INF;
        const uint4 q = v + i * step < nvec ? body[v + i * step] : make_uint4(pad, pad, pad, pad);
        words_of(q, w + 4 * i);
      }
      fold_words<T, 4 * V>(acc, w);
    }
    // Scalar head and tail: fewer than 2 * N elements in all.
    const int64_t tail = head + nvec * N;
    const int64_t extra = head + (cols - tail);
    for (int64_t e = threadIdx.x; e < extra; e += blockDim.x) {
      const int64_t c = e < head ? e : tail + (e - head);
      fold_one(acc, rf::to_f32(row[c]));
    }
    finish_row(acc, sm, ss, row, r, tgt, lse, loss, cols, ignore);
  }
}

template <typename T>
__device__ __forceinline__ T grad_one(T x, float l, float s, bool hit) {
  return rf::from_f32<T>((__expf(rf::to_f32(x) - l) - (hit ? 1.0f : 0.0f)) * s);
}

template <typename T>
__device__ void ce_bwd(T* logits, int64_t ld, const float* __restrict__ lse,
                       const int64_t* __restrict__ tgt, const float* __restrict__ scale,
                       int64_t rows, int64_t cols, int64_t ignore) {
  constexpr int N = rf::Vec<T>::N;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    T* row = logits + r * ld;
    const float l = lse[r], s = scale[r];
    // An ignored row, or a target outside [0, cols), subtracts no one-hot (-1 matches no column).
    const int64_t t = tgt[r] == ignore ? -1 : tgt[r];
    const int64_t head = head_len(row, cols);
    T* body = row + head;
    const int64_t nvec = (cols - head) / N;
    int64_t v = threadIdx.x;
    for (; v + blockDim.x < nvec; v += 2 * blockDim.x) {
      const int64_t v1 = v + blockDim.x;
      rf::Vec<T> a = rf::load_vec(body + v * N);
      rf::Vec<T> b = rf::load_vec(body + v1 * N);
      const int64_t c0 = head + v * N, c1 = head + v1 * N;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        a.v[k] = grad_one(a.v[k], l, s, c0 + k == t);
        b.v[k] = grad_one(b.v[k], l, s, c1 + k == t);
      }
      rf::store_vec(body + v * N, a);
      rf::store_vec(body + v1 * N, b);
    }
    if (v < nvec) {
      rf::Vec<T> a = rf::load_vec(body + v * N);
      const int64_t c0 = head + v * N;
#pragma unroll
      for (int k = 0; k < N; ++k) a.v[k] = grad_one(a.v[k], l, s, c0 + k == t);
      rf::store_vec(body + v * N, a);
    }
    const int64_t tail = head + nvec * N;
    const int64_t extra = head + (cols - tail);
    for (int64_t e = threadIdx.x; e < extra; e += blockDim.x) {
      const int64_t c = e < head ? e : tail + (e - head);
      row[c] = grad_one(row[c], l, s, c == t);
    }
  }
}

}  // namespace

// The forward at most 32 registers (4 blocks of 512 per SM, no spills, as the plain loop got by
// itself); a 523-row chunk is then one wave on 132 SMs.
#define CE_ENTRY(SUFFIX, T)                                                                     \
  extern "C" __global__ void __launch_bounds__(MAX_THREADS, 4)                                  \
      cross_entropy_fwd_##SUFFIX(const T* logits, int64_t ld, const int64_t* tgt, float* lse,   \
                                 float* loss, int64_t rows, int64_t cols, int64_t ignore) {     \
    ce_fwd<T, FWD_VECS>(logits, ld, tgt, lse, loss, rows, cols, ignore);                        \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(MAX_THREADS)                                     \
      cross_entropy_bwd_##SUFFIX(T* logits, int64_t ld, const float* lse, const int64_t* tgt,   \
                                 const float* scale, int64_t rows, int64_t cols,                \
                                 int64_t ignore) {                                              \
    ce_bwd<T>(logits, ld, lse, tgt, scale, rows, cols, ignore);                                 \
  }

CE_ENTRY(f32, float)
CE_ENTRY(f16, __half)
CE_ENTRY(bf16, __nv_bfloat16)
