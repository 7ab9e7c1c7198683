// CUDA implementations of riskfast's operators: the thin binding of the torch-free
// kernels in noise_cuda.cu and transition_cuda.cu (launchers in cuda_kernels.h).
//
// Compiled only with RISKFAST_WITH_CUDA (a CUDA torch and nvcc, see CMakeLists.txt).
// Arguments are checked exactly as on the CPU (op_checks.h) before any launch; the
// kernels run on the current stream of the tensors' device.
#ifdef RISKFAST_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_kernels.h"
#include "op_checks.h"
#include "transition_math.h"

namespace riskfast {
namespace {

int dtype_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return cuda::kFloat32;
    case at::kDouble: return cuda::kFloat64;
    case at::kHalf: return cuda::kFloat16;
    case at::kBFloat16: return cuda::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", dtype);
  }
  return -1;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "riskfast::", op, ": CUDA launch failed: ",
              cudaGetErrorString(err));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// ------------------------------------------------------------------- noise
void philox_normal_fill_cuda(at::Tensor& out, int64_t seed, int64_t offset) {
  check_fill_args(out, seed, offset);
  TORCH_CHECK_VALUE(out.is_cuda(), "out: expected a CUDA tensor, got ", out.device());
  const c10::cuda::CUDAGuard guard(out.device());
  check_launch(cuda::philox_normal_fill(out.data_ptr(), dtype_code(out.scalar_type()),
                                        out.numel(), static_cast<uint64_t>(seed), offset,
                                        current_stream()),
               "philox_normal_fill_");
}

// Every seed of seeds[first, last) on every tensor: batches of at most
// kMaxNoiseSegments tensors per launch (the stream offsets come from the whole list).
void accumulate_launches(const std::vector<at::Tensor>& tensors, at::IntArrayRef seeds,
                         at::ArrayRef<double> scales, size_t first, size_t last) {
  cuda::NoiseBatch batch{};
  batch.num_seeds = static_cast<int32_t>(last - first);
  for (size_t s = first; s < last; ++s) {
    batch.seeds[s - first] = static_cast<uint64_t>(seeds[s]);
    batch.scales[s - first] = scales[s];
  }
  auto flush = [&]() {
    if (batch.num_segments == 0) return;
    check_launch(cuda::accumulate_noise(batch, current_stream()), "accumulate_noise_");
    batch.num_segments = 0;
  };
  int64_t stream_offset = 0;
  for (const at::Tensor& tensor : tensors) {
    const int64_t numel = tensor.numel();
    if (numel > 0) {
      cuda::NoiseSegment& seg = batch.segments[batch.num_segments];
      seg.data = tensor.data_ptr();
      seg.numel = numel;
      seg.stream_offset = stream_offset;
      seg.dtype = dtype_code(tensor.scalar_type());
      const auto address = reinterpret_cast<uintptr_t>(seg.data);
      seg.aligned = stream_offset % 4 == 0 && address % (4 * tensor.element_size()) == 0;
      const int64_t blocks = (stream_offset + numel - 1) / 4 - stream_offset / 4 + 1;
      batch.first_work[batch.num_segments + 1] = batch.first_work[batch.num_segments] + blocks;
      if (++batch.num_segments == cuda::kMaxNoiseSegments) flush();
    }
    stream_offset += numel;
  }
  flush();
}

void accumulate_noise_cuda(at::TensorList tensors, at::IntArrayRef seeds,
                           at::ArrayRef<double> scales) {
  check_noise_tensors(tensors);
  check_seeds_and_scales(seeds, scales);
  TORCH_CHECK_VALUE(tensors[0].is_cuda(), "tensors[0]: expected a CUDA tensor, got ",
                    tensors[0].device());
  if (seeds.empty()) return;
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  std::vector<at::Tensor> work(tensors.begin(), tensors.end());
  if (seeds.size() <= static_cast<size_t>(cuda::kMaxNoiseSeeds)) {
    accumulate_launches(work, seeds, scales, 0, seeds.size());
    return;
  }
  // More seeds than one launch holds: 16-bit tensors accumulate in float32 copies
  // across all launches and are rounded once at the end, as in the reference (float32
  // and float64 tensors round after every term anyway, so launches compose exactly).
  for (at::Tensor& t : work) {
    if (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16) t = t.to(at::kFloat);
  }
  for (size_t first = 0; first < seeds.size(); first += cuda::kMaxNoiseSeeds) {
    const size_t last = std::min(seeds.size(), first + cuda::kMaxNoiseSeeds);
    accumulate_launches(work, seeds, scales, first, last);
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!work[i].is_same(tensors[i])) tensors[i].copy_(work[i]);
  }
}

// -------------------------------------------------------------- transition
cuda::TransitionArgs make_args(const at::Tensor& xp, const at::Tensor& xt, const at::Tensor& m,
                               const TransitionScalars& s) {
  cuda::TransitionArgs a{};
  a.x_prev = xp.const_data_ptr();
  a.sample = xt.const_data_ptr();
  a.model_output = m.const_data_ptr();
  a.dtype = dtype_code(xt.scalar_type());
  a.batch = xt.size(0);
  a.dims = xt.numel() / xt.size(0);
  a.alpha_prod_t = s.alpha_prod_t;
  a.coef_x0 = s.coef_x0;
  a.coef_eps = s.coef_eps;
  a.coef_sample = s.coef_sample;
  a.sigma = s.sigma;
  a.prediction = static_cast<int32_t>(s.prediction);
  a.has_clip = s.has_clip;
  a.clip_range = s.clip_range;
  a.reduce_mean = s.reduce_mean;
  return a;
}

std::tuple<at::Tensor, at::Tensor> transition_log_prob_cuda(
    const at::Tensor& x_prev, const at::Tensor& sample, const at::Tensor& model_output,
    double alpha_prod_t, double coef_x0, double coef_eps, double coef_sample, double sigma,
    c10::string_view prediction_type, std::optional<double> clip_range, c10::string_view reduce,
    bool return_mean) {
  check_transition_tensors(x_prev, sample, model_output);
  const TransitionScalars s = check_transition_scalars(
      alpha_prod_t, coef_x0, coef_eps, coef_sample, sigma, prediction_type, clip_range, reduce);
  TORCH_CHECK_VALUE(sample.is_cuda(), "sample: expected a CUDA tensor, got ", sample.device());
  const c10::cuda::CUDAGuard guard(sample.device());
  const at::Tensor xp = x_prev.contiguous(), xt = sample.contiguous(),
                   m = model_output.contiguous();
  const at::ScalarType math_dtype = transition_math_dtype(sample);
  const auto options = sample.options().dtype(math_dtype);
  at::Tensor log_prob = at::empty({sample.size(0)}, options);
  at::Tensor mean = return_mean ? at::empty(sample.sizes(), options) : at::empty({0}, options);
  const cuda::TransitionArgs args = make_args(xp, xt, m, s);
  at::Tensor partial =
      at::empty({args.batch * cuda::transition_chunks(args.dims)}, options.dtype(at::kDouble));
  check_launch(cuda::transition_forward(args, return_mean ? mean.data_ptr() : nullptr,
                                        partial.data_ptr<double>(), log_prob.data_ptr(),
                                        dtype_code(math_dtype), 1, current_stream()),
               "transition_log_prob");
  return {log_prob, mean};
}

void transition_log_prob_into_cuda(at::Tensor& log_probs, int64_t step, const at::Tensor& x_prev,
                                   const at::Tensor& sample, const at::Tensor& model_output,
                                   double alpha_prod_t, double coef_x0, double coef_eps,
                                   double coef_sample, double sigma,
                                   c10::string_view prediction_type,
                                   std::optional<double> clip_range, c10::string_view reduce) {
  check_transition_tensors(x_prev, sample, model_output);
  const TransitionScalars s = check_transition_scalars(
      alpha_prod_t, coef_x0, coef_eps, coef_sample, sigma, prediction_type, clip_range, reduce);
  check_log_prob_buffer(log_probs, step, sample);
  TORCH_CHECK_VALUE(sample.is_cuda(), "sample: expected a CUDA tensor, got ", sample.device());
  const c10::cuda::CUDAGuard guard(sample.device());
  const at::Tensor xp = x_prev.contiguous(), xt = sample.contiguous(),
                   m = model_output.contiguous();
  const cuda::TransitionArgs args = make_args(xp, xt, m, s);
  at::Tensor partial = at::empty({args.batch * cuda::transition_chunks(args.dims)},
                                 sample.options().dtype(at::kDouble));
  char* column = static_cast<char*>(log_probs.data_ptr()) +
                 step * log_probs.stride(1) * static_cast<int64_t>(log_probs.element_size());
  check_launch(cuda::transition_forward(args, nullptr, partial.data_ptr<double>(), column,
                                        dtype_code(log_probs.scalar_type()), log_probs.stride(0),
                                        current_stream()),
               "transition_log_prob_into_");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> transition_log_prob_backward_cuda(
    const at::Tensor& grad_log_prob, const std::optional<at::Tensor>& grad_mean,
    const at::Tensor& x_prev, const at::Tensor& sample, const at::Tensor& model_output,
    double alpha_prod_t, double coef_x0, double coef_eps, double coef_sample, double sigma,
    c10::string_view prediction_type, std::optional<double> clip_range, c10::string_view reduce,
    std::array<bool, 3> output_mask) {
  check_transition_tensors(x_prev, sample, model_output);
  const TransitionScalars s = check_transition_scalars(
      alpha_prod_t, coef_x0, coef_eps, coef_sample, sigma, prediction_type, clip_range, reduce);
  check_transition_grads(grad_log_prob, grad_mean, sample);
  TORCH_CHECK_VALUE(sample.is_cuda(), "sample: expected a CUDA tensor, got ", sample.device());
  const c10::cuda::CUDAGuard guard(sample.device());
  const at::Tensor xp = x_prev.contiguous(), xt = sample.contiguous(),
                   m = model_output.contiguous();
  const at::Tensor g_lp = grad_log_prob.to(at::kDouble).contiguous();
  at::Tensor g_mean;
  if (grad_mean.has_value() && grad_mean->defined()) {
    g_mean = grad_mean->to(transition_math_dtype(sample)).contiguous();
  }
  const auto empty = at::empty({0}, sample.options());
  at::Tensor grad_xp = output_mask[0] ? at::empty(sample.sizes(), sample.options()) : empty;
  at::Tensor grad_xt = output_mask[1] ? at::empty(sample.sizes(), sample.options()) : empty;
  at::Tensor grad_m = output_mask[2] ? at::empty(sample.sizes(), sample.options()) : empty;
  check_launch(cuda::transition_backward(make_args(xp, xt, m, s), g_lp.const_data_ptr<double>(),
                                         g_mean.defined() ? g_mean.const_data_ptr() : nullptr,
                                         output_mask[0] ? grad_xp.data_ptr() : nullptr,
                                         output_mask[1] ? grad_xt.data_ptr() : nullptr,
                                         output_mask[2] ? grad_m.data_ptr() : nullptr,
                                         current_stream()),
               "transition_log_prob_backward");
  return {grad_xp, grad_xt, grad_m};
}

}  // namespace
}  // namespace riskfast

TORCH_LIBRARY_IMPL(riskfast, CUDA, m) {
  m.impl("philox_normal_fill_", &riskfast::philox_normal_fill_cuda);
  m.impl("accumulate_noise_", &riskfast::accumulate_noise_cuda);
  m.impl("transition_log_prob", &riskfast::transition_log_prob_cuda);
  m.impl("transition_log_prob_backward", &riskfast::transition_log_prob_backward_cuda);
  m.impl("transition_log_prob_into_", &riskfast::transition_log_prob_into_cuda);
}

#endif  // RISKFAST_WITH_CUDA
