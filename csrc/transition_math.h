// Per-element math of the denoising transition, for the C++ and CUDA operators.
//
// Torch-free. The formulas are those of python/riskfast/ops/transition.py (which
// owns them; its reference is the oracle of these kernels), written in the same
// order of operations so that float32 results agree closely:
//
//   "epsilon":      x0 = (x_t - sqrt(1 - a) m) / sqrt(a),  eps = m
//   "sample":       x0 = m,  eps = (x_t - sqrt(a) m) / sqrt(1 - a)
//   "v_prediction": x0 = sqrt(a) x_t - sqrt(1 - a) m,  eps = sqrt(a) m + sqrt(1 - a) x_t
//   x0 <- clamp(x0, -clip, clip) (when set, after eps is formed)
//   mean = c_x0 x0 + c_eps eps + c_sample x_t   (a zero coefficient's term is skipped)
#pragma once

#if defined(__CUDACC__)
#define RISKFAST_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always_inline: the CPU loops are compiled per instruction set (transition_cpu_loops.h)
// and these must be inlined into each variant to be vectorised with it.
#define RISKFAST_HD inline __attribute__((always_inline))
#else
#define RISKFAST_HD inline
#endif

namespace riskfast {

constexpr int kPredEpsilon = 0;
constexpr int kPredSample = 1;
constexpr int kPredV = 2;

// The step's scalars in the math type T (float for 16-bit and float32 inputs).
template <typename T>
struct TransitionCoefs {
  T root_a, root_b;                 // sqrt(alpha_prod_t), sqrt(1 - alpha_prod_t)
  T inv_root_a, inv_root_b;         // their reciprocals (the chain rule multiplies)
  T coef_x0, coef_eps, coef_sample;
  T lo, hi;                         // clamp of x0: -clip, clip (or -inf, inf)
  bool use_eps, use_sample;         // coef_eps != 0, coef_sample != 0
};

template <int PRED, typename T>
RISKFAST_HD void predict_original_and_noise(T xt, T m, const TransitionCoefs<T>& c, T& x0,
                                            T& eps) {
  if (PRED == kPredEpsilon) {
    x0 = (xt - c.root_b * m) / c.root_a;
    eps = m;
  } else if (PRED == kPredSample) {
    x0 = m;
    eps = (xt - c.root_a * m) / c.root_b;
  } else {
    x0 = c.root_a * xt - c.root_b * m;
    eps = c.root_a * m + c.root_b * xt;
  }
}

// The mean of x_{t-1}; in_clip says whether x0 lay inside the clamp (gradient passes).
template <int PRED, typename T>
RISKFAST_HD T transition_mean(T xt, T m, const TransitionCoefs<T>& c, bool& in_clip) {
  T x0, eps;
  predict_original_and_noise<PRED>(xt, m, c, x0, eps);
  in_clip = (x0 >= c.lo) & (x0 <= c.hi);  // no short circuit: the loops stay branch-free
  const T clipped = x0 < c.lo ? c.lo : (x0 > c.hi ? c.hi : x0);
  T mean = c.coef_x0 * clipped;
  if (c.use_eps) mean = mean + c.coef_eps * eps;
  if (c.use_sample) mean = mean + c.coef_sample * xt;
  return mean;
}

// Chain rule of transition_mean: from d/d mean to d/d x_t and d/d m.
template <int PRED, typename T>
RISKFAST_HD void transition_mean_backward(T grad_mean, bool in_clip, const TransitionCoefs<T>& c,
                                          T& grad_xt, T& grad_m) {
  // a skipped term (zero coefficient) has a zero product here: no test needed
  const T grad_x0 = in_clip ? c.coef_x0 * grad_mean : T(0);
  const T grad_eps = c.coef_eps * grad_mean;
  const T grad_direct = c.coef_sample * grad_mean;
  if (PRED == kPredEpsilon) {
    const T q = grad_x0 * c.inv_root_a;
    grad_xt = q + grad_direct;
    grad_m = grad_eps - q * c.root_b;
  } else if (PRED == kPredSample) {
    const T q = grad_eps * c.inv_root_b;
    grad_xt = q + grad_direct;
    grad_m = grad_x0 - q * c.root_a;
  } else {
    grad_xt = c.root_a * grad_x0 + c.root_b * grad_eps + grad_direct;
    grad_m = c.root_a * grad_eps - c.root_b * grad_x0;
  }
}

}  // namespace riskfast
