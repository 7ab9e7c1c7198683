// Argument checks and shared scalars of riskfast's operators (CPU and CUDA bindings).
//
// Every check runs before an operator writes anything, and its message starts
// with the argument's name: TORCH_CHECK_VALUE raises ValueError in Python,
// TORCH_CHECK_TYPE raises TypeError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace riskfast {

// Elements addressable in a noise stream (offset + numel), as in ops/noise.py.
constexpr int64_t kStreamLength = int64_t{1} << 62;

inline bool is_floating(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}

inline void check_floating(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK_TYPE(is_floating(t), name,
                   ": expected float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

inline void check_seed(const std::string& name, int64_t seed) {
  TORCH_CHECK_VALUE(seed >= 0, name, ": must be in [0, 2**63), got ", seed);
}

// The noise ops write in place: one device, contiguous, floating tensors.
inline void check_noise_tensors(at::TensorList tensors) {
  TORCH_CHECK_VALUE(!tensors.empty(), "tensors: expected at least one tensor, got an empty list");
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::string name = "tensors[" + std::to_string(i) + "]";
    check_floating(name.c_str(), tensors[i]);
    TORCH_CHECK_VALUE(tensors[i].device() == tensors[0].device(), name, ": on ",
                      tensors[i].device(), ", but tensors[0] is on ", tensors[0].device());
    TORCH_CHECK_VALUE(tensors[i].is_contiguous(), name,
                      ": must be contiguous (the noise is applied in place)");
    total += tensors[i].numel();
    TORCH_CHECK_VALUE(total <= kStreamLength, name, ": the list holds more than 2**62 elements");
  }
}

inline void check_seeds_and_scales(at::IntArrayRef seeds, at::ArrayRef<double> scales) {
  TORCH_CHECK_VALUE(seeds.size() == scales.size(), "scales: expected ", seeds.size(),
                    " values (one per seed), got ", scales.size());
  for (size_t i = 0; i < seeds.size(); ++i) {
    check_seed("seeds[" + std::to_string(i) + "]", seeds[i]);
    TORCH_CHECK_VALUE(std::isfinite(scales[i]), "scales[", i, "]: must be finite, got ",
                      scales[i]);
  }
}

inline void check_fill_args(const at::Tensor& out, int64_t seed, int64_t offset) {
  check_floating("out", out);
  TORCH_CHECK_VALUE(out.is_contiguous(), "out: must be contiguous");
  check_seed("seed", seed);
  TORCH_CHECK_VALUE(offset >= 0, "offset: must be >= 0, got ", offset);
  TORCH_CHECK_VALUE(offset <= kStreamLength - out.numel(),
                    "offset: offset + numel must be <= 2**62, got offset ", offset, " and numel ",
                    out.numel());
}

// ------------------------------------------------------------------ transition

enum class Prediction : int { kEpsilon = 0, kSample = 1, kVPrediction = 2 };

// The scalars of one transition, validated (see python/riskfast/ops/transition.py).
struct TransitionScalars {
  double alpha_prod_t, coef_x0, coef_eps, coef_sample, sigma;
  Prediction prediction;
  bool has_clip;
  double clip_range;
  bool reduce_mean;
};

inline TransitionScalars check_transition_scalars(double alpha_prod_t, double coef_x0,
                                                  double coef_eps, double coef_sample,
                                                  double sigma, std::string_view prediction_type,
                                                  std::optional<double> clip_range,
                                                  std::string_view reduce) {
  TORCH_CHECK_VALUE(std::isfinite(alpha_prod_t) && alpha_prod_t > 0.0 && alpha_prod_t < 1.0,
                    "coefficients.alpha_prod_t: must be in (0, 1), got ", alpha_prod_t);
  TORCH_CHECK_VALUE(std::isfinite(coef_x0), "coefficients.coef_x0: must be finite, got ", coef_x0);
  TORCH_CHECK_VALUE(std::isfinite(coef_eps), "coefficients.coef_eps: must be finite, got ",
                    coef_eps);
  TORCH_CHECK_VALUE(std::isfinite(coef_sample), "coefficients.coef_sample: must be finite, got ",
                    coef_sample);
  TORCH_CHECK_VALUE(std::isfinite(sigma) && sigma > 0.0, "coefficients.sigma: must be > 0, got ",
                    sigma);
  TransitionScalars s{alpha_prod_t, coef_x0, coef_eps, coef_sample, sigma,
                      Prediction::kEpsilon, false, 0.0, false};
  if (prediction_type == "epsilon") {
    s.prediction = Prediction::kEpsilon;
  } else if (prediction_type == "sample") {
    s.prediction = Prediction::kSample;
  } else if (prediction_type == "v_prediction") {
    s.prediction = Prediction::kVPrediction;
  } else {
    TORCH_CHECK_VALUE(false,
                      "coefficients.prediction_type: expected one of ['epsilon', 'sample', "
                      "'v_prediction'], got '",
                      std::string(prediction_type), "'");
  }
  if (clip_range.has_value()) {
    TORCH_CHECK_VALUE(std::isfinite(*clip_range) && *clip_range > 0.0,
                      "coefficients.clip_range: must be > 0, got ", *clip_range);
    s.has_clip = true;
    s.clip_range = *clip_range;
  }
  TORCH_CHECK_VALUE(reduce == "sum" || reduce == "mean",
                    "reduce: expected one of ['sum', 'mean'], got '", std::string(reduce), "'");
  s.reduce_mean = reduce == "mean";
  return s;
}

// x_prev, sample and model_output: floating, one dtype, one device, equal shapes [B, ...].
inline void check_transition_tensors(const at::Tensor& x_prev, const at::Tensor& sample,
                                     const at::Tensor& model_output) {
  check_floating("x_prev", x_prev);
  check_floating("sample", sample);
  check_floating("model_output", model_output);
  TORCH_CHECK_VALUE(sample.dim() >= 1 && sample.size(0) >= 1,
                    "sample: expected shape [B, ...] with B >= 1, got ", sample.sizes());
  TORCH_CHECK_VALUE(x_prev.sizes() == sample.sizes(), "x_prev: shape ", x_prev.sizes(),
                    " does not match sample ", sample.sizes());
  TORCH_CHECK_VALUE(model_output.sizes() == sample.sizes(), "model_output: shape ",
                    model_output.sizes(), " does not match sample ", sample.sizes());
  TORCH_CHECK_VALUE(x_prev.device() == sample.device(), "x_prev: on ", x_prev.device(),
                    ", but sample is on ", sample.device());
  TORCH_CHECK_VALUE(model_output.device() == sample.device(), "model_output: on ",
                    model_output.device(), ", but sample is on ", sample.device());
  TORCH_CHECK_TYPE(x_prev.scalar_type() == sample.scalar_type(), "x_prev: dtype ",
                   x_prev.scalar_type(), " differs from sample's ", sample.scalar_type(),
                   " (the compiled op takes one dtype; riskfast.ops.transition_log_prob casts)");
  TORCH_CHECK_TYPE(model_output.scalar_type() == sample.scalar_type(), "model_output: dtype ",
                   model_output.scalar_type(), " differs from sample's ", sample.scalar_type(),
                   " (the compiled op takes one dtype; riskfast.ops.transition_log_prob casts)");
}

// The [B, T] buffer that transition_log_prob_into_ writes column `step` of.
inline void check_log_prob_buffer(const at::Tensor& log_probs, int64_t step,
                                  const at::Tensor& sample) {
  TORCH_CHECK_TYPE(log_probs.defined(), "log_probs: expected a tensor, got None");
  TORCH_CHECK_TYPE(log_probs.scalar_type() == at::kFloat || log_probs.scalar_type() == at::kDouble,
                   "log_probs: expected float32 or float64, got ", log_probs.scalar_type());
  TORCH_CHECK_VALUE(log_probs.dim() == 2 && log_probs.size(0) == sample.size(0),
                    "log_probs: expected shape [B, T] with B = ", sample.size(0), ", got ",
                    log_probs.sizes());
  TORCH_CHECK_VALUE(log_probs.device() == sample.device(), "log_probs: on ", log_probs.device(),
                    ", but sample is on ", sample.device());
  TORCH_CHECK_VALUE(step >= 0 && step < log_probs.size(1), "step: must be in [0, ",
                    log_probs.size(1), "), got ", step);
}

// Incoming gradients of the backward: grad_log_prob [B], grad_mean like sample (optional).
inline void check_transition_grads(const at::Tensor& grad_log_prob,
                                   const std::optional<at::Tensor>& grad_mean,
                                   const at::Tensor& sample) {
  check_floating("grad_log_prob", grad_log_prob);
  TORCH_CHECK_VALUE(grad_log_prob.dim() == 1 && grad_log_prob.size(0) == sample.size(0),
                    "grad_log_prob: expected shape [", sample.size(0), "], got ",
                    grad_log_prob.sizes());
  TORCH_CHECK_VALUE(grad_log_prob.device() == sample.device(), "grad_log_prob: on ",
                    grad_log_prob.device(), ", but sample is on ", sample.device());
  if (grad_mean.has_value() && grad_mean->defined()) {
    check_floating("grad_mean", *grad_mean);
    TORCH_CHECK_VALUE(grad_mean->sizes() == sample.sizes(), "grad_mean: shape ",
                      grad_mean->sizes(), " does not match sample ", sample.sizes());
    TORCH_CHECK_VALUE(grad_mean->device() == sample.device(), "grad_mean: on ",
                      grad_mean->device(), ", but sample is on ", sample.device());
  }
}

// The dtype of the math and of the log-density: float64 for float64 inputs, else float32.
inline at::ScalarType transition_math_dtype(const at::Tensor& sample) {
  return sample.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// log N(x; mean, sigma^2 I) from the summed squares (module docstring of transition.py).
inline double gaussian_log_density_from_squares(double squares, int64_t dims,
                                                const TransitionScalars& s) {
  constexpr double kHalfLog2Pi = 0.91893853320467274178;  // log(2 pi) / 2
  const double d = static_cast<double>(dims);
  double log_prob = squares * (-0.5 / (s.sigma * s.sigma)) - d * (std::log(s.sigma) + kHalfLog2Pi);
  return s.reduce_mean ? log_prob / d : log_prob;
}

// d log_prob / d mean = (x_prev - mean) * scale, scale = 1 / sigma^2 (/ D for "mean").
inline double transition_grad_scale(int64_t dims, const TransitionScalars& s) {
  const double scale = 1.0 / (s.sigma * s.sigma);
  return s.reduce_mean ? scale / static_cast<double>(dims) : scale;
}

}  // namespace riskfast
