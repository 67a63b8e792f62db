// GeGLU: h = gelu(g) * u, and its backward dg = dh * u * gelu'(g), du = dh * gelu(g).
// Two gelu variants, chosen at compile time (one kernel per variant and dtype):
//   tanh: gelu(x) = x * sigmoid(2y), y = k (x + c x^3), k = sqrt(2/pi), c = 0.044715
//         (0.5 (1 + tanh(y)) == sigmoid(2y), so one __expf and one reciprocal suffice);
//         gelu'(x) = s + x * 2 s (1 - s) * k (1 + 3 c x^2), with s = sigmoid(2y).
//   erf:  gelu(x) = x * Phi(x), Phi(x) = 0.5 (1 + erf(x / sqrt 2));
//         gelu'(x) = Phi(x) + x * exp(-x^2 / 2) / sqrt(2 pi).
// Memory-bound: the grid-stride 16-byte-vector body (consecutive threads on consecutive vectors)
// is rf::gated_fwd / rf::gated_bwd (common.cuh), math in fp32.
#include "common.cuh"

namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// sigmoid(2y) of the tanh form, and 1 - sigmoid(2y) = e * sigmoid(2y) with e = exp(-2y) (no
// cancellation for positive x, where s -> 1). The polynomial input is clamped to |x| <= 20: there
// 2y > 600, so both are already exactly 0 or 1 in fp32, and the clamp keeps x^3 finite for huge
// |x| (an infinite y would turn the backward's `x * s * (1 - s) * ...` into 0 * inf = NaN).
// e = inf (x <= -20) is capped at FLT_MAX so that e * s is 0 * finite = 0.
__device__ __forceinline__ float tanh_gate(float x, float& one_minus) {
  float xc = fminf(fmaxf(x, -20.0f), 20.0f);
  float y = kSqrt2OverPi * xc * (1.0f + kCubic * xc * xc);
  float e = __expf(-2.0f * y);
  float s = __frcp_rn(1.0f + e);
  one_minus = s * fminf(e, 3.402823466e38f);
  return s;
}

template <bool TANH>
__device__ __forceinline__ float gelu(float x) {
  if constexpr (TANH) {
    float unused;
    return x * tanh_gate(x, unused);
  } else {
    return 0.5f * x * (1.0f + erff(x * kInvSqrt2));
  }
}

// gelu(x) into `act` and gelu'(x) into `dact`, sharing the transcendental work.
template <bool TANH>
__device__ __forceinline__ void gelu_and_grad(float x, float& act, float& dact) {
  if constexpr (TANH) {
    float xc = fminf(fmaxf(x, -20.0f), 20.0f);
    float oms;
    float s = tanh_gate(x, oms);
    act = x * s;
    dact = s + x * 2.0f * s * oms * kSqrt2OverPi * (1.0f + 3.0f * kCubic * xc * xc);
  } else {
    float phi_cdf = 0.5f * (1.0f + erff(x * kInvSqrt2));
    act = x * phi_cdf;
    dact = phi_cdf + x * kInvSqrt2Pi * __expf(-0.5f * x * x);
  }
}

template <bool TANH>
struct GeGluFwd {
  __device__ __forceinline__ float operator()(float g, float u) const { return gelu<TANH>(g) * u; }
};

template <bool TANH>
struct GeGluBwd {
  __device__ __forceinline__ void operator()(float dh, float g, float u, float& dg,
                                             float& du) const {
    float act, dact;
    gelu_and_grad<TANH>(g, act, dact);
    du = dh * act;
    dg = dh * u * dact;
  }
};

}  // namespace

// Kernel names: geglu_{tanh,erf}_{fwd,bwd}_{f32,f16,bf16}.
#define GEGLU_ENTRY(VARIANT, TANH, SUFFIX, T)                                                    \
  extern "C" __global__ void __launch_bounds__(256)                                              \
      geglu_##VARIANT##_fwd_##SUFFIX(const T* g, const T* u, T* h, int64_t n, int vec_ok) {      \
    rf::gated_fwd<T, GeGluFwd<TANH>>(g, u, h, n, vec_ok);                                        \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(256) geglu_##VARIANT##_bwd_##SUFFIX(              \
      const T* dh, const T* g, const T* u, T* dg, T* du, int64_t n, int vec_ok) {                \
    rf::gated_bwd<T, GeGluBwd<TANH>>(dh, g, u, dg, du, n, vec_ok);                               \
  }

GEGLU_ENTRY(tanh, true, f32, float)
GEGLU_ENTRY(tanh, true, f16, __half)
GEGLU_ENTRY(tanh, true, bf16, __nv_bfloat16)
GEGLU_ENTRY(erf, false, f32, float)
GEGLU_ENTRY(erf, false, f16, __half)
GEGLU_ENTRY(erf, false, bf16, __nv_bfloat16)
