// The autograd formula of riskfast::transition_log_prob, registered in C++ for every
// device (dispatch key Autograd).
//
// The backward is the operator riskfast::transition_log_prob_backward (per-device kernels in
// transition_cpu.cpp and cuda_ops.cpp); this file only wires it to autograd. A formula
// registered from Python (torch.library.register_autograd) cost about 30 us of host time
// per differentiable call on the development CPU, against 8 us for the operator itself:
// the eager GPU rows of the first H200 run were bound by that host time.
//
// The fake (meta) kernels stay in Python (riskfast.ops._compiled), so torch.compile traces
// the operator and this formula alike.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace riskfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSignature = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, double, double,
    double, c10::string_view, std::optional<double>, c10::string_view, bool);
using BackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, double, double, double, double, double, c10::string_view,
    std::optional<double>, c10::string_view, std::array<bool, 3>);

const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("riskfast::transition_log_prob", "")
                             .typed<ForwardSignature>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("riskfast::transition_log_prob_backward", "")
                             .typed<BackwardSignature>();
  return op;
}

class TransitionLogProb : public torch::autograd::Function<TransitionLogProb> {
 public:
  // Inputs 0-2 are tensors; 3-11 the step's scalars and flags (no gradient).
  static constexpr size_t kInputs = 12;

  static variable_list forward(AutogradContext* ctx, const at::Tensor& x_prev,
                               const at::Tensor& sample, const at::Tensor& model_output,
                               double alpha_prod_t, double coef_x0, double coef_eps,
                               double coef_sample, double sigma, c10::string_view prediction_type,
                               std::optional<double> clip_range, c10::string_view reduce,
                               bool return_mean) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [log_prob, mean] = forward_op().call(x_prev, sample, model_output, alpha_prod_t,
                                              coef_x0, coef_eps, coef_sample, sigma,
                                              prediction_type, clip_range, reduce, return_mean);
    ctx->save_for_backward({x_prev, sample, model_output});
    auto& saved = ctx->saved_data;
    saved["alpha_prod_t"] = alpha_prod_t;
    saved["coef_x0"] = coef_x0;
    saved["coef_eps"] = coef_eps;
    saved["coef_sample"] = coef_sample;
    saved["sigma"] = sigma;
    saved["prediction_type"] = std::string(prediction_type);
    saved["clip_range"] = clip_range.has_value() ? c10::IValue(*clip_range) : c10::IValue();
    saved["reduce"] = std::string(reduce);
    return {log_prob, mean};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved_tensors = ctx->get_saved_variables();
    const at::Tensor& x_prev = saved_tensors[0];
    const at::Tensor& sample = saved_tensors[1];
    const at::Tensor& model_output = saved_tensors[2];
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->needs_input_grad(2)};
    variable_list out(kInputs);
    if (!mask[0] && !mask[1] && !mask[2]) return out;
    at::Tensor grad_log_prob = grads[0];
    if (!grad_log_prob.defined()) {
      const auto math = sample.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      grad_log_prob = at::zeros({sample.size(0)}, sample.options().dtype(math));
    }
    // The mean's gradient, when the mean was returned (else the output is a [0]
    // placeholder and its gradient is ignored).
    std::optional<at::Tensor> grad_mean;
    if (grads[1].defined() && grads[1].sizes() == sample.sizes()) grad_mean = grads[1];
    const auto& saved = ctx->saved_data;
    const std::string prediction_type = saved.at("prediction_type").toStringRef();
    const std::string reduce = saved.at("reduce").toStringRef();
    const c10::IValue& clip = saved.at("clip_range");
    const std::optional<double> clip_range =
        clip.isNone() ? std::nullopt : std::optional<double>(clip.toDouble());
    auto [grad_xp, grad_xt, grad_m] = backward_op().call(
        grad_log_prob, grad_mean, x_prev, sample, model_output, saved.at("alpha_prod_t").toDouble(),
        saved.at("coef_x0").toDouble(), saved.at("coef_eps").toDouble(),
        saved.at("coef_sample").toDouble(), saved.at("sigma").toDouble(), prediction_type,
        clip_range, reduce, mask);
    if (mask[0]) out[0] = grad_xp;
    if (mask[1]) out[1] = grad_xt;
    if (mask[2]) out[2] = grad_m;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> transition_log_prob_autograd(
    const at::Tensor& x_prev, const at::Tensor& sample, const at::Tensor& model_output,
    double alpha_prod_t, double coef_x0, double coef_eps, double coef_sample, double sigma,
    c10::string_view prediction_type, std::optional<double> clip_range, c10::string_view reduce,
    bool return_mean) {
  variable_list outputs = TransitionLogProb::apply(
      x_prev, sample, model_output, alpha_prod_t, coef_x0, coef_eps, coef_sample, sigma,
      prediction_type, clip_range, reduce, return_mean);
  return {outputs[0], outputs[1]};
}

}  // namespace
}  // namespace riskfast

TORCH_LIBRARY_IMPL(riskfast, Autograd, m) {
  m.impl("transition_log_prob", &riskfast::transition_log_prob_autograd);
}
