// The schemas of riskfast's operators (namespace "riskfast"), declared once here.
//
// Per-device implementations are registered with TORCH_LIBRARY_IMPL next to their
// code (noise_cpu.cpp, transition_cpu.cpp, cuda_ops.cpp), the autograd formula of
// transition_log_prob in transition_autograd.cpp; the fake (meta) kernels are registered
// from Python in riskfast.ops._compiled, which set_python_module names so that torch
// imports it whenever it needs them.
#include <torch/library.h>

TORCH_LIBRARY(riskfast, m) {
  m.set_python_module("riskfast.ops._compiled");
  // Numbers offset .. offset + numel(out) - 1 of the normal stream of seed (0 <= seed
  // < 2**63), cast to out's dtype (python/riskfast/ops/philox.py).
  m.def("philox_normal_fill_(Tensor(a!) out, int seed, int offset) -> ()");
  // x += sum_i scales[i] * u(seeds[i]) over the stream of the list (one stream).
  m.def("accumulate_noise_(Tensor(a!)[] tensors, int[] seeds, float[] scales) -> ()");
  // (log_prob [B], mean [B, ...] or [0]) of the step sample -> x_prev (ops/transition.py).
  m.def(
      "transition_log_prob(Tensor x_prev, Tensor sample, Tensor model_output, "
      "float alpha_prod_t, float coef_x0, float coef_eps, float coef_sample, float sigma, "
      "str prediction_type, float? clip_range, str reduce, bool return_mean) "
      "-> (Tensor, Tensor)");
  // Gradients to (x_prev, sample, model_output) where output_mask says; [0] elsewhere.
  m.def(
      "transition_log_prob_backward(Tensor grad_log_prob, Tensor? grad_mean, Tensor x_prev, "
      "Tensor sample, Tensor model_output, float alpha_prod_t, float coef_x0, "
      "float coef_eps, float coef_sample, float sigma, str prediction_type, "
      "float? clip_range, str reduce, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // log_probs[:, step] = the log-densities (the [B, T] buffer filled during sampling).
  m.def(
      "transition_log_prob_into_(Tensor(a!) log_probs, int step, Tensor x_prev, "
      "Tensor sample, Tensor model_output, float alpha_prod_t, float coef_x0, "
      "float coef_eps, float coef_sample, float sigma, str prediction_type, "
      "float? clip_range, str reduce) -> ()");
}
