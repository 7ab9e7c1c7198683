// The fused transition log-density on the CPU: riskfast::transition_log_prob, its
// backward, and riskfast::transition_log_prob_into_ (schemas in ops_schema.cpp).
//
// One pass over (x_prev, x_t, model_output): the mean of x_{t-1} (transition_math.h)
// and the squared distance to x_prev, summed per sample in float64 over chunks of a
// fixed length, then added in chunk order (the result does not depend on the thread
// count). Math in float32 for 16-bit and float32 inputs, float64 for float64. The
// loops are compiled for baseline x86-64, AVX2 and AVX-512 and chosen at run time.
// Inputs must share one dtype; a non-contiguous input is copied first.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "op_checks.h"
#include "transition_math.h"

// The inner loops, once per instruction set (see transition_cpu_loops.h).
namespace riskfast {
#define RISKFAST_LOOPS_NS loops_base
#include "transition_cpu_loops.h"
#undef RISKFAST_LOOPS_NS
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define RISKFAST_LOOPS_NS loops_avx2
#include "transition_cpu_loops.h"
#undef RISKFAST_LOOPS_NS
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#define RISKFAST_LOOPS_NS loops_avx512
#include "transition_cpu_loops.h"
#undef RISKFAST_LOOPS_NS
#pragma GCC pop_options
#endif
}  // namespace riskfast

namespace riskfast {
namespace {

// Elements per task: fixed, so the order of the float64 sums is too.
constexpr int64_t kRowChunk = 16384;

template <typename scalar_t>
using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename T>
TransitionCoefs<T> make_coefs(const TransitionScalars& s) {
  TransitionCoefs<T> c;
  // Python floats entering float32 tensor ops are rounded to float32 first; so here.
  c.root_a = static_cast<T>(std::sqrt(s.alpha_prod_t));
  c.root_b = static_cast<T>(std::sqrt(1.0 - s.alpha_prod_t));
  c.inv_root_a = static_cast<T>(1.0 / std::sqrt(s.alpha_prod_t));
  c.inv_root_b = static_cast<T>(1.0 / std::sqrt(1.0 - s.alpha_prod_t));
  c.coef_x0 = static_cast<T>(s.coef_x0);
  c.coef_eps = static_cast<T>(s.coef_eps);
  c.coef_sample = static_cast<T>(s.coef_sample);
  const T inf = std::numeric_limits<T>::infinity();
  c.lo = s.has_clip ? static_cast<T>(-s.clip_range) : -inf;
  c.hi = s.has_clip ? static_cast<T>(s.clip_range) : inf;
  c.use_eps = s.coef_eps != 0.0;
  c.use_sample = s.coef_sample != 0.0;
  return c;
}

template <typename F>
void dispatch_floating(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", dtype);
  }
}

template <typename F>
void dispatch_prediction(Prediction p, F&& f) {
  switch (p) {
    case Prediction::kEpsilon: return f(std::integral_constant<int, kPredEpsilon>{});
    case Prediction::kSample: return f(std::integral_constant<int, kPredSample>{});
    case Prediction::kVPrediction: return f(std::integral_constant<int, kPredV>{});
  }
}

enum class Isa { kAvx512, kAvx2, kBase };

Isa detect_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

Isa cpu_isa() {
  static const Isa isa = detect_isa();  // a fixed property of the machine
  return isa;
}

template <typename scalar_t>
using ForwardFn = double (*)(const scalar_t*, const scalar_t*, const scalar_t*, int64_t,
                             const TransitionCoefs<math_t<scalar_t>>&, math_t<scalar_t>*);
template <typename scalar_t>
using BackwardFn = void (*)(const scalar_t*, const scalar_t*, const scalar_t*,
                            const math_t<scalar_t>*, int64_t,
                            const TransitionCoefs<math_t<scalar_t>>&, math_t<scalar_t>,
                            scalar_t*, scalar_t*, scalar_t*);

template <int PRED, typename scalar_t>
ForwardFn<scalar_t> forward_loop() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_isa() == Isa::kAvx512) return &loops_avx512::forward_chunk<PRED, scalar_t>;
  if (cpu_isa() == Isa::kAvx2) return &loops_avx2::forward_chunk<PRED, scalar_t>;
#endif
  return &loops_base::forward_chunk<PRED, scalar_t>;
}

// The backward loop for inputs of scalar_t and the wanted gradients (bits 0, 1, 2:
// x_prev, x_t, model_output; at least one set): for float32 a loop per set of wanted
// gradients, writing straight to the outputs (transition_cpu_loops.h).
template <int PRED, typename scalar_t>
BackwardFn<scalar_t> backward_loop(int want) {
  if constexpr (std::is_same_v<scalar_t, float>) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_isa() == Isa::kAvx512) return loops_avx512::backward_f32_for<PRED>(want);
    if (cpu_isa() == Isa::kAvx2) return loops_avx2::backward_f32_for<PRED>(want);
#endif
    return loops_base::backward_f32_for<PRED>(want);
  } else {
    (void)want;  // the generic loop tests each output pointer per tile
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_isa() == Isa::kAvx512) return &loops_avx512::backward_chunk<PRED, scalar_t>;
    if (cpu_isa() == Isa::kAvx2) return &loops_avx2::backward_chunk<PRED, scalar_t>;
#endif
    return &loops_base::backward_chunk<PRED, scalar_t>;
  }
}

// Per-sample log-densities (float64) of contiguous [B, D] inputs; the mean too if asked.
template <typename scalar_t>
std::vector<double> forward_rows(const at::Tensor& x_prev, const at::Tensor& sample,
                                 const at::Tensor& model_output, const TransitionScalars& s,
                                 math_t<scalar_t>* mean_out) {
  using T = math_t<scalar_t>;
  const int64_t batch = sample.size(0);
  const int64_t dims = batch == 0 ? 0 : sample.numel() / batch;
  const int64_t chunks = std::max<int64_t>((dims + kRowChunk - 1) / kRowChunk, 1);
  std::vector<double> partial(static_cast<size_t>(batch * chunks), 0.0);
  const scalar_t* xp = x_prev.const_data_ptr<scalar_t>();
  const scalar_t* xt = sample.const_data_ptr<scalar_t>();
  const scalar_t* m = model_output.const_data_ptr<scalar_t>();
  const TransitionCoefs<T> c = make_coefs<T>(s);
  dispatch_prediction(s.prediction, [&](auto pred) {
    const ForwardFn<scalar_t> forward = forward_loop<decltype(pred)::value, scalar_t>();
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks, k = task % chunks;
        const int64_t lo = b * dims + k * kRowChunk;
        const int64_t n = std::min(kRowChunk, dims - k * kRowChunk);
        partial[task] = forward(xp + lo, xt + lo, m + lo, n, c,
                                mean_out == nullptr ? nullptr : mean_out + lo);
      }
    });
  });
  std::vector<double> log_prob(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) {
    double squares = 0.0;
    for (int64_t k = 0; k < chunks; ++k) squares += partial[b * chunks + k];
    log_prob[b] = gaussian_log_density_from_squares(squares, dims, s);
  }
  return log_prob;
}

std::tuple<at::Tensor, at::Tensor> transition_log_prob_cpu(
    const at::Tensor& x_prev, const at::Tensor& sample, const at::Tensor& model_output,
    double alpha_prod_t, double coef_x0, double coef_eps, double coef_sample, double sigma,
    c10::string_view prediction_type, std::optional<double> clip_range, c10::string_view reduce,
    bool return_mean) {
  check_transition_tensors(x_prev, sample, model_output);
  const TransitionScalars s = check_transition_scalars(
      alpha_prod_t, coef_x0, coef_eps, coef_sample, sigma, prediction_type, clip_range, reduce);
  const at::Tensor xp = x_prev.contiguous(), xt = sample.contiguous(),
                   m = model_output.contiguous();
  const auto options = sample.options().dtype(transition_math_dtype(sample));
  at::Tensor log_prob = at::empty({sample.size(0)}, options);
  at::Tensor mean = return_mean ? at::empty(sample.sizes(), options) : at::empty({0}, options);
  dispatch_floating(sample.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using T = math_t<scalar_t>;
    const std::vector<double> rows =
        forward_rows<scalar_t>(xp, xt, m, s, return_mean ? mean.data_ptr<T>() : nullptr);
    T* out = log_prob.data_ptr<T>();
    for (size_t b = 0; b < rows.size(); ++b) out[b] = static_cast<T>(rows[b]);
  });
  return {log_prob, mean};
}

void transition_log_prob_into_cpu(at::Tensor& log_probs, int64_t step, const at::Tensor& x_prev,
                                  const at::Tensor& sample, const at::Tensor& model_output,
                                  double alpha_prod_t, double coef_x0, double coef_eps,
                                  double coef_sample, double sigma,
                                  c10::string_view prediction_type,
                                  std::optional<double> clip_range, c10::string_view reduce) {
  check_transition_tensors(x_prev, sample, model_output);
  const TransitionScalars s = check_transition_scalars(
      alpha_prod_t, coef_x0, coef_eps, coef_sample, sigma, prediction_type, clip_range, reduce);
  check_log_prob_buffer(log_probs, step, sample);
  const at::Tensor xp = x_prev.contiguous(), xt = sample.contiguous(),
                   m = model_output.contiguous();
  std::vector<double> rows;
  dispatch_floating(sample.scalar_type(), [&](auto tag) {
    rows = forward_rows<decltype(tag)>(xp, xt, m, s, nullptr);
  });
  const int64_t stride = log_probs.stride(0);
  const int64_t at_step = step * log_probs.stride(1);
  if (log_probs.scalar_type() == at::kDouble) {
    double* out = log_probs.data_ptr<double>() + at_step;
    for (size_t b = 0; b < rows.size(); ++b) out[b * stride] = rows[b];
  } else {
    float* out = log_probs.data_ptr<float>() + at_step;
    for (size_t b = 0; b < rows.size(); ++b) out[b * stride] = static_cast<float>(rows[b]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> transition_log_prob_backward_cpu(
    const at::Tensor& grad_log_prob, const std::optional<at::Tensor>& grad_mean,
    const at::Tensor& x_prev, const at::Tensor& sample, const at::Tensor& model_output,
    double alpha_prod_t, double coef_x0, double coef_eps, double coef_sample, double sigma,
    c10::string_view prediction_type, std::optional<double> clip_range, c10::string_view reduce,
    std::array<bool, 3> output_mask) {
  check_transition_tensors(x_prev, sample, model_output);
  const TransitionScalars s = check_transition_scalars(
      alpha_prod_t, coef_x0, coef_eps, coef_sample, sigma, prediction_type, clip_range, reduce);
  const int64_t batch = sample.size(0);
  const int64_t dims = sample.numel() / batch;
  const at::ScalarType math_dtype = transition_math_dtype(sample);
  check_transition_grads(grad_log_prob, grad_mean, sample);
  const at::Tensor xp = x_prev.contiguous(), xt = sample.contiguous(),
                   m = model_output.contiguous();
  const at::Tensor g_lp = grad_log_prob.to(at::kDouble).contiguous();
  at::Tensor g_mean;
  if (grad_mean.has_value() && grad_mean->defined()) {
    g_mean = grad_mean->to(math_dtype).contiguous();
  }
  const auto empty = at::empty({0}, sample.options());
  at::Tensor grad_xp = output_mask[0] ? at::empty(sample.sizes(), sample.options()) : empty;
  at::Tensor grad_xt = output_mask[1] ? at::empty(sample.sizes(), sample.options()) : empty;
  at::Tensor grad_m = output_mask[2] ? at::empty(sample.sizes(), sample.options()) : empty;
  const double grad_scale = transition_grad_scale(dims, s);
  const int64_t chunks = std::max<int64_t>((dims + kRowChunk - 1) / kRowChunk, 1);
  dispatch_floating(sample.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using T = math_t<scalar_t>;
    const TransitionCoefs<T> c = make_coefs<T>(s);
    const scalar_t* xp_data = xp.const_data_ptr<scalar_t>();
    const scalar_t* xt_data = xt.const_data_ptr<scalar_t>();
    const scalar_t* m_data = m.const_data_ptr<scalar_t>();
    const T* g_mean_data = g_mean.defined() ? g_mean.const_data_ptr<T>() : nullptr;
    const double* g_lp_data = g_lp.const_data_ptr<double>();
    scalar_t* out_xp = output_mask[0] ? grad_xp.data_ptr<scalar_t>() : nullptr;
    scalar_t* out_xt = output_mask[1] ? grad_xt.data_ptr<scalar_t>() : nullptr;
    scalar_t* out_m = output_mask[2] ? grad_m.data_ptr<scalar_t>() : nullptr;
    dispatch_prediction(s.prediction, [&](auto pred) {
      const int want = (output_mask[0] ? 1 : 0) | (output_mask[1] ? 2 : 0) |
                       (output_mask[2] ? 4 : 0);
      if (want == 0) return;
      const BackwardFn<scalar_t> backward = backward_loop<decltype(pred)::value, scalar_t>(want);
      at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / chunks, k = task % chunks;
          const int64_t lo = b * dims + k * kRowChunk;
          const int64_t n = std::min(kRowChunk, dims - k * kRowChunk);
          const T scale = static_cast<T>(g_lp_data[b] * grad_scale);
          backward(
              xp_data + lo, xt_data + lo, m_data + lo,
              g_mean_data == nullptr ? nullptr : g_mean_data + lo, n, c, scale,
              out_xp == nullptr ? nullptr : out_xp + lo, out_xt == nullptr ? nullptr : out_xt + lo,
              out_m == nullptr ? nullptr : out_m + lo);
        }
      });
    });
  });
  return {grad_xp, grad_xt, grad_m};
}

}  // namespace
}  // namespace riskfast

TORCH_LIBRARY_IMPL(riskfast, CPU, m) {
  m.impl("transition_log_prob", &riskfast::transition_log_prob_cpu);
  m.impl("transition_log_prob_backward", &riskfast::transition_log_prob_backward_cpu);
  m.impl("transition_log_prob_into_", &riskfast::transition_log_prob_into_cpu);
}
