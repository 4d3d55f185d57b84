// The C++ signature of fused_optim::sgd_step_ (schema in fused_optim/ops/sgd.py), shared by the CPU and CUDA
// implementations and by the registrations, plus the argument checks both run before touching memory.
#pragma once

#include <optional>
#include <vector>

#include "ops/optimizer_checks.h"
#include "ops/torch_api.h"

#include "fused_optim/sgd.h"

namespace fused_optim {

// momentum_buffers are empty when momentum is 0 (torch keeps no state then), else one per param; so are steps,
// unless stochastic_rounding (whose random stream the count keys). The buffers are fp32, or bf16 (moments="bf16":
// rounded stochastically, keyed by `seed`, rounding.h), or int8 codes with their block scales in moment_scales
// (moments="int8", moment_int8.h; else moment_scales is empty). master_params: none, or each param's fp32 master
// copy or bf16 remainder (as Lion's and Adam's).
#define FUSED_OPTIM_SGD_ARGS                                                                                  \
  TensorList params, TensorList grads, TensorList momentum_buffers, TensorList master_params, TensorList steps, \
      TensorList moment_scales, double lr, const std::optional<Tensor>& lr_tensor, double momentum,            \
      double dampening, double weight_decay, bool nesterov, bool maximize, bool stochastic_rounding,           \
      int64_t seed, const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf

// The same arguments, forwarded (to check_sgd_args).
#define FUSED_OPTIM_SGD_ARG_NAMES                                                                             \
  params, grads, momentum_buffers, master_params, steps, moment_scales, lr, lr_tensor, momentum, dampening,    \
      weight_decay, nesterov, maximize, stochastic_rounding, seed, grad_scale, found_inf

void sgd_step_cpu(FUSED_OPTIM_SGD_ARGS);
void sgd_step_cuda(FUSED_OPTIM_SGD_ARGS);

// Checks every argument before any memory is touched (a bad call changes nothing), and returns the grads in their
// params' memory layout (the kernels walk param, grad and buffer as one flat array each).
inline std::vector<Tensor> check_sgd_args(FUSED_OPTIM_SGD_ARGS) {
  const size_t n = params.size();
  const bool has_momentum = momentum != 0.0;
  FO_CHECK(grads.size() == n, "sgd_step_: params and grads must have the same length");
  FO_CHECK(has_momentum ? momentum_buffers.size() == n : momentum_buffers.empty(),
           "sgd_step_: with momentum, one momentum buffer per param; without, none");
  FO_CHECK(has_momentum || stochastic_rounding ? steps.size() == n : steps.empty(),
           "sgd_step_: with momentum or stochastic rounding, one step per param; without, none");
  FO_CHECK(master_params.empty() || master_params.size() == n, "sgd_step_: one master param per param, or none");
  FO_CHECK(!(stochastic_rounding && !master_params.empty()),
           "sgd_step_: stochastic_rounding and master params are alternatives; pass one");
  // dampening is allowed: torch checks it with Nesterov at construction only, and a group may set it
  FO_CHECK(!nesterov || momentum > 0.0, "sgd_step_: Nesterov momentum requires a momentum");
  const bool int8 = !moment_scales.empty();
  FO_CHECK(!int8 || (has_momentum && moment_scales.size() == n),
           "sgd_step_: int8 momentum buffers need momentum and one moment_scales tensor per param");
  if (n == 0) return {};
  const torch::stable::Device device = params[0].device();
  std::vector<Tensor> matched_grads(grads.begin(), grads.end());
  for (size_t i = 0; i < n; ++i) {
    const TensorInfo p(params[i]);
    check_param("sgd_step_", p, device);
    FO_CHECK(!stochastic_rounding || p.dtype == kBFloat16, "sgd_step_: stochastic rounding is for bfloat16 params");
    const TensorInfo grad = check_grad("sgd_step_", grads[i], p, "sgd_step_: sparse gradients are not supported");
    if (has_momentum) {
      check_moment("sgd_step_", momentum_buffers[i], p, "a momentum buffer",
                   int8 ? kChar : momentum_buffers[0].scalar_type() == kBFloat16 ? kBFloat16 : kFloat);
      if (int8) check_moment_scales("sgd_step_", moment_scales[i], params[i], 1);
    }
    if (!master_params.empty()) check_master("sgd_step_", master_params[i], p, master_params[0].scalar_type());
    if (!steps.empty()) check_step("sgd_step_", steps[i], p);
    if (!grad.strides.equals(p.strides)) matched_grads[i] = copy_in_layout_of(params[i], grads[i]);
  }
  check_step_scalars("sgd_step_", device, lr_tensor, grad_scale, found_inf);
  return matched_grads;
}

}  // namespace fused_optim
