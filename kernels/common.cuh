// Shared helpers for rslora_fast kernels: dtype conversion and 16-byte vector access.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace rf {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Elements of T in one 16-byte vector.
template <typename T> struct Vec {
  static constexpr int N = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[N];
  };
};

template <typename T> __device__ __forceinline__ Vec<T> load_vec(const T* p) {
  Vec<T> r;
  r.raw = *reinterpret_cast<const uint4*>(p);
  return r;
}

template <typename T> __device__ __forceinline__ void store_vec(T* p, const Vec<T>& r) {
  *reinterpret_cast<uint4*>(p) = r.raw;
}

// 1 / (1 + e^-x) with a hardware exp and an IEEE reciprocal (no full-precision divide, which
// costs a slow-path branch per element); e^-x = inf gives exactly 0.
__device__ __forceinline__ float sigmoidf_fast(float x) { return __frcp_rn(1.0f + __expf(-x)); }

// How a 1-D grid-stride kernel splits `n` elements: whole 16-byte vectors [0, nvec) when `vec_ok`
// (none otherwise), then the elements from nvec * Vec<T>::N one by one; this thread starts at `tid`.
struct VecSplit {
  int64_t tid, stride, nvec;
};
template <typename T>
__device__ __forceinline__ VecSplit vec_split(int64_t n, int vec_ok) {
  return {(int64_t)blockIdx.x * blockDim.x + threadIdx.x, (int64_t)gridDim.x * blockDim.x,
          vec_ok ? n / Vec<T>::N : 0};
}

// Grid-stride body of a gated activation (SwiGLU, GeGLU): `h = Op{}(g, u)` elementwise, math in
// fp32. Each thread moves 16-byte vectors when `vec_ok` (every pointer 16-byte aligned); the
// scalar tail, and the whole tensor when unaligned, goes element by element.
template <typename T, typename Op>
__device__ void gated_fwd(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ h,
                          int64_t n, int vec_ok) {
  const Op op{};
  constexpr int N = Vec<T>::N;
  const VecSplit sp = vec_split<T>(n, vec_ok);
  const int64_t stride = sp.stride;
  // Two vectors per thread per trip, loads issued before any math: more bytes in flight.
  int64_t v = sp.tid;
  for (; v + stride < sp.nvec; v += 2 * stride) {
    Vec<T> g0 = load_vec(g + v * N), u0 = load_vec(u + v * N);
    Vec<T> g1 = load_vec(g + (v + stride) * N), u1 = load_vec(u + (v + stride) * N);
    Vec<T> h0, h1;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      h0.v[k] = from_f32<T>(op(to_f32(g0.v[k]), to_f32(u0.v[k])));
      h1.v[k] = from_f32<T>(op(to_f32(g1.v[k]), to_f32(u1.v[k])));
    }
    store_vec(h + v * N, h0);
    store_vec(h + (v + stride) * N, h1);
  }
  for (; v < sp.nvec; v += stride) {
    Vec<T> gv = load_vec(g + v * N), uv = load_vec(u + v * N), hv;
#pragma unroll
    for (int k = 0; k < N; ++k) hv.v[k] = from_f32<T>(op(to_f32(gv.v[k]), to_f32(uv.v[k])));
    store_vec(h + v * N, hv);
  }
  for (int64_t i = sp.nvec * N + sp.tid; i < n; i += stride) {
    h[i] = from_f32<T>(op(to_f32(g[i]), to_f32(u[i])));
  }
}

// The backward of `gated_fwd`: `Op{}(dh, g, u, dg, du)` elementwise, same layout and tail.
template <typename T, typename Op>
__device__ void gated_bwd(const T* __restrict__ dh, const T* __restrict__ g,
                          const T* __restrict__ u, T* __restrict__ dg, T* __restrict__ du,
                          int64_t n, int vec_ok) {
  const Op op{};
  constexpr int N = Vec<T>::N;
  const VecSplit sp = vec_split<T>(n, vec_ok);
  for (int64_t v = sp.tid; v < sp.nvec; v += sp.stride) {
    Vec<T> dhv = load_vec(dh + v * N), gv = load_vec(g + v * N), uv = load_vec(u + v * N);
    Vec<T> dgv, duv;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float a, b;
      op(to_f32(dhv.v[k]), to_f32(gv.v[k]), to_f32(uv.v[k]), a, b);
      dgv.v[k] = from_f32<T>(a);
      duv.v[k] = from_f32<T>(b);
    }
    store_vec(dg + v * N, dgv);
    store_vec(du + v * N, duv);
  }
  for (int64_t i = sp.nvec * N + sp.tid; i < n; i += sp.stride) {
    float a, b;
    op(to_f32(dh[i]), to_f32(g[i]), to_f32(u[i]), a, b);
    dg[i] = from_f32<T>(a);
    du[i] = from_f32<T>(b);
  }
}

}  // namespace rf
