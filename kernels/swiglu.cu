// SwiGLU: h = silu(g) * u, and its backward
//   dg = dh * u * s * (1 + g * (1 - s)),  du = dh * g * s,  with s = sigmoid(g).
// Memory-bound: the grid-stride 16-byte-vector body is rf::gated_fwd / rf::gated_bwd (common.cuh).
#include "common.cuh"

namespace {

struct SwiGluFwd {
  __device__ __forceinline__ float operator()(float g, float u) const {
    return g * rf::sigmoidf_fast(g) * u;
  }
};

struct SwiGluBwd {
  __device__ __forceinline__ void operator()(float dh, float g, float u, float& dg,
                                             float& du) const {
    float s = rf::sigmoidf_fast(g);
    du = dh * g * s;
    dg = dh * u * s * (1.0f + g * (1.0f - s));
  }
};

}  // namespace

#define SWIGLU_ENTRY(SUFFIX, T)                                                                  \
  extern "C" __global__ void __launch_bounds__(256)                                              \
      swiglu_fwd_##SUFFIX(const T* g, const T* u, T* h, int64_t n, int vec_ok) {                 \
    rf::gated_fwd<T, SwiGluFwd>(g, u, h, n, vec_ok);                                             \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(256) swiglu_bwd_##SUFFIX(                         \
      const T* dh, const T* g, const T* u, T* dg, T* du, int64_t n, int vec_ok) {                \
    rf::gated_bwd<T, SwiGluBwd>(dh, g, u, dg, du, n, vec_ok);                                    \
  }

SWIGLU_ENTRY(f32, float)
SWIGLU_ENTRY(f16, __half)
SWIGLU_ENTRY(bf16, __nv_bfloat16)
