// The fused transition log-density on the CPU: riskfast::transition_log_prob, its
// backward, and riskfast::transition_log_prob_into_ (schemas in ops_schema.cpp).
//
// One pass over (x_prev, x_t, model_output): the mean of x_{t-1} (transition_math.h)
// and the squared distance to x_prev, summed per sample in float64 over chunks of a
// fixed length, then added in chunk order (the result does not depend on the thread
// count). Math in float32 for 16-bit and float32 inputs, float64 for float64.
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

namespace riskfast {
namespace {

// Elements per task: fixed, so the order of the float64 sums is too.
constexpr int64_t kRowChunk = 16384;
constexpr int64_t kTile = 256;

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

// Sum of (x_prev - mean)^2 over n elements; writes the mean when mean_out is set.
template <int PRED, typename scalar_t>
double forward_chunk(const scalar_t* xp, const scalar_t* xt, const scalar_t* m, int64_t n,
                     const TransitionCoefs<math_t<scalar_t>>& c, math_t<scalar_t>* mean_out) {
  using T = math_t<scalar_t>;
  T squares[kTile];
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t start = 0; start < n; start += kTile) {
    const int64_t len = std::min(kTile, n - start);
    for (int64_t i = 0; i < len; ++i) {
      bool in_clip;
      const T mean = transition_mean<PRED>(static_cast<T>(xt[start + i]),
                                           static_cast<T>(m[start + i]), c, in_clip);
      if (mean_out != nullptr) mean_out[start + i] = mean;
      const T diff = static_cast<T>(xp[start + i]) - mean;
      squares[i] = diff * diff;
    }
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
      for (int j = 0; j < 8; ++j) lanes[j] += static_cast<double>(squares[i + j]);
    }
    for (; i < len; ++i) lanes[i % 8] += static_cast<double>(squares[i]);
  }
  double total = 0.0;
  for (double lane : lanes) total += lane;
  return total;
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
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks, k = task % chunks;
        const int64_t lo = b * dims + k * kRowChunk;
        const int64_t n = std::min(kRowChunk, dims - k * kRowChunk);
        partial[task] = forward_chunk<decltype(pred)::value>(
            xp + lo, xt + lo, m + lo, n, c, mean_out == nullptr ? nullptr : mean_out + lo);
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

template <int PRED, typename scalar_t>
void backward_chunk(const scalar_t* xp, const scalar_t* xt, const scalar_t* m,
                    const math_t<scalar_t>* grad_mean, int64_t n,
                    const TransitionCoefs<math_t<scalar_t>>& c, math_t<scalar_t> scale,
                    scalar_t* grad_xp, scalar_t* grad_xt, scalar_t* grad_m) {
  using T = math_t<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    bool in_clip;
    const T xt_i = static_cast<T>(xt[i]);
    const T mean = transition_mean<PRED>(xt_i, static_cast<T>(m[i]), c, in_clip);
    // d log_prob / d mean = (x_prev - mean) / sigma^2 (/ D), times the incoming gradient
    const T r = (static_cast<T>(xp[i]) - mean) * scale;
    const T g = grad_mean != nullptr ? r + grad_mean[i] : r;
    T g_xt, g_m;
    transition_mean_backward<PRED>(g, in_clip, c, g_xt, g_m);
    if (grad_xp != nullptr) grad_xp[i] = static_cast<scalar_t>(-r);
    if (grad_xt != nullptr) grad_xt[i] = static_cast<scalar_t>(g_xt);
    if (grad_m != nullptr) grad_m[i] = static_cast<scalar_t>(g_m);
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
      at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / chunks, k = task % chunks;
          const int64_t lo = b * dims + k * kRowChunk;
          const int64_t n = std::min(kRowChunk, dims - k * kRowChunk);
          const T scale = static_cast<T>(g_lp_data[b] * grad_scale);
          backward_chunk<decltype(pred)::value, scalar_t>(
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
