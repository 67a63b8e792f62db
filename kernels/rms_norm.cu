// RMSNorm over the last dimension of a contiguous [rows, cols] tensor, and its backward.
//   rstd = rsqrt(mean(x^2) + eps)       (fp32, one per row, saved for backward)
//   Llama: y = T(T(x * rstd) * w)         (normalized value rounded to T before the weight)
//   Gemma: y = T(x * rstd * (1 + w))      (fp32 all the way, one rounding)
// Backward, with g = dy * w_eff (w_eff = w or 1 + w) and xn = x * rstd:
//   dx = rstd * (g - xn * mean(g * xn)),   dw = sum over rows of dy * xn (Llama: dy * T(xn))
// Residual-add variants (`add_rms_norm_*`, the decoder layer's "h = residual + attn_out; norm(h)"):
//   forward: s = T(x + residual) is written and normalized as x above (s is what the layer adds
//   its MLP output to); backward (frozen weight only): ds_total = T(ds + dx(s)), one rounding,
//   the gradient of both x and residual. One pass each way instead of an add kernel plus a norm.
//
// A group of `group` threads owns one row at a time: a warp (group = 32, narrow rows, several rows
// per block) or the whole block (group = blockDim.x). Thread `lane` of a group always owns the same
// 16-byte vectors of a row (consecutive lanes on consecutive vectors), so its cached x and its dw
// accumulator never move between threads. Fast paths (`fast` = 1, set by the launcher): 16-byte
// aligned rows of whole vectors that fit in the group at K vectors per thread. Generic paths:
// element by element, re-reading from global (L1/L2).
//
// Three kernels, each the winner of an H200 measurement (benches/kernels.py, rows of 4096, 64M
// elements, % of a 1 GiB device copy, cold L2; bf16 / fp16 / fp32):
// * forward (`rms_norm_fwd_*`): 8 vectors of the row per thread in every dtype (128 bytes; 64
//   elements of a 16-bit row) with the weight loaded before the reduction: 90.5 / 90.9 / 95.5.
//   Rejected: 32 elements per thread in every dtype (a 16-bit thread then holds half an fp32
//   thread's bytes): 63.8 / 65.6 / 93.0; the same 8 vectors with the weight loaded after the
//   reduction: 89.4 / 82.8 / 91.8.
// * backward with dw (`rms_norm_bwd_*`): each group sums its rows' dw in registers and writes one
//   fp32 row of `partial` (no atomics: deterministic); the caller reduces `partial` over its rows.
//   The launcher sizes the grid to one wave at the kernel's occupancy: 60.5 / 56.8 / 60.7
//   (rejected: 2048 threads per SM, i.e. several waves with a mostly idle last one: 52.6 / 52.3 /
//   59.2).
// * backward without dw (`rms_norm_bwd_dx{4,8}_*`, frozen weight): x and dy of a row stay in
//   registers between the reduction and the dx pass, one read of each, no partials: 93.8 / 93.7 /
//   75.7.
#include "common.cuh"

namespace {

constexpr int MAX_THREADS = 512;
// Elements of a row one thread holds on the backward-with-dw fast path (K = BWD_ELEMS / N vectors
// of dw accumulators; x and dy are read twice, the second time from cache).
constexpr int BWD_ELEMS = 32;
// 16-byte vectors of a row one thread holds on the forward fast path (`K` of fwd_regs).
constexpr int FWD_VECS = 8;

// Sum of `v` over the group; every thread of the group gets the same value, in a fixed order.
__device__ __forceinline__ float group_sum(float v, int group, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (group == 32) return v;
  const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();  // the previous row's readers of `red` are done
  if ((threadIdx.x & 31) == 0) red[warp] = v;
  __syncthreads();
  float t = 0.0f;
  for (int i = 0; i < nw; ++i) t += red[i];
  return t;
}

struct Groups {
  int lane;     // position in the group
  int64_t id;   // this group's index over the grid (its row of `partial`)
  int64_t n;    // groups in the grid
};

__device__ __forceinline__ Groups groups(int group) {
  const int per_block = blockDim.x / group;
  return {static_cast<int>(threadIdx.x % group),
          (int64_t)blockIdx.x * per_block + threadIdx.x / group, (int64_t)gridDim.x * per_block};
}

template <typename T>
__device__ __forceinline__ T norm_out(float xn, float w, int gemma) {
  // Llama rounds the normalized value to T, then multiplies by the weight (one more rounding).
  return gemma ? rf::from_f32<T>(xn * (1.0f + w))
               : rf::from_f32<T>(rf::to_f32(rf::from_f32<T>(xn)) * w);
}

// buf[k] <- T(buf[k] + res[k]) (the residual sum, rounded as torch's add), stored to `s`.
template <typename T, int K>
__device__ __forceinline__ void add_residual(rf::Vec<T> (&buf)[K], const T* __restrict__ res,
                                             T* __restrict__ s, int lane, int nvec, int group) {
  constexpr int N = rf::Vec<T>::N;
  rf::Vec<T> rv[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int v = lane + k * group;
    if (v < nvec) rv[k] = rf::load_vec(res + v * N);
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int v = lane + k * group;
    if (v < nvec) {
#pragma unroll
      for (int j = 0; j < N; ++j)
        buf[k].v[j] = rf::from_f32<T>(rf::to_f32(buf[k].v[j]) + rf::to_f32(rv[k].v[j]));
      rf::store_vec(s + v * N, buf[k]);
    }
  }
}

// Forward with the row in registers: K vectors of x and K of the weight per thread, all loads
// issued before the reduction. In-row indices are int: the launcher sets `fast` only for
// cols <= K * N * MAX_THREADS.
// ADD: x <- T(x + res) first, written to `s`; the weight is then loaded vector by vector in the
// output pass (L1 hits, as the dx-only backward does) instead of held: x, res and a held weight
// (3K vectors) spill at 128 registers.
template <typename T, int K, bool ADD = false>
__device__ void fwd_regs(const T* __restrict__ x, const T* __restrict__ res,
                         const T* __restrict__ w, T* __restrict__ s, T* __restrict__ y,
                         float* __restrict__ rstd, int64_t rows, int cols, float eps, int gemma,
                         int group, float* red) {
  constexpr int N = rf::Vec<T>::N;
  const Groups gr = groups(group);
  const int nvec = cols / N;
  const float inv_cols = 1.0f / (float)cols;
  for (int64_t r = gr.id; r < rows; r += gr.n) {
    const T* xr = x + r * cols;
    rf::Vec<T> buf[K], wv[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int v = gr.lane + k * group;
      if (v < nvec) buf[k] = rf::load_vec(xr + v * N);
    }
    if constexpr (ADD) add_residual<T, K>(buf, res + r * cols, s + r * cols, gr.lane, nvec, group);
#pragma unroll
    for (int k = 0; k < K && !ADD; ++k) {
      const int v = gr.lane + k * group;
      if (v < nvec) wv[k] = rf::load_vec(w + v * N);
    }
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (gr.lane + k * group < nvec) {
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const float f = rf::to_f32(buf[k].v[j]);
          ss += f * f;
        }
      }
    }
    const float rs = rsqrtf(group_sum(ss, group, red) * inv_cols + eps);
    if (gr.lane == 0) rstd[r] = rs;
    T* yr = y + r * cols;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int v = gr.lane + k * group;
      if (v < nvec) {
        rf::Vec<T> out;
        const rf::Vec<T> wk = ADD ? rf::load_vec(w + v * N) : wv[k];
#pragma unroll
        for (int j = 0; j < N; ++j)
          out.v[j] = norm_out<T>(rf::to_f32(buf[k].v[j]) * rs, rf::to_f32(wk.v[j]), gemma);
        rf::store_vec(yr + v * N, out);
      }
    }
  }
}

// ADD: the residual sum is written to `s` in the first pass and read back (by the thread that
// wrote it) in the second.
template <typename T, bool ADD = false>
__device__ void fwd_generic(const T* __restrict__ x, const T* __restrict__ res,
                            const T* __restrict__ w, T* __restrict__ s, T* __restrict__ y,
                            float* __restrict__ rstd, int64_t rows, int64_t cols, float eps,
                            int gemma, int group, float* red) {
  const Groups gr = groups(group);
  const float inv_cols = 1.0f / (float)cols;
  for (int64_t r = gr.id; r < rows; r += gr.n) {
    const T* xr = ADD ? s + r * cols : x + r * cols;
    float ss = 0.0f;
    for (int64_t c = gr.lane; c < cols; c += group) {
      float f;
      if constexpr (ADD) {
        const T sum = rf::from_f32<T>(rf::to_f32(x[r * cols + c]) + rf::to_f32(res[r * cols + c]));
        s[r * cols + c] = sum;
        f = rf::to_f32(sum);
      } else {
        f = rf::to_f32(xr[c]);
      }
      ss += f * f;
    }
    const float rs = rsqrtf(group_sum(ss, group, red) * inv_cols + eps);
    if (gr.lane == 0) rstd[r] = rs;
    for (int64_t c = gr.lane; c < cols; c += group)
      y[r * cols + c] = norm_out<T>(rf::to_f32(xr[c]) * rs, rf::to_f32(w[c]), gemma);
  }
}

// What the weight multiplied in forward: T(xn) for Llama, xn for Gemma.
template <typename T>
__device__ __forceinline__ float dw_term(float xn, int gemma) {
  return gemma ? xn : rf::to_f32(rf::from_f32<T>(xn));
}

// The 16-byte vectors at element `at` of one row of x and dy, and of the weight.
template <typename T> struct BwdVecs {
  rf::Vec<T> x, dy, w;
};
template <typename T>
__device__ __forceinline__ BwdVecs<T> load_bwd_vecs(const T* xr, const T* dyr, const T* w,
                                                    int64_t at) {
  return {rf::load_vec(xr + at), rf::load_vec(dyr + at), rf::load_vec(w + at)};
}

template <typename T>
__device__ void bwd_fast(const T* __restrict__ dy, const T* __restrict__ x,
                         const T* __restrict__ w, const float* __restrict__ rstd,
                         T* __restrict__ dx, float* __restrict__ partial, int64_t rows,
                         int64_t cols, int gemma, int group, float* red) {
  constexpr int N = rf::Vec<T>::N, K = BWD_ELEMS / N;
  const Groups gr = groups(group);
  const int64_t nvec = cols / N;
  const float inv_cols = 1.0f / (float)cols;
  const float w_add = gemma ? 1.0f : 0.0f;
  float acc[K][N];
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int j = 0; j < N; ++j) acc[k][j] = 0.0f;

  for (int64_t r = gr.id; r < rows; r += gr.n) {
    const T* xr = x + r * cols;
    const T* dyr = dy + r * cols;
    const float rs = rstd[r];
    float dot = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t v = gr.lane + (int64_t)k * group;
      if (v < nvec) {
        const auto [xb, gb, wv] = load_bwd_vecs(xr, dyr, w, v * N);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const float xn = rf::to_f32(xb.v[j]) * rs, d = rf::to_f32(gb.v[j]);
          dot += d * (rf::to_f32(wv.v[j]) + w_add) * xn;
          acc[k][j] += d * dw_term<T>(xn, gemma);
        }
      }
    }
    const float mean_dot = group_sum(dot, group, red) * inv_cols;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t v = gr.lane + (int64_t)k * group;
      if (v < nvec) {
        // Second read of x, dy and w by the same thread: cache hits, not DRAM traffic (holding
        // them in registers as well as the dw accumulator would cost occupancy or spill).
        const auto [xb, gb, wv] = load_bwd_vecs(xr, dyr, w, v * N);
        rf::Vec<T> out;
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const float xn = rf::to_f32(xb.v[j]) * rs;
          const float g = rf::to_f32(gb.v[j]) * (rf::to_f32(wv.v[j]) + w_add);
          out.v[j] = rf::from_f32<T>(rs * (g - xn * mean_dot));
        }
        rf::store_vec(dx + r * cols + v * N, out);
      }
    }
  }
  // Every group writes its whole partial row (zeros when it had no rows).
  float* pr = partial + gr.id * cols;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t v = gr.lane + (int64_t)k * group;
    if (v < nvec) {
#pragma unroll
      for (int j = 0; j < N; j += 4)  // N is 4 or 8: whole float4 stores, 16-byte aligned
        *reinterpret_cast<float4*>(pr + v * N + j) =
            make_float4(acc[k][j], acc[k][j + 1], acc[k][j + 2], acc[k][j + 3]);
    }
  }
}

// ADD (with DW = false): dx += ds before the one rounding.
template <typename T, bool DW = true, bool ADD = false>
__device__ void bwd_generic(const T* __restrict__ dy, const T* __restrict__ x,
                            const T* __restrict__ w, const float* __restrict__ rstd,
                            T* __restrict__ dx, float* __restrict__ partial, int64_t rows,
                            int64_t cols, int gemma, int group, float* red,
                            const T* __restrict__ ds = nullptr) {
  const Groups gr = groups(group);
  const float inv_cols = 1.0f / (float)cols;
  const float w_add = gemma ? 1.0f : 0.0f;
  // Each thread touches only its own columns of its own partial row: no synchronization needed.
  float* pr = DW ? partial + gr.id * cols : nullptr;
  if constexpr (DW)
    for (int64_t c = gr.lane; c < cols; c += group) pr[c] = 0.0f;
  for (int64_t r = gr.id; r < rows; r += gr.n) {
    const T* xr = x + r * cols;
    const T* dyr = dy + r * cols;
    const float rs = rstd[r];
    float dot = 0.0f;
    for (int64_t c = gr.lane; c < cols; c += group) {
      const float xn = rf::to_f32(xr[c]) * rs, d = rf::to_f32(dyr[c]);
      dot += d * (rf::to_f32(w[c]) + w_add) * xn;
      if constexpr (DW) pr[c] += d * dw_term<T>(xn, gemma);
    }
    const float mean_dot = group_sum(dot, group, red) * inv_cols;
    for (int64_t c = gr.lane; c < cols; c += group) {
      const float xn = rf::to_f32(xr[c]) * rs;
      const float g = rf::to_f32(dyr[c]) * (rf::to_f32(w[c]) + w_add);
      const float d = rs * (g - xn * mean_dot);
      dx[r * cols + c] = rf::from_f32<T>(ADD ? d + rf::to_f32(ds[r * cols + c]) : d);
    }
  }
}

// Backward without dw (frozen weight): x and dy of the row stay in registers between the
// reduction and the dx pass, so each is read once from DRAM and nothing but dx is written. The
// weight is loaded in both passes instead of held (L1 hits: one row shared by every block), which
// keeps the 16-bit K=4 kernel at 63 registers rather than 77 (8 blocks of 128 per SM, not 6).
// ADD: the residual sum's own gradient `ds` is read in the dx pass (not held across the
// reduction) and added before the one rounding.
template <typename T, int K, bool ADD = false>
__device__ void bwd_dx_regs(const T* __restrict__ dy, const T* __restrict__ x,
                            const T* __restrict__ w, const float* __restrict__ rstd,
                            T* __restrict__ dx, int64_t rows, int cols, int gemma, int group,
                            float* red, const T* __restrict__ ds = nullptr) {
  constexpr int N = rf::Vec<T>::N;
  const Groups gr = groups(group);
  const int nvec = cols / N;
  const float inv_cols = 1.0f / (float)cols;
  const float w_add = gemma ? 1.0f : 0.0f;
  for (int64_t r = gr.id; r < rows; r += gr.n) {
    const T* xr = x + r * cols;
    const T* dyr = dy + r * cols;
    const float rs = rstd[r];
    rf::Vec<T> xb[K], gb[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int v = gr.lane + k * group;
      if (v < nvec) {
        xb[k] = rf::load_vec(xr + v * N);
        gb[k] = rf::load_vec(dyr + v * N);
      }
    }
    float dot = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int v = gr.lane + k * group;
      if (v < nvec) {
        const rf::Vec<T> wd = rf::load_vec(w + v * N);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const float xn = rf::to_f32(xb[k].v[j]) * rs, d = rf::to_f32(gb[k].v[j]);
          dot += d * (rf::to_f32(wd.v[j]) + w_add) * xn;
        }
      }
    }
    const float mean_dot = group_sum(dot, group, red) * inv_cols;
    T* dxr = dx + r * cols;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int v = gr.lane + k * group;
      if (v < nvec) {
        rf::Vec<T> out, db;
        const rf::Vec<T> wk = rf::load_vec(w + v * N);
        if constexpr (ADD) db = rf::load_vec(ds + r * cols + v * N);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const float xn = rf::to_f32(xb[k].v[j]) * rs;
          const float g = rf::to_f32(gb[k].v[j]) * (rf::to_f32(wk.v[j]) + w_add);
          const float d = rs * (g - xn * mean_dot);  // not `+ 0.0f` without ADD: -0 would change
          out.v[j] = rf::from_f32<T>(ADD ? d + rf::to_f32(db.v[j]) : d);
        }
        rf::store_vec(dxr + v * N, out);
      }
    }
  }
}

}  // namespace

// `group` is 32 or blockDim.x (a multiple of 32, at most MAX_THREADS); `fast` is set by the
// launcher only when every pointer is 16-byte aligned, cols is a multiple of the vector width and
// the row fits in the group at the entry's vectors per thread (forward: FWD_VECS; backward with
// dw: BWD_ELEMS elements; dx-only: the 4 or 8 vectors of its name).
#define RMS_NORM_ENTRIES(SUFFIX, T)                                                              \
  extern "C" __global__ void __launch_bounds__(MAX_THREADS)                                      \
      rms_norm_fwd_##SUFFIX(const T* x, const T* w, T* y, float* rstd, int64_t rows,             \
                            int64_t cols, float eps, int gemma, int group, int fast) {           \
    __shared__ float red[MAX_THREADS / 32];                                                      \
    if (fast)                                                                                    \
      fwd_regs<T, FWD_VECS>(x, nullptr, w, nullptr, y, rstd, rows, (int)cols, eps, gemma, group, \
                            red);                                                                \
    else                                                                                         \
      fwd_generic<T>(x, nullptr, w, nullptr, y, rstd, rows, cols, eps, gemma, group, red);       \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(MAX_THREADS) rms_norm_bwd_##SUFFIX(               \
      const T* dy, const T* x, const T* w, const float* rstd, T* dx, float* partial,             \
      int64_t rows, int64_t cols, int gemma, int group, int fast) {                              \
    __shared__ float red[MAX_THREADS / 32];                                                      \
    if (fast)                                                                                    \
      bwd_fast<T>(dy, x, w, rstd, dx, partial, rows, cols, gemma, group, red);                   \
    else                                                                                         \
      bwd_generic<T>(dy, x, w, rstd, dx, partial, rows, cols, gemma, group, red);                \
  }                                                                                              \
  RMS_NORM_DX(rms_norm_bwd_dx8_##SUFFIX, T, 8)                                                   \
  extern "C" __global__ void __launch_bounds__(MAX_THREADS) add_rms_norm_fwd_##SUFFIX(           \
      const T* x, const T* res, const T* w, T* s, T* y, float* rstd, int64_t rows, int64_t cols, \
      float eps, int gemma, int group, int fast) {                                               \
    __shared__ float red[MAX_THREADS / 32];                                                      \
    if (fast)                                                                                    \
      fwd_regs<T, FWD_VECS, true>(x, res, w, s, y, rstd, rows, (int)cols, eps, gemma, group,     \
                                  red);                                                          \
    else                                                                                         \
      fwd_generic<T, true>(x, res, w, s, y, rstd, rows, cols, eps, gemma, group, red);           \
  }                                                                                              \
  ADD_RMS_NORM_DX(add_rms_norm_bwd_dx8_##SUFFIX, T, 8)

#define RMS_NORM_DX(NAME, T, K)                                                                  \
  extern "C" __global__ void __launch_bounds__(MAX_THREADS)                                      \
      NAME(const T* dy, const T* x, const T* w, const float* rstd, T* dx, int64_t rows,          \
           int64_t cols, int gemma, int group, int fast) {                                       \
    __shared__ float red[MAX_THREADS / 32];                                                      \
    if (fast)                                                                                    \
      bwd_dx_regs<T, K>(dy, x, w, rstd, dx, rows, (int)cols, gemma, group, red);                 \
    else                                                                                         \
      bwd_generic<T, false>(dy, x, w, rstd, dx, nullptr, rows, cols, gemma, group, red);         \
  }

// The residual-add backward: dy, ds, the saved sum s, w, rstd -> the gradient of x and residual.
#define ADD_RMS_NORM_DX(NAME, T, K)                                                              \
  extern "C" __global__ void __launch_bounds__(MAX_THREADS)                                      \
      NAME(const T* dy, const T* ds, const T* s, const T* w, const float* rstd, T* dx,           \
           int64_t rows, int64_t cols, int gemma, int group, int fast) {                         \
    __shared__ float red[MAX_THREADS / 32];                                                      \
    if (fast)                                                                                    \
      bwd_dx_regs<T, K, true>(dy, s, w, rstd, dx, rows, (int)cols, gemma, group, red, ds);       \
    else                                                                                         \
      bwd_generic<T, false, true>(dy, s, w, rstd, dx, nullptr, rows, cols, gemma, group, red,    \
                                  ds);                                                           \
  }

RMS_NORM_ENTRIES(f32, float)
RMS_NORM_ENTRIES(f16, __half)
RMS_NORM_ENTRIES(bf16, __nv_bfloat16)
// dx-only with 4 vectors each of x and dy per thread for 16-bit rows of up to 32 x 512 elements
// (63 registers); fp32 always takes dx8 (104 registers): about 128 KB of reads in flight per SM
// either way.
RMS_NORM_DX(rms_norm_bwd_dx4_f16, __half, 4)
RMS_NORM_DX(rms_norm_bwd_dx4_bf16, __nv_bfloat16, 4)
ADD_RMS_NORM_DX(add_rms_norm_bwd_dx4_f16, __half, 4)
ADD_RMS_NORM_DX(add_rms_norm_bwd_dx4_bf16, __nv_bfloat16, 4)
