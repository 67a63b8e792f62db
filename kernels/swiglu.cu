// SwiGLU: h = silu(g) * u, and its backward
//   dg = dh * u * s * (1 + g * (1 - s)),  du = dh * g * s,  with s = sigmoid(g).
// Memory-bound: each thread moves 16-byte vectors (grid-stride), math in fp32.
// `vec_ok` says every pointer is 16-byte aligned, so the vector body is legal; the scalar
// tail (and the whole tensor when unaligned) is done element by element.
#include "common.cuh"

namespace {

template <typename T>
__device__ __forceinline__ void fwd_one(const T* g, const T* u, T* h, int64_t i) {
  float gv = rf::to_f32(g[i]);
  h[i] = rf::from_f32<T>(gv * rf::sigmoidf_fast(gv) * rf::to_f32(u[i]));
}

template <typename T>
__device__ void swiglu_fwd(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ h,
                           int64_t n, int vec_ok) {
  constexpr int N = rf::Vec<T>::N;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec_ok) {
    const int64_t nvec = n / N;
    // Two vectors per thread per trip, loads issued before any math: more bytes in flight.
    int64_t v = tid;
    for (; v + stride < nvec; v += 2 * stride) {
      rf::Vec<T> g0 = rf::load_vec(g + v * N), u0 = rf::load_vec(u + v * N);
      rf::Vec<T> g1 = rf::load_vec(g + (v + stride) * N), u1 = rf::load_vec(u + (v + stride) * N);
      rf::Vec<T> h0, h1;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        float x0 = rf::to_f32(g0.v[k]), x1 = rf::to_f32(g1.v[k]);
        h0.v[k] = rf::from_f32<T>(x0 * rf::sigmoidf_fast(x0) * rf::to_f32(u0.v[k]));
        h1.v[k] = rf::from_f32<T>(x1 * rf::sigmoidf_fast(x1) * rf::to_f32(u1.v[k]));
      }
      rf::store_vec(h + v * N, h0);
      rf::store_vec(h + (v + stride) * N, h1);
    }
    for (; v < nvec; v += stride) {
      rf::Vec<T> gv = rf::load_vec(g + v * N), uv = rf::load_vec(u + v * N), hv;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        float x = rf::to_f32(gv.v[k]);
        hv.v[k] = rf::from_f32<T>(x * rf::sigmoidf_fast(x) * rf::to_f32(uv.v[k]));
      }
      rf::store_vec(h + v * N, hv);
    }
    done = nvec * N;
  }
  for (int64_t i = done + tid; i < n; i += stride) fwd_one(g, u, h, i);
}

template <typename T>
__device__ __forceinline__ void bwd_math(float dh, float g, float u, float& dg, float& du) {
  float s = rf::sigmoidf_fast(g);
  du = dh * g * s;
  dg = dh * u * s * (1.0f + g * (1.0f - s));
}

template <typename T>
__device__ void swiglu_bwd(const T* __restrict__ dh, const T* __restrict__ g,
                           const T* __restrict__ u, T* __restrict__ dg, T* __restrict__ du,
                           int64_t n, int vec_ok) {
  constexpr int N = rf::Vec<T>::N;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec_ok) {
    const int64_t nvec = n / N;
    for (int64_t v = tid; v < nvec; v += stride) {
      rf::Vec<T> dhv = rf::load_vec(dh + v * N), gv = rf::load_vec(g + v * N),
                 uv = rf::load_vec(u + v * N), dgv, duv;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        float a, b;
        bwd_math<T>(rf::to_f32(dhv.v[k]), rf::to_f32(gv.v[k]), rf::to_f32(uv.v[k]), a, b);
        dgv.v[k] = rf::from_f32<T>(a);
        duv.v[k] = rf::from_f32<T>(b);
      }
      rf::store_vec(dg + v * N, dgv);
      rf::store_vec(du + v * N, duv);
    }
    done = nvec * N;
  }
  for (int64_t i = done + tid; i < n; i += stride) {
    float a, b;
    bwd_math<T>(rf::to_f32(dh[i]), rf::to_f32(g[i]), rf::to_f32(u[i]), a, b);
    dg[i] = rf::from_f32<T>(a);
    du[i] = rf::from_f32<T>(b);
  }
}

}  // namespace

#define SWIGLU_ENTRY(SUFFIX, T)                                                                  \
  extern "C" __global__ void __launch_bounds__(256)                                              \
      swiglu_fwd_##SUFFIX(const T* g, const T* u, T* h, int64_t n, int vec_ok) {                 \
    swiglu_fwd<T>(g, u, h, n, vec_ok);                                                           \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(256) swiglu_bwd_##SUFFIX(                         \
      const T* dh, const T* g, const T* u, T* dg, T* du, int64_t n, int vec_ok) {                \
    swiglu_bwd<T>(dh, g, u, dg, du, n, vec_ok);                                                  \
  }

SWIGLU_ENTRY(f32, float)
SWIGLU_ENTRY(f16, __half)
SWIGLU_ENTRY(bf16, __nv_bfloat16)
