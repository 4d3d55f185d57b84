// The C++ signature of fused_optim::lion_step_ (schema in fused_optim/ops/lion.py), shared by the CPU and CUDA
// implementations and by the registrations, plus the argument checks both run before touching memory.
#pragma once

#include <optional>
#include <vector>

#include "ops/optimizer_checks.h"
#include "ops/torch_api.h"

#include "fused_optim/lion.h"

namespace fused_optim {

// exp_avgs are fp32, or bf16 (moments="bf16": rounded stochastically, keyed by `seed`, rounding.h), or int8 codes
// with their block scales in moment_scales (moments="int8", moment_int8.h; else moment_scales is empty).
#define FUSED_OPTIM_LION_ARGS                                                                                 \
  TensorList params, TensorList grads, TensorList exp_avgs, TensorList master_params, TensorList steps,       \
      TensorList moment_scales, double lr, const std::optional<Tensor>& lr_tensor, double beta1, double beta2, \
      double weight_decay, bool maximize, bool stochastic_rounding, int64_t seed,                             \
      const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf

// The same arguments, forwarded (to check_lion_args).
#define FUSED_OPTIM_LION_ARG_NAMES                                                                            \
  params, grads, exp_avgs, master_params, steps, moment_scales, lr, lr_tensor, beta1, beta2, weight_decay,   \
      maximize, stochastic_rounding, seed, grad_scale, found_inf

void lion_step_cpu(FUSED_OPTIM_LION_ARGS);
void lion_step_cuda(FUSED_OPTIM_LION_ARGS);

// Checks every argument before any memory is touched (a bad call changes nothing), and returns the grads in their
// params' memory layout (the kernels walk param, grad and state as one flat array each).
inline std::vector<Tensor> check_lion_args(FUSED_OPTIM_LION_ARGS) {
  const size_t n = params.size();
  FO_CHECK(grads.size() == n && exp_avgs.size() == n && steps.size() == n,
           "lion_step_: params, grads, exp_avgs and steps must have the same length");
  FO_CHECK(master_params.empty() || master_params.size() == n, "lion_step_: one master param per param, or none");
  FO_CHECK(!(stochastic_rounding && !master_params.empty()),
           "lion_step_: stochastic_rounding and master params are alternatives; pass one");
  const bool int8 = !moment_scales.empty();
  FO_CHECK(!int8 || moment_scales.size() == n, "lion_step_: int8 moments need one moment_scales tensor per param");
  if (n == 0) return {};
  const torch::stable::Device device = params[0].device();
  std::vector<Tensor> matched_grads(grads.begin(), grads.end());
  for (size_t i = 0; i < n; ++i) {
    const TensorInfo p(params[i]);
    check_param("lion_step_", p, device);
    FO_CHECK(!stochastic_rounding || p.dtype == kBFloat16, "lion_step_: stochastic rounding is for bfloat16 params");
    const TensorInfo grad = check_grad("lion_step_", grads[i], p, "Lion does not support sparse gradients");
    check_moment("lion_step_", exp_avgs[i], p, "exp_avg",
                 int8 ? kChar : exp_avgs[0].scalar_type() == kBFloat16 ? kBFloat16 : kFloat);
    if (int8) check_moment_scales("lion_step_", moment_scales[i], params[i], 1);
    if (!master_params.empty()) check_master("lion_step_", master_params[i], p, master_params[0].scalar_type());
    check_step("lion_step_", steps[i], p);
    if (!grad.strides.equals(p.strides)) matched_grads[i] = copy_in_layout_of(params[i], grads[i]);
  }
  check_step_scalars("lion_step_", device, lr_tensor, grad_scale, found_inf);
  return matched_grads;
}

}  // namespace fused_optim
